"""The feedback doors: `POST /feedback/v1/feedback` takes feedback in, `GET` reads what is stored, and
`POST /v1/traces` takes OpenTelemetry traces (OTLP/HTTP) in as span.logged events."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from contracts.http import ErrorResponse, FeedbackAccepted, FeedbackCreate, FeedbackList, Role
from services.feedback import otlp
from services.feedback.otlp_intake import BrokerUnavailable, TraceIntake
from services.feedback.service import InvalidFeedback, ReviewerRoleRequired, give_feedback, list_feedback
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.auth import Authenticator, Principal
from services.runtime.broker import PUBLISH_FAILURES, EventBus
from services.runtime.clickhouse import ClickHouseError
from services.runtime.http import REFUSED_STATUSES, BodyTooLarge, DoorError, read_bounded
from services.runtime.privacy import Redactor

log = logging.getLogger("flywheel.feedback.otlp")

OTLP_TRACES_PATH = "/v1/traces"
# Seconds a caller (an app, an OpenTelemetry exporter) is told to wait before retrying when Kafka does not take what it sent.
RETRY_AFTER_S = 5

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer fw_<id>_<secret>`.")


def broker_refused(what: str, timeout_s: float, error: BaseException, consequence: str) -> DoorError:
    """The 503 a door answers when Kafka did not take what it publishes within `timeout_s`, saying what
    that means for the caller (`consequence`)."""
    return DoorError(
        503,
        f"Kafka did not take the {what} within {timeout_s:g} s ({type(error).__name__}); {consequence}",
        code="broker_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def feedback_sender(auth: Authenticator) -> Callable[..., Principal]:
    """A dependency admitting the two kinds of callers that send feedback: apps (for their end users)
    and reviewers (corrections); every other role is refused with 403."""

    def sender(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
        principal = auth.authenticate(credentials.credentials if credentials else None)
        if not (principal.may(Role.app) or principal.may(Role.reviewer)):
            raise DoorError(
                403,
                f"{principal.name} has role {principal.role.value}; sending feedback needs app or reviewer",
                code="insufficient_role",
            )
        return principal

    return sender


def create_router(
    bus: EventBus,
    store: Callable[[], FeedbackStore],
    auth: Authenticator,
    redactor: Redactor,
    *,
    publish_timeout_s: float = 10.0,
) -> APIRouter:
    router = APIRouter(
        prefix="/feedback/v1",
        tags=["feedback"],
        responses={status: {"model": ErrorResponse} for status in (401, 403, 422, 503)},
    )
    reader = auth.require(Role.viewer)
    sender = feedback_sender(auth)

    @router.post("/feedback", status_code=202, response_model=FeedbackAccepted)
    async def post_feedback(request: FeedbackCreate, caller: Principal = Depends(sender)) -> FeedbackAccepted:
        """Accept feedback on exactly one target: an inference (`inference_id`), a span (`trace_id` and
        `span_id`), a trace (`trace_id` alone) or a session (`session_id`); 422 names what to send when a
        request names none or several. 202: it is published now, personal data scrubbed, and stored by the
        sink; feedback on something not stored yet is kept and joins it when it lands. `source: reviewer`
        needs a key whose role grants reviewer (403 otherwise): only reviewers' corrections on inferences
        feed automatic retraining."""
        try:
            return await asyncio.wait_for(
                give_feedback(request, bus.publish, redactor, caller=caller.name, may_review=caller.may(Role.reviewer)),
                publish_timeout_s,
            )
        except PUBLISH_FAILURES as error:
            raise broker_refused("feedback", publish_timeout_s, error, "nothing was stored, retry later") from None
        except InvalidFeedback as error:
            raise DoorError(422, str(error), param=error.param) from None
        except ReviewerRoleRequired as error:
            raise DoorError(403, str(error), code="reviewer_role_required", param="source") from None

    @router.get("/feedback", response_model=FeedbackList)
    async def get_feedback(
        inference_id: str | None = Query(default=None, min_length=1, max_length=128, description="An inference id."),
        trace_id: str | None = Query(
            default=None, max_length=32, description="A trace id; with span_id, the trace of a span."
        ),
        span_id: str | None = Query(default=None, max_length=16, description="A span id, within trace_id."),
        session_id: str | None = Query(default=None, min_length=1, max_length=128, description="A session id."),
        _: Principal = Depends(reader),
    ) -> FeedbackList:
        """Stored feedback on exactly one target, named as POST names it: an inference (`inference_id`), a
        span (`trace_id` and `span_id`), a trace (`trace_id` alone) or a session (`session_id`); and
        whether the target itself is stored yet. 422 names what to send when the query names none or several."""
        try:
            return await asyncio.to_thread(
                functools.partial(
                    list_feedback,
                    store(),
                    inference_id=inference_id,
                    trace_id=trace_id,
                    span_id=span_id,
                    session_id=session_id,
                )
            )
        except InvalidFeedback as error:
            raise DoorError(422, str(error), param=error.param) from None
        except ClickHouseError as error:
            raise DoorError(503, f"ClickHouse cannot answer now: {error}") from None

    return router


def otlp_body_limits(settings: FeedbackSettings) -> dict[str, int]:
    """The OTLP door's cap on bodies as sent, for the process's body limit (Service.body_limits)."""
    return {OTLP_TRACES_PATH: settings.otlp_max_body_bytes}


def _otlp_media_type(request: Request) -> str:
    """The OTLP encoding a request declares, or "" for anything else."""
    declared = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return declared if declared in (otlp.PROTOBUF, otlp.JSON) else ""


class OtlpRoute(APIRoute):
    """A route answering every refusal as OTLP/HTTP says: a `google.rpc.Status` in the request's encoding
    (JSON for a request in neither), not the OpenAI-style error of Flywheel's other doors; retryable
    statuses with Retry-After. Refusals are still counted and logged as on every door."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answered(request: Request) -> Response:
            try:
                return await handler(request)
            except DoorError as error:
                return _otlp_refusal(request, error.status, str(error), error.detail.code, error.headers)
            except BodyTooLarge as error:  # the process's body cap, passed while the door read the stream
                return _otlp_refusal(request, 413, str(error.detail), BodyTooLarge.code, None)

        return answered


