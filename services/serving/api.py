"""The OpenAI-compatible door: /v1/chat/completions, /v1/completions, /v1/models.

Callers present an API key with role `app` (or admin), as OpenAI clients send theirs:
`Authorization: Bearer <key>`. Each key's principal has its own token bucket (limits.py); a request
over it is a 429 with Retry-After. A request refused before its caller is known — no or a wrong key
(401), a role that may not call (403), a body refused before the key is checked (malformed JSON,
413) — writes nothing: neither Kafka nor ClickHouse, so whoever has no key cannot fill the platform's
storage or choose what it records. Once the key is checked, a refusal (a body that does not validate,
the rate limit) is logged as an errored inference of that principal, scrubbed like any other.

Trace context (trace_context.py): a valid W3C `traceparent` makes the call's server span a child of
the caller's span, and `tracestate` comes back unchanged; without one, or with one the W3C rules make
invalid, the call starts a new trace and is served all the same. Every answer from an inference
endpoint, errors included, carries a `traceparent` naming the gateway's span, and so does a refusal logged as
an errored inference (a body that does not validate, the rate limit); a caller refused before its key and role
are checked (401, 403) has no span, and its answer names none. `x-flywheel-session-id`
puts the call in a conversation; one that is not a session id (letters, digits and `._:/-`, at most
128) is refused with 422 rather than dropped, since the caller asked for something it would not get.

`stream: true` answers with server-sent events in OpenAI's chunk format as the tokens are decoded:
a chunk per decode step that produced text, a last chunk with the finish reason, then `[DONE]`.
Refusals and a Triton outage are still plain HTTP errors (the stream starts only once the first
piece is in); a failure after that ends the stream with an OpenAI error event.

A greedy or seeded request may be answered from the gateway's response cache (response_cache.py).
`Cache-Control: no-cache` asks for a fresh answer (which is then cached), `no-store` keeps the call
out of the cache altogether; every answer says what the cache did in `x-flywheel-cache`: hit, semantic
(a question of the same meaning, where the semantic cache is on), miss, bypass, uncacheable (sampled, or
an experiment's arm) or off.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse

from contracts.http import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from contracts.ids import SessionId
from services.runtime.auth import Principal
from services.runtime.http import DoorError, RateLimited, carry_on_answer, refusal_route, status_of
from services.serving.gateway import Completion, Gateway, GatewayError, ReplayedStream, Stream
from services.serving.limits import RateLimiter
from services.serving.response_cache import CacheUse
from services.serving.trace_context import (
    SESSION_HEADER,
    TRACEPARENT,
    TRACESTATE,
    CallerSpan,
    CallTrace,
    caller_span,
    valid_session_id,
)

T = TypeVar("T")

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 422, 429, 503)}
ENDPOINTS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}
CACHE_HEADER = "x-flywheel-cache"


def create_router(
    gateway: Callable[[], Gateway | None], *, guard: Callable[..., Principal], limiter: RateLimiter
) -> APIRouter:
    """`guard` is the API-key dependency (`Authenticator.require(Role.app)`); `limiter` the per-key buckets."""

    def refused(request: Request, path: str, status: int, message: str, body: bytes) -> None:
        """Refusals raised before an inference endpoint ran (body validation, rate limit) are logged as
        errored inferences; only of a caller whose key and role were checked (`caller` sets the
        principal): authentication and authorisation refusals (401, 403) are not."""
        endpoint = ENDPOINTS.get(path)
        principal = getattr(request.state, "principal", None)
        current = gateway()
        if endpoint is not None and current is not None and principal is not None:
            # The session header may be what was refused: a malformed one is left out, not stored.
            trace = CallTrace.start(_caller(request), valid_session_id(request.headers.get(SESSION_HEADER)))
            current.refused(endpoint, body, principal, status, message, trace)
            # The refusal is logged as a span of the caller's trace: its answer names that span, as any other does.
            carry_on_answer(request, trace.response_headers())

    def caller(request: Request, principal: Principal = Depends(guard)) -> Principal:
        request.state.principal = principal.name
        wait = limiter.take(principal.name)
        if wait:
            retry_after = limiter.retry_after(wait)
            raise RateLimited(
                f"rate limit exceeded for {principal.name}: {limiter.rate_per_s:g} requests/s, bursts of {limiter.burst}; retry after {retry_after} s",
                retry_after=retry_after,
            )
        return principal

    def call_trace(
        request: Request,
        session_id: Annotated[
            SessionId | None,
            Header(
                alias=SESSION_HEADER,
                description="The conversation this call belongs to (letters, digits and ._:/-, at most 128); stored on the call's spans and inference.",
            ),
        ] = None,
    ) -> CallTrace:
        """The call's server span: a child of the caller's `traceparent` span, or the root of a new trace."""
        return CallTrace.start(_caller(request), session_id)

    def cache_use(
        cache_control: Annotated[
            str | None,
            Header(
                alias="Cache-Control",
                description="`no-cache`: generate a fresh answer (then cached); `no-store`: neither read nor fill the response cache.",
            ),
        ] = None,
    ) -> CacheUse:
        return CacheUse.from_header(cache_control)

    # No body cap here: the app's BodyLimit holds every door of the process to its cap.
    router = APIRouter(prefix="/v1", tags=["gateway"], route_class=refusal_route(on_refused=refused))

    def ready() -> Gateway:
        current = gateway()
        if current is None:
            raise DoorError(503, "serving is starting: the model is not loaded yet", code="not_ready")
        return current

    @router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(
        request: ChatCompletionRequest,
        response: Response,
        principal: Principal = Depends(caller),
        trace: CallTrace = Depends(call_trace),
        cache: CacheUse = Depends(cache_use),
    ):
        if request.stream:
            stream = await _traced(ready().chat_stream(request, principal.name, trace, cache), trace)

            def piece(text: str, first: bool) -> dict:
                return {
                    "delta": {"role": "assistant", "content": text} if first else {"content": text},
                    "finish_reason": None,
                }

            return _sse(
                stream,
                "chat.completion.chunk",
                piece,
                lambda reason: {"delta": {}, "finish_reason": reason},
                headers=_answer_headers(trace, stream.cache),
            )
        done = await _traced(ready().chat(request, principal.name, trace, cache), trace)
        response.headers.update(_answer_headers(trace, done.cache))
        return ChatCompletionResponse(
            id=done.inference_id,
            created=done.created,
            model=done.model,
            choices=[ChatChoice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)],
            usage=_usage(done),
        )

    @router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(
        request: CompletionRequest,
        response: Response,
        principal: Principal = Depends(caller),
        trace: CallTrace = Depends(call_trace),
        cache: CacheUse = Depends(cache_use),
    ):
        if request.stream:
            stream = await _traced(ready().completion_stream(request, principal.name, trace, cache), trace)
            return _sse(
                stream,
                "text_completion",
                lambda text, _: {"text": text, "finish_reason": None},
                lambda reason: {"text": "", "finish_reason": reason},
                headers=_answer_headers(trace, stream.cache),
            )
        done = await _traced(ready().completion(request, principal.name, trace, cache), trace)
        response.headers.update(_answer_headers(trace, done.cache))
        return CompletionResponse(
            id=done.inference_id,
            created=done.created,
            model=done.model,
            choices=[CompletionChoice(text=done.text, finish_reason=done.finish_reason)],
            usage=_usage(done),
        )

    @router.get("/models", response_model=ModelList, responses=ERRORS)
    async def models(_: Principal = Depends(guard)) -> ModelList:
        return ModelList(data=[ModelCard(id=reference) for reference in ready().routes.references()])

    return router


def _answer_headers(trace: CallTrace, cache: str) -> dict[str, str]:
    """What every answer of an inference endpoint carries: its span in the trace, and what the cache did."""
    return {**trace.response_headers(), CACHE_HEADER: cache}


def _caller(request: Request) -> CallerSpan | None:
    return caller_span(request.headers.getlist(TRACEPARENT), request.headers.getlist(TRACESTATE))


async def _traced(call: Awaitable[T], trace: CallTrace) -> T:
    """The gateway's answer; a refusal or failure as the same error, naming the call's span too, so a
    caller can find in its trace the span that failed."""
    try:
        return await call
    except GatewayError as error:
        raise DoorError(
            status_of(error), str(error), param=error.param, code=error.code, headers=trace.response_headers()
        ) from error


def _usage(done: Completion) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


class _EventStream(StreamingResponse):
    """Closes its event generator however the response ends. Otherwise, when the server notices a
    departed client by a failed send (ASGI 2.4), the generator, and with it the Triton request,
    would be closed only whenever it is garbage-collected."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _sse(
    stream: Stream | ReplayedStream,
    kind: str,
    piece: Callable[[str, bool], dict],
    last: Callable[[str], dict],
    *,
    headers: dict[str, str],
) -> StreamingResponse:
    def event(choice: dict) -> str:
        chunk = {
            "id": stream.inference_id,
            "object": kind,
            "created": stream.created,
            "model": stream.model,
            "choices": [{"index": 0, **choice}],
        }
        return f"data: {json.dumps(chunk)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            first = True
            while not stream.done:
                text = await stream.next_piece()
                if text or first:
                    yield event(piece(text, first))
                    first = False
            yield event(last(stream.finish_reason or "stop"))
        except GatewayError as error:
            failure = ErrorDetail(
                message=str(error),
                type="server_error" if status_of(error) >= 500 else "invalid_request_error",
                code=error.code,
                param=error.param,
            )
            yield f"data: {json.dumps({'error': failure.model_dump()})}\n\n"
        finally:
            stream.close()
        yield "data: [DONE]\n\n"

    return _EventStream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
