"""The OpenAI-compatible door: /v1/chat/completions, /v1/completions, /v1/models.

Streaming sends the finished completion as server-sent events in OpenAI's chunk format (one content
chunk, a final chunk with the finish reason, then `[DONE]`); token-by-token streaming needs a
decoupled Triton model and is not done yet.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from contracts.http import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from services.runtime.http import DoorError
from services.serving.gateway import Completion, Gateway, GatewayError

ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 422, 503)}


def create_router(gateway: Callable[[], Gateway | None]) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["gateway"])

    def ready() -> Gateway:
        current = gateway()
        if current is None:
            raise DoorError(503, "serving is starting: the model is not loaded yet", code="not_ready")
        return current

    async def run(call) -> Completion:
        try:
            return await call
        except GatewayError as error:
            raise DoorError(error.status, str(error), code=error.code, param=error.param) from None

    @router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(request: ChatCompletionRequest):
        done = await run(ready().chat(request))
        if request.stream:
            first = {"delta": {"role": "assistant", "content": done.text}, "finish_reason": None}
            last = {"delta": {}, "finish_reason": done.finish_reason}
            return _sse(done, "chat.completion.chunk", [first, last])
        return ChatCompletionResponse(
            id=done.inference_id, created=done.created, model=done.model,
            choices=[ChatChoice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)],
            usage=_usage(done),
        )

    @router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(request: CompletionRequest):
        done = await run(ready().completion(request))
        if request.stream:
            return _sse(done, "text_completion", [{"text": done.text, "finish_reason": None}, {"text": "", "finish_reason": done.finish_reason}])
        return CompletionResponse(
            id=done.inference_id, created=done.created, model=done.model,
            choices=[CompletionChoice(text=done.text, finish_reason=done.finish_reason)], usage=_usage(done),
        )

    @router.get("/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=reference) for reference in ready().routes.references()])

    return router


def _usage(done: Completion) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens, total_tokens=done.prompt_tokens + done.completion_tokens)


def _sse(done: Completion, kind: str, choices: list[dict]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        for choice in choices:
            chunk = {"id": done.inference_id, "object": kind, "created": done.created, "model": done.model, "choices": [{"index": 0, **choice}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