def _otlp_refusal(
    request: Request, status: int, message: str, code: str | None, headers: dict[str, str] | None
) -> Response:
    refusals = getattr(request.app.state, "refusals", None)
    if refusals is not None and status in REFUSED_STATUSES:
        refusals.record(status, code, request.url.path)
    media_type = _otlp_media_type(request) or otlp.JSON
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return Response(
        otlp.failure(status, message, media_type), status_code=status, media_type=media_type, headers=headers
    )


_STATUS_BODY = {"description": "google.rpc.Status, in the request's encoding (JSON for a request in neither)."}
_OTLP_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "An OTLP ExportTraceServiceRequest; `Content-Encoding: gzip` is accepted.",
        "content": {
            otlp.PROTOBUF: {"schema": {"type": "string", "format": "binary"}},
            otlp.JSON: {
                "schema": {"type": "object", "description": "OTLP/JSON: ids in hex, field names in lowerCamelCase."}
            },
        },
    }
}


def create_otlp_router(intake: TraceIntake, auth: Authenticator) -> APIRouter:
    """The OTLP/HTTP trace intake at the standard path, so an OpenTelemetry exporter pointed at this
    process's base URL sends here unchanged."""
    settings = intake.settings
    router = APIRouter(tags=["traces"], route_class=OtlpRoute)
    # The same role that logs inferences and sends end users' feedback: traces are an app's telemetry.
    sender = auth.require(Role.app)

    @router.post(
        OTLP_TRACES_PATH,
        response_class=Response,
        openapi_extra=_OTLP_OPENAPI,
        responses={
            200: {
                "description": "ExportTraceServiceResponse in the request's encoding; `partial_success` counts rejected spans and says why.",
                "content": {otlp.PROTOBUF: {}, otlp.JSON: {}},
            },
            **{status: _STATUS_BODY for status in (400, 401, 403, 413, 415, 503)},
        },
    )
    async def export_traces(request: Request, caller: Principal = Depends(sender)) -> Response:
        """Take OpenTelemetry spans in (OTLP/HTTP: `application/x-protobuf` or `application/json`, gzip or
        not) and publish each as span.logged, keyed by trace, text scrubbed of personal data. Spans that
        cannot be accepted are counted and explained in the answer's partial success while the others
        are accepted; a request refused whole (400 undecodable, 401, 403, 413, 415) publishes nothing. 503
        with Retry-After when Kafka does not take the spans: the exporter's retry publishes them under the
        same event ids, so none is stored twice. docs/how-to/send-traces.md says what is mapped and the bounds."""
        media_type = _otlp_media_type(request)
        if not media_type:
            declared = request.headers.get("content-type")
            sent = f"Content-Type {declared[:80]}" if declared else "a body without Content-Type"
            raise DoorError(
                415,
                f"{sent} is not OTLP: send {otlp.PROTOBUF} or {otlp.JSON}",
                code="unsupported_media_type",
            )
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("gzip", "identity"):
            raise DoorError(
                415,
                f"Content-Encoding {encoding[:40]} is not supported: send gzip or none",
                code="unsupported_encoding",
            )
        body = await (await read_bounded(request, settings.otlp_max_body_bytes)).body()
        try:
            # Inflating, decoding and scrubbing thousands of spans is CPU work: off the event loop.
            mapped = await asyncio.to_thread(_decode_and_map, intake, body, media_type, encoding, caller.name)
        except otlp.TooLarge as error:
            raise DoorError(413, f"{error}; nothing was stored", code="request_too_large") from None
        except otlp.Undecodable as error:
            raise DoorError(400, f"{error}; nothing was stored", code="invalid_otlp") from None
        try:
            answer = await intake.publish(mapped, transport="http")
        except BrokerUnavailable as error:
            raise DoorError(503, str(error), code="broker_unavailable") from None
        return Response(otlp.encode(answer, media_type), media_type=media_type)

    return router


def _decode_and_map(intake: TraceIntake, body: bytes, media_type: str, encoding: str, principal: str) -> otlp.Mapped:
    if encoding == "gzip":
        body = otlp.inflate(body, intake.settings.otlp_max_inflated_bytes)
    return intake.map(otlp.decode(body, media_type), principal)
