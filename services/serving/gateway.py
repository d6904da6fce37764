"""The gateway's use cases: resolve the model, render and check the prompt, call Triton, log the inference.

Imports neither FastAPI nor Kafka: api.py translates HTTP to these calls, and the inference log
buffer publishes (scrubbed of personal data and secrets first). Every request that gets this far
ends in exactly one `inference.logged`, ok or error; an authenticated caller's request refused before
(bad body, rate limit) is logged by `refused`; a request without a valid key is never logged.

Each call is a span of a trace (trace_context.py): of the caller's, when it sent a valid `traceparent`,
else of a new one. Its inference.logged names the trace, the call's server span and the session; the
server span and its Triton, queue and compute spans (spans.py) travel with that inference through
the log buffer, so they are published, scrubbed, kept or dropped together.

A streamed request (`Stream`) is checked and sent to Triton, and its first piece awaited, before
any byte of the response goes out, so every refusal and a Triton outage are still HTTP errors;
after that, pieces are relayed as the batcher decodes them. A client that leaves mid-stream gets
its request cancelled on Triton (the cancel model), which frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts.events import InferenceLogged, InferenceStatus
from contracts.http import ChatCompletionRequest, CompletionRequest
from services.runtime import errors
from services.runtime.prompts import MissingVariable, PromptError, lead_with_prompt, render_template
from services.serving.inference_log import InferenceLogBuffer
from services.serving.prompt_routes import PromptChoice, PromptRoutes, UnknownPromptError
from services.serving.routes import Route, Routes, UnknownModelError
from services.serving.settings import ServingSettings
from services.serving.spans import TritonCall, call_spans
from services.serving.trace_context import CallTrace
from services.serving.triton import (
    CANCEL_MODEL_NAME,
    STREAM_MODEL_NAME,
    TritonAnswer,
    TritonRow,
    infer_inputs,
    infer_outputs,
    parse_answer,
)

log = logging.getLogger("flywheel.serving.gateway")

DISCONNECTED = "the client disconnected before the stream ended"
MAX_STOP_SEQUENCES = 4  # OpenAI's limit; each one is checked against the text after every token


class GatewayError(errors.DomainError):
    """A request the gateway refuses or cannot serve, with OpenAI's code and param; its kind says which."""


class NotServed(GatewayError, errors.NotFound):
    """The model, version or prompt asked for is not served here."""


class RequestRefused(GatewayError, errors.BadRequest):
    """A request the gateway cannot serve as asked (a limit, an empty prompt, a prompt that does not render)."""


class InferenceUnavailable(GatewayError, errors.Unavailable):
    """Triton cannot be reached; the same request may succeed once it is back."""


@dataclass
class Completion:
    inference_id: str
    created: int
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Call:
    endpoint: str
    request: ChatCompletionRequest | CompletionRequest
    inference_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    principal: str | None = None
    route: Route | None = None
    prompt_choice: PromptChoice | None = None
    prompt: str = ""
    holds: str | None = None  # the adapter this call keeps from being unloaded until it ends
    trace: CallTrace = field(default_factory=CallTrace.start)
    triton_sent_ns: int = 0  # unix ns when the request went to Triton; 0 while it has not
    triton_ended_ns: int = 0  # unix ns of Triton's last answer, or of the failure

    @property
    def sticky_key(self) -> str:
        """Canary and A/B buckets follow the end user, else the calling app's key."""
        return self.request.user or self.principal or self.inference_id

    @property
    def route_label(self) -> str:
        if self.route is not None and self.route.route == "canary":
            return "canary"
        if self.prompt_choice is not None and self.prompt_choice.route == "ab":
            return "ab"
        return self.route.route if self.route else "direct"


