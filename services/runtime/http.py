"""What every process's HTTP app has: /healthz, /readyz, /metrics, errors in one shape, no tracebacks,
a cap on every request body, and refusals that cost the caller, not the platform.

Services include their own APIRouter under `/<service>/v1/...`; `flywheel up` mounts all of them on
one app built here, `flywheel run X` mounts one.

Use cases raise domain errors (services/runtime/errors.py), which name no status: the app built here
answers each kind with its status (DOMAIN_STATUSES), so no door translates errors by hand. DoorError,
with an explicit status, is for what a door itself refuses (a key, a body over its cap, a rate limit).

A refused request (401, 403, 413, 429) is counted in `flywheel_http_refusals_total` and logged once
per reason and interval with how many were folded into that line: a caller hammering a door with a bad
key fills neither the log nor any store (refusals write nothing to Kafka, ClickHouse or the audit log).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, ClassVar

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Lifespan, Message, Receive, Scope, Send

from contracts.http import ErrorDetail, ErrorResponse, HealthStatus
from services.runtime.errors import (
    BadRequest,
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    TooLarge,
    Unavailable,
)

log = logging.getLogger("flywheel.http")

ReadinessCheck = Callable[[], Awaitable[None]]

# A door whose bodies are larger (a dataset upload) says so through its service's `body_limits`.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Each /readyz check gets this long; the probe answers within it whatever hangs behind a check.
READINESS_CHECK_TIMEOUT_S = 1.5
REFUSED_STATUSES = frozenset({401, 403, 413, 429})
REFUSAL_LOG_INTERVAL_S = 60.0

HTTP_REFUSALS = Counter(
    "flywheel_http_refusals_total",
    "Requests refused before any work was done, by status and reason code (bad key, role too low, body too large, rate limited).",
    ["status", "code"],
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


# The one place a domain error becomes an HTTP status: services raise kinds (services/runtime/errors.py),
# the edge answers. A kind not listed (DomainError itself) is a 400.
DOMAIN_STATUSES: dict[type[DomainError], int] = {
    BadRequest: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Invalid: 422,
    Unavailable: 503,
}


def status_of(error: DomainError) -> int:
    """The HTTP status a domain error is answered with."""
    return next((status for kind, status in DOMAIN_STATUSES.items() if isinstance(error, kind)), 400)


def error_type_of(status: int) -> str:
    """OpenAI's error `type` for a status."""
    return _ERROR_TYPES.get(status, "server_error")


class DoorError(Exception):
    """An error a door itself answers with (authentication, a body over its cap): status, message, the
    OpenAI-style type/param/code, and any headers the answer needs. Use cases raise DomainError kinds."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=error_type or error_type_of(status), param=param, code=code)
        self.headers = headers


class RateLimited(DoorError):
    """A caller over its rate limit: a 429 telling it when to come back (Retry-After, whole seconds)."""

    def __init__(self, message: str, *, retry_after: str) -> None:
        super().__init__(
            429,
            message,
            code="rate_limit_exceeded",
            error_type="rate_limit_error",
            headers={"Retry-After": retry_after},
        )


def error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status, headers=headers)


class RefusalLog:
    """Counts every refusal; logs the first of each (status, code) per interval and how many followed it."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[int, str], tuple[float, int]] = {}  # reason -> (window start, refusals folded since)

    def record(self, status: int, code: str | None, path: str) -> bool:
        """Count a refusal; True when it was logged (the first of its reason in the interval)."""
        reason = (status, code or "refused")
        HTTP_REFUSALS.labels(str(status), reason[1]).inc()
        now = self._clock()
        with self._lock:
            started, folded = self._windows.get(reason, (None, 0))
            if started is not None and now - started < self._interval_s:
                self._windows[reason] = (started, folded + 1)
                return False
            self._windows[reason] = (now, 0)
        # The path, never the key, the body or the query string: those may carry what the caller should not leak.
        log.warning(
            "refused %s %s on %s%s",
            status,
            reason[1],
            path,
            f" ({folded} more of these in the last {self._interval_s:.0f} s)" if folded else "",
        )
        return True


