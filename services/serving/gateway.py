"""The gateway's use cases: resolve the model, render and check the prompt, call Triton, log the inference.

Imports neither FastAPI nor Kafka: api.py translates HTTP to these calls, and the inference log
buffer publishes. Every request that gets this far ends in exactly one `inference.logged`, ok or error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts.events import InferenceLogged, InferenceStatus
from contracts.http import ChatCompletionRequest, CompletionRequest
from services.serving.inference_log import InferenceLogBuffer
from services.serving.routes import Route, Routes, UnknownModelError
from services.serving.settings import ServingSettings
from services.serving.triton import MODEL_NAME, TritonAnswer, TritonRow, infer_inputs, infer_outputs, parse_answer


class GatewayError(Exception):
    """A refusal with its HTTP status and OpenAI-style code/param."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


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
    route: Route | None = None
    prompt: str = ""


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
        triton_model: str = MODEL_NAME,
    ) -> None:
        self.routes = routes
        self._tokenizer = tokenizer
        self._url = triton_grpc_url
        self._settings = settings
        self._log = log_buffer
        self._loaded = loaded_adapters
        self._triton_model = triton_model
        self._client: Any = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def chat(self, request: ChatCompletionRequest) -> Completion:
        return await self._complete(_Call("chat.completions", request))

    async def completion(self, request: CompletionRequest) -> Completion:
        return await self._complete(_Call("completions", request))

    async def _complete(self, call: _Call) -> Completion:
        answer: TritonAnswer | None = None
        triton_ms = 0.0
        try:
            call.route = self._resolve(call.request.model)
            call.prompt = self._render(call)
            row = self._row(call)
            sent = time.perf_counter()
            answer = await self._infer(row)
            triton_ms = (time.perf_counter() - sent) * 1000
            if answer.error:
                # The adapter went away between resolving and batching (an unload raced this request).
                raise GatewayError(404, f"{call.route.label} is not loaded on this replica: {answer.error}", code="model_not_loaded", param="model")
        except GatewayError as error:
            self._emit(call, answer, triton_ms, error=str(error))
            raise
        self._emit(call, answer, triton_ms)
        return Completion(call.inference_id, int(time.time()), call.route.label, answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens)

    def _resolve(self, reference: str) -> Route:
        try:
            route = self.routes.resolve(reference)
        except UnknownModelError as error:
            raise GatewayError(404, str(error), code="model_not_found", param="model") from None
        if route.adapter_name is not None and route.adapter_name not in self._loaded():
            raise GatewayError(404, f"{route.label} is registered but not loaded on this replica", code="model_not_loaded", param="model")
        return route

    def _render(self, call: _Call) -> str:
        request = call.request
        if request.prompt_ref is not None:
            raise GatewayError(400, "prompt_ref is not supported by this gateway yet", code="unsupported", param="prompt_ref")
        if isinstance(request, ChatCompletionRequest):
            if not request.messages:
                raise GatewayError(400, "messages must not be empty", code="invalid_value", param="messages")
            messages = [{"role": message.role, "content": message.content or ""} for message in request.messages]
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return request.prompt

    def _row(self, call: _Call) -> TritonRow:
        request, limits = call.request, self._settings
        max_tokens = request.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens_limit:
            raise GatewayError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens_limit}", code="invalid_value", param="max_tokens")
        prompt_tokens = len(self._tokenizer.encode(call.prompt, add_special_tokens=False))
        if prompt_tokens == 0:
            raise GatewayError(400, "the prompt is empty", code="invalid_value", param="prompt")
        if prompt_tokens > limits.max_prompt_tokens:
            raise GatewayError(400, f"the prompt has {prompt_tokens} tokens, over the limit of {limits.max_prompt_tokens}", code="context_length_exceeded", param="messages" if call.endpoint == "chat.completions" else "prompt")
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        return TritonRow(call.prompt, call.route.adapter_name if call.route else None, max_tokens, request.temperature, request.top_p, request.seed, stop)

    async def _infer(self, row: TritonRow) -> TritonAnswer:
        import tritonclient.grpc.aio as triton_grpc
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            self._client = triton_grpc.InferenceServerClient(self._url)
        try:
            result = await self._client.infer(self._triton_model, infer_inputs(triton_grpc, row), outputs=infer_outputs(triton_grpc), client_timeout=self._settings.triton_timeout_s)
        except InferenceServerException as error:
            raise GatewayError(503, f"the inference server is unavailable: {error.message()}", code="triton_unavailable") from None
        return parse_answer(result)

    def _emit(self, call: _Call, answer: TritonAnswer | None, triton_ms: float, *, error: str | None = None) -> None:
        request, route = call.request, call.route
        total_ms = (time.perf_counter() - call.started) * 1000
        compute_ms = answer.compute_ms if answer else 0.0
        self._log.offer(
            InferenceLogged(
                inference_id=call.inference_id,
                model_name=route.model_name if route else request.model,
                adapter_version=route.adapter_version if route else None,
                route=route.route if route else "direct",
                endpoint=call.endpoint,
                user_id=request.user,
                input_messages=[message.model_dump(exclude_none=True) for message in request.messages] if isinstance(request, ChatCompletionRequest) else [],
                input_text=call.prompt,
                output_text=answer.text if answer and not error else "",
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
            ),
            correlation_id=call.inference_id,
        )