class Gateway:
    def __init__(
        self,
        *,
        routes: Routes,
        tokenizer: Any,
        triton_grpc_url: str,
        settings: ServingSettings,
        log_buffer: InferenceLogBuffer,
        loaded_adapters: Callable[[], set[str]],
        prompts: PromptRoutes | None = None,
        triton_model: str = STREAM_MODEL_NAME,
    ) -> None:
        self.routes = routes
        self.prompts = prompts or PromptRoutes()
        self._tokenizer = tokenizer
        self._url = triton_grpc_url
        self._settings = settings
        self._log = log_buffer
        self._loaded = loaded_adapters
        self._triton_model = triton_model
        self._client: Any = None
        self._background: set[asyncio.Task[None]] = set()
        self._in_flight: Counter[str] = Counter()

    def in_flight(self, adapter_name: str) -> int:
        """Calls routed to this adapter that have not ended: an unload waits for them (see handlers.py)."""
        return self._in_flight[adapter_name]

    async def retarget(self, triton_grpc_url: str) -> None:
        """Send the next requests to a restarted Triton at another address."""
        if triton_grpc_url == self._url:
            return
        client, self._url, self._client = self._client, triton_grpc_url, None
        if client is not None:
            await client.close()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None

    # `trace`: the call's place in its caller's trace (api.py reads it from the headers); by default a new trace.
    async def chat(
        self, request: ChatCompletionRequest, principal: str | None = None, trace: CallTrace | None = None
    ) -> Completion:
        return await self._complete(_call("chat.completions", request, principal, trace))

    async def completion(
        self, request: CompletionRequest, principal: str | None = None, trace: CallTrace | None = None
    ) -> Completion:
        return await self._complete(_call("completions", request, principal, trace))

    async def chat_stream(
        self, request: ChatCompletionRequest, principal: str | None = None, trace: CallTrace | None = None
    ) -> Stream:
        return await self._open_stream(_call("chat.completions", request, principal, trace))

    async def completion_stream(
        self, request: CompletionRequest, principal: str | None = None, trace: CallTrace | None = None
    ) -> Stream:
        return await self._open_stream(_call("completions", request, principal, trace))

    def refused(
        self, endpoint: str, body: bytes, principal: str, status: int, message: str, trace: CallTrace | None = None
    ) -> None:
        """Log an authenticated caller's request refused before it could be served (malformed body, rate
        limit) as an errored inference, with its server span. Never called for 401/403: who has no key
        writes nothing."""
        try:
            parsed = json.loads(body or b"{}")
        except ValueError:
            parsed = None
        fields = parsed if isinstance(parsed, dict) else {}
        model = fields.get("model")
        user = fields.get("user")
        metadata = fields.get("metadata")
        tags = (
            metadata
            if isinstance(metadata, dict)
            and all(isinstance(key, str) and isinstance(value, str) for key, value in metadata.items())
            else {}
        )
        # The user id and metadata go to their own fields, where they are hashed or scrubbed as identities;
        # left in the body text, an id that looks like nothing in particular would be kept as sent.
        text = (
            json.dumps(
                {key: value for key, value in fields.items() if key not in ("user", "metadata")}, ensure_ascii=False
            )
            if fields
            else body.decode(errors="replace")
        )
        trace = trace or CallTrace.start()
        model_name = model if isinstance(model, str) and model else "unknown"
        event = InferenceLogged(
            inference_id=str(uuid.uuid4()),
            model_name=model_name,
            endpoint=endpoint,
            user_id=user if isinstance(user, str) else None,
            principal=principal,
            input_text=text[:8000],
            finish_reason="error",
            status=InferenceStatus.error,
            error=f"{status}: {message}",
            started_at=datetime.now(UTC),
            metadata=tags,
            trace_id=trace.trace_id,
            span_id=trace.span_id,
            session_id=trace.session_id,
        )
        spans = call_spans(event, trace, requested_model=model_name, ended_at=datetime.now(UTC))
        self._log.offer(event, spans=spans)

    async def _complete(self, call: _Call) -> Completion:
        answer: TritonAnswer | None = None
        triton_ms = 0.0
        try:
            row = self._prepare(call)
            sent, call.triton_sent_ns = time.perf_counter(), time.time_ns()
            responses, answer = await self._send(row)
            call.triton_ended_ns = time.time_ns()
            responses.cancel()
            triton_ms = (time.perf_counter() - sent) * 1000
            _check_loaded(call, answer)
        except GatewayError as error:
            self._emit(call, answer, triton_ms, error=str(error))
            raise
        finally:
            self._release(call)
        self._emit(call, answer, triton_ms)
        return Completion(
            call.inference_id,
            int(time.time()),
            call.route.label,
            answer.text,
            answer.finish_reason,
            answer.prompt_tokens,
            answer.completion_tokens,
        )

    async def _open_stream(self, call: _Call) -> Stream:
        try:
            row = self._prepare(call)
            sent, call.triton_sent_ns = time.perf_counter(), time.time_ns()
            responses, first = await self._send(row, stream=True, request_id=call.inference_id)
        except BaseException as error:
            self._release(call)
            if isinstance(error, GatewayError):
                self._emit(call, None, 0.0, error=str(error))
            raise
        return Stream(self, call, responses, first, sent)  # it releases the adapter when it ends

    def _prepare(self, call: _Call) -> TritonRow:
        call.route = self._resolve(call.request.model, call.sticky_key)
        if call.route.adapter_name is not None:
            call.holds = call.route.adapter_name
            self._in_flight[call.holds] += 1
        call.prompt = self._render(call)
        return self._row(call)

    def _resolve(self, reference: str, sticky_key: str) -> Route:
        try:
            route = self.routes.resolve(reference, sticky_key)
        except UnknownModelError as error:
            raise NotServed(str(error), code="model_not_found", param="model") from None
        if route.adapter_name is not None and route.adapter_name not in self._loaded():
            raise NotServed(
                f"{route.label} is registered but not loaded on this replica", code="model_not_loaded", param="model"
            )
        return route

    def _release(self, call: _Call) -> None:
        if call.holds is not None:
            self._in_flight[call.holds] -= 1
            if not self._in_flight[call.holds]:
                del self._in_flight[call.holds]
            call.holds = None

    def _render(self, call: _Call) -> str:
        """The model input. A prompt_ref's rendered text leads: as the system message of a chat
        (or the user message when the chat has none), or before the text of a completion."""
        request = call.request
        rendered = self._render_ref(call) if request.prompt_ref is not None else None
        if isinstance(request, ChatCompletionRequest):
            messages = [{"role": message.role, "content": message.content or ""} for message in request.messages]
            if rendered is not None:
                messages = lead_with_prompt(messages, rendered)
            if not messages:
                raise RequestRefused("messages must not be empty", code="invalid_value", param="messages")
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return request.prompt if rendered is None else rendered + request.prompt

    def _render_ref(self, call: _Call) -> str:
        reference = call.request.prompt_ref
        assert reference is not None
        try:
            call.prompt_choice = choice = self.prompts.resolve(reference, call.sticky_key)
        except UnknownPromptError as error:
            raise NotServed(str(error), code="prompt_not_found", param="prompt_ref") from None
        try:
            return render_template(choice.template, reference.variables, needs=choice.variables)
        except MissingVariable as error:
            missing = ", ".join(error.missing) or str(error)
            raise RequestRefused(
                f"prompt {choice.name}:v{choice.version} needs variable(s) {missing}",
                code="missing_variable",
                param="prompt_ref.variables",
            ) from None
        except PromptError as error:
            raise RequestRefused(
                f"prompt {choice.name}:v{choice.version} cannot be rendered: {error}",
                code="invalid_prompt",
                param="prompt_ref",
            ) from None

    def _row(self, call: _Call) -> TritonRow:
        request, limits = call.request, self._settings
        max_tokens = request.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens_limit:
            raise RequestRefused(
                f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens_limit}",
                code="invalid_value",
                param="max_tokens",
            )
        prompt_tokens = len(self._tokenizer.encode(call.prompt, add_special_tokens=False))
        if prompt_tokens == 0:
            raise RequestRefused("the prompt is empty", code="invalid_value", param="prompt")
        if prompt_tokens > limits.max_prompt_tokens:
            raise RequestRefused(
                f"the prompt has {prompt_tokens} tokens, over the limit of {limits.max_prompt_tokens}",
                code="context_length_exceeded",
                param="messages" if call.endpoint == "chat.completions" else "prompt",
            )
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        if len(stop) > MAX_STOP_SEQUENCES:
            raise RequestRefused(
                f"stop has {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                code="invalid_value",
                param="stop",
            )
        if request.seed is not None and not 0 <= request.seed < 2**63:
            raise RequestRefused(
                f"seed {request.seed} is out of range: use an integer from 0 to 2**63 - 1",
                code="invalid_value",
                param="seed",
            )
        return TritonRow(
            call.prompt,
            call.route.adapter_name if call.route else None,
            max_tokens,
            request.temperature,
            request.top_p,
            request.seed,
            stop,
        )

    def _connect(self) -> Any:
        import tritonclient.grpc.aio as triton_grpc

        if self._client is None:
            self._client = triton_grpc.InferenceServerClient(self._url)
        return self._client

    async def _send(
        self, row: TritonRow, *, stream: bool = False, request_id: str = ""
    ) -> tuple[_Responses, TritonAnswer]:
        """Open a gRPC stream to the decoupled model (the request joins the running batch at once) and
        await its first response: the whole answer, or with `stream` the first piece."""
        import tritonclient.grpc.aio as triton_grpc

        client = self._connect()

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self._triton_model,
                "inputs": infer_inputs(triton_grpc, row, stream=stream, request_id=request_id),
                "outputs": infer_outputs(triton_grpc),
            }

        responses = _Responses(
            client.stream_infer(one_request(), stream_timeout=self._settings.triton_timeout_s), client
        )
        try:
            return responses, await self._next(responses)
        except BaseException:
            responses.cancel()
            raise

    async def _next(self, responses: _Responses) -> TritonAnswer:
        import grpc
        from tritonclient.utils import InferenceServerException

        try:
            result, error = await anext(responses.calls)
            if error is not None:
                raise error
            return parse_answer(result)
        except StopAsyncIteration:
            reason = "the stream closed without an answer"
        except (InferenceServerException, grpc.RpcError) as error:
            # The stream's errors come unwrapped from grpc, unlike unary calls' InferenceServerException.
            reason = error.message() if isinstance(error, InferenceServerException) else error.details()  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # grpc raises CancelledError in every call of a channel that is closed under it: another
            # request found Triton gone and closed the channel this one shared. Not a cancelled request.
            reason = "the connection to it was closed after another request failed"
        # A fresh channel next time: one that saw Triton go away can keep failing after it is back.
        # Only the channel this call used: a newer one may already be serving other requests.
        if responses.client is self._client:
            self._client = None
            await responses.client.close()
        raise InferenceUnavailable(f"the inference server is unavailable: {reason}", code="triton_unavailable")

    def _cancel_soon(self, request_id: str) -> None:
        """Ask Triton to drop a stream's request; fire and forget, since the caller may be a cancelled task."""
        task = asyncio.get_running_loop().create_task(self._cancel(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, request_id: str) -> None:
        import numpy as np
        import tritonclient.grpc.aio as triton_grpc

        request = triton_grpc.InferInput("request_id", [1, 1], "BYTES")
        request.set_data_from_numpy(np.array([[request_id.encode()]], dtype=np.object_))
        try:
            await self._connect().infer(CANCEL_MODEL_NAME, [request], client_timeout=self._settings.triton_timeout_s)
        except Exception as error:  # noqa: BLE001 - the request then runs to max_tokens; nothing else is lost
            log.warning("could not cancel abandoned request %s on Triton: %s", request_id, error)

    def _emit(self, call: _Call, answer: TritonAnswer | None, triton_ms: float, *, error: str | None = None) -> None:
        request, route = call.request, call.route
        total_ms = (time.perf_counter() - call.started) * 1000
        compute_ms = answer.compute_ms if answer else 0.0
        event = InferenceLogged(
            inference_id=call.inference_id,
            model_name=route.model_name if route else request.model,
            adapter_version=route.adapter_version if route else None,
            prompt_name=call.prompt_choice.name if call.prompt_choice else None,
            prompt_version=call.prompt_choice.version if call.prompt_choice else None,
            route=call.route_label,
            endpoint=call.endpoint,
            user_id=request.user,
            principal=call.principal,
            input_messages=[message.model_dump(exclude_none=True) for message in request.messages]
            if isinstance(request, ChatCompletionRequest)
            else [],
            input_text=call.prompt,
            output_text=answer.text if answer else "",
            finish_reason="error" if error else (answer.finish_reason if answer else None),
            prompt_tokens=answer.prompt_tokens if answer else 0,
            completion_tokens=answer.completion_tokens if answer else 0,
            latency_queue_ms=max(triton_ms - compute_ms, 0.0),
            latency_compute_ms=compute_ms,
            latency_total_ms=total_ms,
            status=InferenceStatus.error if error else InferenceStatus.ok,
            error=error,
            started_at=call.started_at,
            metadata=dict(request.metadata),
            trace_id=call.trace.trace_id,
            span_id=call.trace.span_id,
            session_id=call.trace.session_id,
        )
        triton = None
        if call.triton_sent_ns:
            triton = TritonCall(self._triton_model, call.triton_sent_ns, call.triton_ended_ns or time.time_ns())
        spans = call_spans(
            event, call.trace, requested_model=request.model, ended_at=datetime.now(UTC), triton=triton, answer=answer
        )
        self._log.offer(event, correlation_id=call.inference_id, spans=spans)


def _call(
    endpoint: str, request: ChatCompletionRequest | CompletionRequest, principal: str | None, trace: CallTrace | None
) -> _Call:
    return _Call(endpoint, request, principal=principal, trace=trace or CallTrace.start())


@dataclass
class _Responses:
    """One gRPC stream to Triton and the channel it runs on."""

    calls: Any
    client: Any

    def cancel(self) -> None:
        self.calls.cancel()


def _check_loaded(call: _Call, answer: TritonAnswer) -> None:
    if answer.error:
        # The adapter went away between resolving and batching (an unload raced this request).
        raise NotServed(
            f"{call.route.label if call.route else call.request.model} is not loaded on this replica: {answer.error}",
            code="model_not_loaded",
            param="model",
        )


class Stream:
    """A completion relayed piece by piece as Triton decodes it.

    Ends in exactly one `inference.logged` with the whole output, however it ends: finished,
    failed mid-way, or closed early because the client left (then the request is cancelled on
    Triton and the log has the text sent so far).
    """

    def __init__(self, gateway: Gateway, call: _Call, responses: _Responses, first: TritonAnswer, sent: float) -> None:
        assert call.route is not None
        self.inference_id = call.inference_id
        self.created = int(time.time())
        self.model = call.route.label
        self.finish_reason: str | None = None
        self._gateway = gateway
        self._call = call
        self._responses = responses
        self._pending: TritonAnswer | None = first
        self._sent = sent
        self._pieces: list[str] = []
        self._ended = False

    @property
    def done(self) -> bool:
        return self._ended

    async def next_piece(self) -> str:
        """The next piece of text (possibly empty); `done` turns true with the last one."""
        try:
            answer = self._pending or await self._gateway._next(self._responses)
        except GatewayError as error:
            self._end(None, str(error))
            raise
        self._pending = None
        self._pieces.append(answer.text)
        if answer.finish_reason:
            try:
                _check_loaded(self._call, answer)
            except GatewayError as error:
                self._end(answer, str(error))
                raise
            self.finish_reason = answer.finish_reason
            self._end(answer, None)
        return answer.text

    def close(self) -> None:
        """Release the Triton stream; before the last piece, the client left: cancel the request there."""
        self._responses.cancel()
        if not self._ended:
            self._gateway._cancel_soon(self.inference_id)
            self._end(None, DISCONNECTED)

    def _end(self, final: TritonAnswer | None, error: str | None) -> None:
        self._ended = True
        self._call.triton_ended_ns = time.time_ns()
        self._gateway._release(self._call)
        text = "".join(self._pieces)
        answer = dataclasses.replace(final, text=text) if final else TritonAnswer(text, "error", 0, 0, 0.0, error or "")
        self._gateway._emit(self._call, answer, (time.perf_counter() - self._sent) * 1000, error=error)
