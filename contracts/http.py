"""HTTP request and response models shared by services and their clients.

Every door answers errors with the same body as OpenAI's API (`{"error": {...}}`) so that one
client-side handler serves the gateway and the internal doors alike. Request models forbid unknown
fields: a typo in a request is an error, not a silently ignored option.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from contracts.events import DatasetRef, FeedbackSource, Hyperparameters, ModelTarget, Thumbs

T = TypeVar("T")


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------------ common


class ErrorDetail(Response):
    message: str = Field(description="What went wrong and what to do about it.")
    type: str = Field(description="Error class: invalid_request_error, authentication_error, permission_error, not_found_error, conflict_error, rate_limit_error, server_error, service_unavailable.")
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    code: str | None = Field(default=None, description="Machine-readable code, e.g. model_not_found.")


class ErrorResponse(Response):
    error: ErrorDetail = Field(description="The error.")


class Page(Response, Generic[T]):
    items: list[T] = Field(description="This page's items.")
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` to get the next page; none on the last page.")
    total: int | None = Field(default=None, ge=0, description="Total number of items, when cheap to count.")


class HealthStatus(Response):
    status: Literal["ok", "degraded", "unavailable"] = Field(description="Overall state.")
    service: str = Field(description="Service or process name.")
    checks: dict[str, str] = Field(default_factory=dict, description="Each dependency and its state (`ok` or the error).")


# ---------------------------------------------------------------------------------------- feedback


class FeedbackCreate(Request):
    inference_id: str = Field(min_length=1, max_length=128, description="Inference the feedback is about (the gateway response id).")
    thumbs: Thumbs | None = Field(default=None, description="Thumbs up or down.")
    rating: int | None = Field(default=None, ge=1, le=5, description="Rating from 1 to 5.")
    comment: str | None = Field(default=None, max_length=8000, description="Free-text comment.")
    correction: str | None = Field(default=None, max_length=32000, description="The answer that should have been given.")
    tags: list[str] = Field(default_factory=list, max_length=32, description="Labels, e.g. wrong-fact.")
    source: FeedbackSource = Field(default=FeedbackSource.end_user, description="Who gives it.")
    actor: str | None = Field(default=None, max_length=256, description="Id of the person or judge.")


class FeedbackAccepted(Response):
    feedback_id: str = Field(description="Id of the stored feedback.")
    event_id: str = Field(description="Id of the `feedback.received` event published.")


# ----------------------------------------------------------------------------------------- trainer


class TrainingJobCreate(Request):
    model_name: str = Field(description="Base model to adapt.")
    dataset: DatasetRef = Field(description="Training dataset version.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="LoRA settings.")
    job_id: str | None = Field(default=None, description="Idempotency key; generated when absent.")


class TrainingJobView(Response):
    job_id: str = Field(description="Job id.")
    model_name: str = Field(description="Base model.")
    dataset: DatasetRef = Field(description="Dataset version.")
    status: Literal["queued", "running", "completed", "failed", "cancelled"] = Field(description="Job state.")
    step: int = Field(default=0, description="Optimiser steps done.")
    total_steps: int = Field(default=0, description="Optimiser steps planned.")
    loss: float | None = Field(default=None, description="Last logged loss.")
    error: str | None = Field(default=None, description="Why it failed.")


# --------------------------------------------------------------------------------------- evaluator


class EvaluationCreate(Request):
    candidate: ModelTarget = Field(description="What to judge.")
    baseline: ModelTarget | None = Field(default=None, description="What to compare with; none: current production.")
    golden: DatasetRef = Field(description="Golden dataset version.")
    metric_suite: str = Field(default="default", description="Named metric suite.")


# ----------------------------------------------------------------------------------------- monitor


class QueryRequest(Request):
    sql: str = Field(min_length=1, max_length=100_000, description="A read-only ClickHouse SQL query.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Server-side query parameters ({name:Type} placeholders).")
    max_rows: int = Field(default=10_000, ge=1, le=1_000_000, description="Rows returned at most.")


class QueryResult(Response):
    columns: list[str] = Field(description="Column names.")
    rows: list[list[Any]] = Field(description="Rows, each a list in column order.")
    row_count: int = Field(ge=0, description="Rows returned.")
    truncated: bool = Field(default=False, description="Whether max_rows cut the result.")
    elapsed_ms: float = Field(ge=0, description="Server time spent.")


# ---------------------------------------------------------------------- OpenAI-compatible gateway


class ChatMessage(Request):
    role: Literal["system", "user", "assistant", "tool", "developer"] = Field(description="Author of the message.")
    content: str | None = Field(default=None, description="Message text.")
    name: str | None = Field(default=None, description="Optional author name.")


class PromptReference(Request):
    name: str = Field(description="Registered prompt name.")
    version: int | None = Field(default=None, ge=1, description="Version; none: the version the label points at.")
    label: str | None = Field(default=None, description="Label, e.g. production; used when version is none.")
    variables: dict[str, str] = Field(default_factory=dict, description="Values for the template's variables.")


class _SamplingRequest(Request):
    model: str = Field(min_length=1, description="`name` (production), `name@stage`, or `name:vN`.")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stream: bool = Field(default=False, description="Stream tokens as server-sent events.")
    stop: str | list[str] | None = Field(default=None, description="Sequences that end generation.")
    seed: int | None = Field(default=None, description="Sampling seed.")
    user: str | None = Field(default=None, max_length=256, description="End-user id: canary stickiness and feedback analysis.")
    n: int = Field(default=1, ge=1, le=1, description="Choices to return (only 1 is supported).")
    prompt_ref: PromptReference | None = Field(default=None, description="Flywheel extension: render a registered prompt server-side.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Free-form tags stored with the inference.")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(default_factory=list, description="The conversation so far.")


class CompletionRequest(_SamplingRequest):
    prompt: str = Field(description="Prompt text.")


class Usage(Response):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="Generated text.")


class ChatChoice(Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = Field(default=None, description="stop or length.")


class ChatCompletionResponse(Response):
    id: str = Field(description="The inference id; feedback refers to it.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix seconds.")
    model: str = Field(description="The resolved model, e.g. `name:v3`.")
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(Response):
    index: int = 0
    text: str
    finish_reason: str | None = None


class CompletionResponse(Response):
    id: str = Field(description="The inference id; feedback refers to it.")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(Response):
    id: str = Field(description="Model reference usable in the `model` field.")
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "flywheel"


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


HTTP_MODELS: tuple[type[BaseModel], ...] = (
    ErrorResponse,
    HealthStatus,
    FeedbackCreate,
    FeedbackAccepted,
    TrainingJobCreate,
    TrainingJobView,
    EvaluationCreate,
    QueryRequest,
    QueryResult,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