class BodyTooLarge(HTTPException):
    """A body that passed its door's cap while streaming in. An HTTPException, because FastAPI turns any
    other error raised while it reads a body into a 400 about parsing."""

    code = "request_too_large"

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class BodyLimit:
    """Refuses (413) a request body over its door's cap: by Content-Length before the door runs, else
    as soon as the streamed bytes pass the cap, whatever the door does with the stream (FastAPI's body
    parsing, a door that reads the stream itself). Nothing is buffered here."""

    def __init__(self, app: ASGIApp, *, default_bytes: int, limits: Mapping[str, int], refusals: RefusalLog) -> None:
        self.app = app
        self.default_bytes = default_bytes
        # Longest prefix first, so /registry/v1/datasets wins over /registry.
        self.limits = sorted(limits.items(), key=lambda item: -len(item[0]))
        self.refusals = refusals

    def limit_for(self, path: str) -> int:
        return next((limit for prefix, limit in self.limits if path.startswith(prefix)), self.default_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self.limit_for(path)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            self.refusals.record(413, BodyTooLarge.code, path)
            response = error_response(
                413,
                ErrorDetail(
                    message=f"request body is {int(declared)} bytes; the limit of {path} is {limit} bytes",
                    type=_ERROR_TYPES[413],
                    code=BodyTooLarge.code,
                ),
            )
            await response(scope, _drained, send)
            return
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise BodyTooLarge(
                        f"request body passed {limit} bytes, the limit of {path}; nothing was read past it"
                    )
            return message

        await self.app(scope, counted, send)


def carry_on_answer(request: Request, headers: Mapping[str, str]) -> None:
    """Headers every answer to this request carries, a refusal made before the door ran included: a door's
    hook that records a refused call (the gateway's span of it) names the record in the answer."""
    request.state.answer_headers = {**carried(request), **headers}


def carried(request: Request) -> dict[str, str]:
    return dict(getattr(request.state, "answer_headers", {}))


async def _drained() -> Message:
    return {"type": "http.disconnect"}


async def read_bounded(request: Request, limit: int) -> Request:
    """The request with its body read, refusing (413) by Content-Length or as soon as the streamed bytes
    pass `limit`: a router mounted without the app's BodyLimit (a test's app) still reads no more."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise DoorError(
            413, f"request body is {int(declared)} bytes; the limit here is {limit}", code="request_too_large"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise DoorError(
                413, f"request body passed {limit} bytes, the limit here; nothing was stored", code="request_too_large"
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        # The body once, then the connection's own messages (a disconnect) as usual.
        nonlocal replayed
        if replayed:
            return await request.receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, replay)


def first_problem(error: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of the first problem of a request that did not validate."""
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    return f"{'.'.join(location) or 'body'}: {first.get('msg', 'invalid request')}", ".".join(location) or None


# Told of a refusal raised before the endpoint ran: the request, the route's path, the status, the
# message, and the body as received. Who may be recorded is the hook's decision (serving logs only a
# caller whose key was checked).
RefusalHook = Callable[[Request, str, int, str, bytes], None]


class RefusalRoute(APIRoute):
    """A route that reads no body past its cap and tells its door of the refusals made before the
    endpoint ran (a body that does not validate, a rate limit): one class for every door that bounds
    bodies or records refusals. Build one configured for a router with `refusal_route`."""

    max_body_bytes: ClassVar[int | None] = None
    body_limits: ClassVar[Mapping[str, int]] = {}
    on_refused: ClassVar[RefusalHook | None] = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        limit = self.body_limits.get(self.path, self.max_body_bytes)
        hook = type(self).on_refused
        path = self.path

        async def guarded(request: Request) -> Response:
            if limit is not None and request.method not in ("GET", "HEAD"):
                request = await read_bounded(request, limit)
            try:
                return await handler(request)
            except RequestValidationError as error:
                if hook is not None:
                    hook(request, path, 422, first_problem(error)[0], await request.body())
                raise
            except RateLimited as error:
                if hook is not None:
                    hook(request, path, error.status, str(error), await request.body())
                raise

        return guarded


def refusal_route(
    *,
    max_body_bytes: int | None = None,
    body_limits: Mapping[str, int] | None = None,
    on_refused: RefusalHook | None = None,
) -> type[RefusalRoute]:
    """A RefusalRoute for one router: bodies of non-GET requests capped at `max_body_bytes`, or at
    `body_limits[path]` for the paths named there (None: no cap here); refusals told to `on_refused`."""
    settings: dict[str, Any] = {
        "max_body_bytes": max_body_bytes,
        "body_limits": dict(body_limits or {}),
        "on_refused": staticmethod(on_refused) if on_refused else None,
    }
    return type("RefusalRoute", (RefusalRoute,), settings)


def create_http_app(
    title: str,
    *,
    readiness: dict[str, ReadinessCheck] | None = None,
    facts: Mapping[str, Callable[[], str | None]] | None = None,
    routers: Sequence[APIRouter] = (),
    lifespan: Lifespan[FastAPI] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_limits: Mapping[str, int] | None = None,
) -> FastAPI:
    """A FastAPI app with the common endpoints and error handling; `routers` are the services' doors.

    Every request body is capped at `max_body_bytes`, or at the cap of the longest path prefix in `body_limits`.
    """
    app = FastAPI(title=title, lifespan=lifespan)
    checks = dict(readiness or {})
    refusals = RefusalLog()
    app.state.refusals = refusals
    app.add_middleware(BodyLimit, default_bytes=max_body_bytes, limits=dict(body_limits or {}), refusals=refusals)

    @app.get("/healthz", response_model=HealthStatus, tags=["ops"])
    async def healthz() -> HealthStatus:
        return HealthStatus(status="ok", service=title)

    @app.get("/readyz", response_model=HealthStatus, tags=["ops"], responses={503: {"model": HealthStatus}})
    async def readyz() -> Response:
        # Side by side and each bounded: a probe must answer within an orchestrator's probe timeout even
        # while a dependency hangs (a frozen Triton, a broker under load); slow counts as not ready.
        async def outcome(check: ReadinessCheck) -> str:
            try:
                await asyncio.wait_for(check(), READINESS_CHECK_TIMEOUT_S)
            except TimeoutError:
                return f"TimeoutError: no answer within {READINESS_CHECK_TIMEOUT_S} s"
            except Exception as error:  # noqa: BLE001 - a failing check is reported, not raised
                return f"{type(error).__name__}: {error}"
            return "ok"

        results = dict(zip(checks, await asyncio.gather(*(outcome(check) for check in checks.values())), strict=True))
        ready = all(value == "ok" for value in results.values())
        known = {name: value for name, fact in (facts or {}).items() if (value := fact()) is not None}
        body = HealthStatus(status="ok" if ready else "unavailable", service=title, checks=results, running=known)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(DoorError)
    async def door_error(request: Request, error: DoorError) -> JSONResponse:
        if error.status in REFUSED_STATUSES:
            refusals.record(error.status, error.detail.code, request.url.path)
        return error_response(error.status, error.detail, headers={**carried(request), **(error.headers or {})})

    @app.exception_handler(DomainError)
    async def domain_error(request: Request, error: DomainError) -> JSONResponse:
        status = status_of(error)
        if status in REFUSED_STATUSES:
            refusals.record(status, error.code, request.url.path)
        return error_response(
            status, ErrorDetail(message=str(error), type=error_type_of(status), param=error.param, code=error.code)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = getattr(error, "code", None)
        if error.status_code in REFUSED_STATUSES:
            refusals.record(error.status_code, code, request.url.path)
        return error_response(
            error.status_code,
            ErrorDetail(message=str(error.detail), type=_ERROR_TYPES.get(error.status_code, "server_error"), code=code),
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = first_problem(error)
        if len(error.errors()) > 1:
            message += f" (+{len(error.errors()) - 1} more)"
        return error_response(
            422, ErrorDetail(message=message, type="invalid_request_error", param=param), headers=carried(request)
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, ErrorDetail(message="internal error; the server log has the details", type="server_error")
        )

    for router in routers:
        app.include_router(router)
    return app
