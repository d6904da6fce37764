"""HTTP request and response models shared by services and their clients.

Every door answers errors with the same body as OpenAI's API (`{"error": {...}}`) so that one
client-side handler serves the gateway and the internal doors alike. Request models forbid unknown
fields: a typo in a request is an error, not a silently ignored option.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from contracts.events import (
    ATTACHED_ONCE,
    DatasetRef,
    EvaluationCompleted,
    FeedbackSource,
    FeedbackTarget,
    GuardPolicySpec,
    Hyperparameters,
    ModelTarget,
    ServedRoute,
    Stage,
    Thumbs,
    check_preference_dataset,
    feedback_target,
)
from contracts.ids import (
    DatasetName,
    GuardPolicyName,
    JobId,
    MetricSuiteName,
    ModelName,
    Name,
    PromptLabel,
    PromptName,
    ReviewQueueName,
    RubricName,
    SessionId,
    Sha256,
    SpanId,
    TraceId,
    VersionNumber,
)

T = TypeVar("T")


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------------ common


class ErrorDetail(Response):
    message: str = Field(description="What went wrong and what to do about it.")
    type: str = Field(
        description="Error class: invalid_request_error, authentication_error, permission_error, not_found_error, conflict_error, rate_limit_error, server_error, service_unavailable."
    )
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    code: str | None = Field(default=None, description="Machine-readable code, e.g. model_not_found.")


class ErrorResponse(Response):
    error: ErrorDetail = Field(description="The error.")


class Page(Response, Generic[T]):
    items: list[T] = Field(description="This page's items.")
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` to get the next page; none on the last page."
    )
    total: int | None = Field(default=None, ge=0, description="Total number of items, when cheap to count.")


class Role(StrEnum):
    """What an API key may do: admin (everything, keys), operator (changes), approver (approves production
    promotions it did not request), reviewer (reviews; its corrections may feed retraining), app (the
    gateway, feedback and events for its own traffic; reads nothing else), viewer (reads)."""

    admin = "admin"
    operator = "operator"
    approver = "approver"
    reviewer = "reviewer"
    app = "app"
    viewer = "viewer"


class HealthStatus(Response):
    status: Literal["ok", "degraded", "unavailable"] = Field(description="Overall state.")
    service: str = Field(description="Service or process name.")
    checks: dict[str, str] = Field(
        default_factory=dict, description="Each dependency and its state (`ok` or the error)."
    )
    running: dict[str, str] = Field(
        default_factory=dict,
        description="What the process runs with, once known, e.g. `serving.engine_dtype`: `bfloat16` or `float32`.",
    )


# ---------------------------------------------------------------------------------------- feedback


class FeedbackTargetIds(Request):
    """Exactly one target of feedback: an inference (inference_id), a span (trace_id and span_id), a trace
    (trace_id alone) or a session (session_id). What `GET /feedback/v1/feedback` reads by; FeedbackCreate
    names its target the same way."""

    # Not an InferenceId: the door checks its alphabet itself and says what to send (services/feedback).
    inference_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Inference the feedback is about (the gateway response id).",
    )
    trace_id: TraceId | None = Field(
        default=None,
        description="Trace the feedback is about (32 lowercase hex digits, as `flywheel ops traces` lists them); with span_id, the trace of the span.",
    )
    span_id: SpanId | None = Field(
        default=None, description="Span the feedback is about (16 lowercase hex digits), within trace_id."
    )
    session_id: SessionId | None = Field(default=None, description="Session (conversation) the feedback is about.")

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        # The rule is about the request as a whole, so a 422 names no field: `body: Value error, feedback names ...`.
        feedback_target(self.inference_id, self.trace_id, self.span_id, self.session_id)
        return self

    @property
    def target(self) -> FeedbackTarget:
        return feedback_target(self.inference_id, self.trace_id, self.span_id, self.session_id)


class FeedbackCreate(FeedbackTargetIds):
    """Feedback on exactly one target: an inference (inference_id), a span (trace_id and span_id), a trace
    (trace_id alone) or a session (session_id)."""

    thumbs: Thumbs | None = Field(default=None, description="Thumbs up or down.")
    rating: int | None = Field(default=None, ge=1, le=5, description="Rating from 1 to 5.")
    comment: str | None = Field(default=None, max_length=8000, description="Free-text comment.")
    correction: str | None = Field(
        default=None, max_length=32000, description="The answer that should have been given."
    )
    tags: list[str] = Field(default_factory=list, max_length=32, description="Labels, e.g. wrong-fact.")
    source: FeedbackSource = Field(default=FeedbackSource.end_user, description="Who gives it.")
    actor: str | None = Field(
        default=None,
        max_length=256,
        description="Id of the person or judge; a reviewer's is the principal of the key that sends it (omit it, or send that principal).",
    )


class FeedbackAccepted(Response):
    feedback_id: str = Field(description="Id of the stored feedback.")
    event_id: str = Field(
        description="Id of the event published: `feedback.received`, or `feedback.reviewed` for a reviewer's feedback."
    )


class FeedbackView(Response):
    feedback_id: str = Field(description="Id of the feedback.")
    inference_id: str | None = Field(default=None, description="Inference it is about, when its target is one.")
    trace_id: str | None = Field(default=None, description="Trace it is about (with span_id, the span's trace).")
    span_id: str | None = Field(default=None, description="Span it is about, within trace_id.")
    session_id: str | None = Field(default=None, description="Session it is about.")
    occurred_at: datetime = Field(description="When it was given (UTC).")
    thumbs: str | None = Field(default=None, description="up or down.")
    rating: int | None = Field(default=None, description="1 to 5.")
    comment: str | None = Field(default=None, description="Comment, personal data removed.")
    correction: str | None = Field(default=None, description="Corrected answer, personal data removed.")
    tags: list[str] = Field(default_factory=list, description="Labels.")
    source: str = Field(description="end_user, reviewer or judge.")
    actor: str | None = Field(default=None, description="Who gave it.")


class FeedbackList(Response):
    target: FeedbackTarget = Field(description="What was asked about: an inference, a span, a trace or a session.")
    inference_id: str | None = Field(default=None, description="The inference asked about, if that was the target.")
    trace_id: str | None = Field(default=None, description="The trace asked about (with span_id, the span's trace).")
    span_id: str | None = Field(default=None, description="The span asked about, within trace_id.")
    session_id: str | None = Field(default=None, description="The session asked about.")
    stored: bool = Field(
        description="Whether the target itself is stored yet (the inference, or a span of the trace or session); "
        "feedback may arrive first and joins when it lands."
    )
    inference_stored: bool | None = Field(
        default=None, description="For an inference, the same as `stored` (the name this answer always had)."
    )
    items: list[FeedbackView] = Field(description="Stored feedback on exactly this target, oldest first.")


# ----------------------------------------------------------------------------------------- trainer


class TrainingJobCreate(Request):
    model_name: ModelName = Field(description="Base model to adapt.")
    dataset: DatasetRef = Field(description="Training dataset version.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="LoRA settings.")
    start_adapter_version: int | None = Field(
        default=None,
        ge=1,
        le=2**63 - 1,
        description="Version of one of model_name's adapters to go on training (SFT then DPO: the SFT adapter); the hyperparameters state its LoRA shape; for DPO it is also the reference. None: a new adapter.",
    )
    preference_dataset: DatasetRef | None = Field(
        default=None,
        description="sft_then_dpo only, and required there: the preference records of the DPO stage; `dataset` holds the SFT stage's chat records.",
    )
    job_id: JobId | None = Field(
        default=None,
        description="Idempotency key; generated when absent. It names the job's work directory, so it is an id, never a path.",
    )

    @model_validator(mode="after")
    def _preference_dataset_fits_method(self) -> Self:
        # Refused at the door with a 422 naming the field, not later as a 500 from building TrainingRequested.
        check_preference_dataset(self.hyperparameters.method, self.preference_dataset)
        return self


class TrainingJobView(Response):
    job_id: str = Field(description="Job id.")
    model_name: str = Field(description="Base model.")
    dataset: DatasetRef = Field(description="Dataset version.")
    start_adapter_version: int | None = Field(default=None, description="Adapter version the job goes on training.")
    preference_dataset: DatasetRef | None = Field(
        default=None, description="sft_then_dpo: the preference dataset version of its DPO stage."
    )
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
    metric_suite: MetricSuiteName = Field(default="default", description="Named metric suite.")


class EvaluationStatus(Response):
    evaluation_id: str = Field(description="Evaluation id.")
    status: str = Field(description="queued, running, completed or failed.")
    request: dict[str, Any] = Field(description="What was asked: candidate, baseline, golden set, suite.")
    result: EvaluationCompleted | None = Field(
        default=None, description="The evaluation.completed payload, once finished."
    )
    created_at: str = Field(description="When it was requested (UTC, ISO 8601).")
    updated_at: str = Field(description="When its status last changed (UTC, ISO 8601).")


class EvaluationList(Response):
    data: list[EvaluationStatus] = Field(description="Evaluations, newest first.")


# ----------------------------------------------------------------------------------------- monitor


class QueryRequest(Request):
    sql: str = Field(min_length=1, max_length=100_000, description="A read-only ClickHouse SQL query.")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Server-side query parameters ({name:Type} placeholders)."
    )
    max_rows: int = Field(default=10_000, ge=1, le=1_000_000, description="Rows returned at most.")


class QueryResult(Response):
    columns: list[str] = Field(description="Column names.")
    rows: list[list[Any]] = Field(description="Rows, each a list in column order.")
    row_count: int = Field(ge=0, description="Rows returned.")
    truncated: bool = Field(default=False, description="Whether max_rows cut the result.")
    elapsed_ms: float = Field(ge=0, description="Server time spent.")


# ---------------------------------------------------------------------------------------- registry


class RegistryView(Response):
    # Views are read straight off the registry's table rows.
    model_config = ConfigDict(extra="ignore", from_attributes=True)


class BaseModelCreate(Request):
    name: ModelName = Field(description="Registered name.")
    source: str = Field(min_length=1, max_length=1000, description="Package, directory or hub id it came from.")
    architecture: str = Field(
        min_length=1, max_length=200, description="Transformers architecture, e.g. LlamaForCausalLM."
    )
    parameter_count: int = Field(ge=0, description="Number of parameters.")
    artifact_uri: str = Field(
        min_length=1, max_length=2000, description="Where its safetensors are stored (artifact store)."
    )
    artifact_sha256: Sha256 = Field(description="Digest of the stored weights.")
    license: str | None = Field(default=None, max_length=200, description="License identifier, e.g. apache-2.0.")
    chat_template: str | None = Field(default=None, description="The tokenizer's chat template.")


class BaseModelView(RegistryView):
    name: str = Field(description="Registered name.")
    source: str = Field(description="Package, directory or hub id it came from.")
    architecture: str = Field(description="Transformers architecture.")
    parameter_count: int = Field(description="Number of parameters.")
    license: str | None = Field(description="License identifier.")
    artifact_uri: str = Field(description="Where its safetensors are stored.")
    artifact_sha256: str = Field(description="Digest of the stored weights.")
    chat_template: str | None = Field(description="The tokenizer's chat template.")
    details: dict[str, Any] = Field(description="Further facts recorded at import (dtype, sizes, tokenizer).")
    created_at: datetime = Field(description="When it was registered (UTC).")
    created_by: str = Field(description="Principal that registered it.")


class AdapterVersionCreate(Request):
    model_name: ModelName = Field(description="Base model the adapter adapts.")
    artifact_uri: str = Field(
        min_length=1, max_length=2000, description="The adapter directory's manifest in the artifact store."
    )
    artifact_sha256: Sha256 = Field(description="Digest of that manifest; checked before registering.")
    training_job_id: JobId | None = Field(
        default=None, description="Training job that produced it; one adapter per job."
    )
    dataset: DatasetRef | None = Field(default=None, description="Dataset version it was trained on.")
    hyperparameters: Hyperparameters | None = Field(default=None, description="LoRA settings it was trained with.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Training metrics, e.g. final_loss.")


class AdapterVersionView(RegistryView):
    model_name: str = Field(description="Base model.")
    version: int = Field(description="Version number, per model, from 1.")
    stage: Stage = Field(description="Current stage.")
    canary_percent: float | None = Field(
        description="Share of production traffic when this version is the declared canary."
    )
    artifact_uri: str = Field(description="The adapter directory's manifest in the artifact store.")
    artifact_sha256: str = Field(description="Digest of that manifest.")
    training_job_id: str | None = Field(description="Training job that produced it.")
    dataset_name: str | None = Field(description="Dataset it was trained on.")
    dataset_version: int | None = Field(description="Version of that dataset.")
    preference_dataset_name: str | None = Field(
        default=None,
        description="sft_then_dpo: the preference dataset of its DPO stage (dataset_name is the SFT stage's).",
    )
    preference_dataset_version: int | None = Field(default=None, description="Version of that preference dataset.")
    hyperparameters: dict[str, Any] | None = Field(description="LoRA settings it was trained with.")
    metrics: dict[str, Any] = Field(description="Training metrics.")
    created_at: datetime = Field(description="When it was registered (UTC).")
    created_by: str = Field(description="Principal or service that registered it.")


class StageTransition(Request):
    to_stage: Stage = Field(description="Target stage.")
    approver: str | None = Field(
        default=None,
        max_length=256,
        description="Ignored (kept so older clients still parse): a production promotion needs an approval recorded by an approver beforehand (POST .../approvals); the audit log names that principal.",
    )
    reason: str | None = Field(default=None, max_length=2000, description="Why, in words.")
    canary_percent: float | None = Field(
        default=None, gt=0, lt=100, description="Declare this production version a canary with this share of traffic."
    )
    replaces: int | None = Field(
        default=None, ge=1, description="The production version this one replaces (compare-and-swap); it is archived."
    )


class EvaluationView(RegistryView):
    evaluation_id: str = Field(description="Evaluation id.")
    model_name: str = Field(description="Base model of the candidate.")
    adapter_version: int | None = Field(description="Adapter version judged; none: the base model.")
    passed: bool = Field(description="Whether the gate passed.")
    status: str = Field(description="completed, or why it did not complete.")
    gate_policy: str = Field(description="Gate policy and version applied.")
    golden_name: str = Field(description="Golden dataset.")
    golden_version: int = Field(description="Golden dataset version.")
    reasons: list[Any] = Field(
        description="Why the gate passed or failed, in words."
    )  # published with untyped items: list[str] would change the contract
    report_uri: str | None = Field(description="The full report in the artifact store.")
    created_at: datetime = Field(description="When the result was attached (UTC).")


class BaseModelRef(Response):
    name: str = Field(description="Registered name.")
    source: str = Field(description="Package, directory or hub id it came from.")
    artifact_sha256: str = Field(description="Digest of the stored weights.")


class DatasetVersionView(RegistryView):
    name: str = Field(description="Dataset name.")
    version: int = Field(description="Version number, per name, from 1.")
    split: str = Field(description="train or golden.")
    record_format: str = Field(description="chat, instruction or preference.")
    row_count: int = Field(description="Number of records.")
    sha256: str = Field(description="Digest of the JSONL file.")
    artifact_uri: str = Field(description="Where the JSONL is stored.")
    provenance: str = Field(
        description="uploaded, feedback (built from corrections) or preferences (built from feedback as preference pairs)."
    )
    model_name: str | None = Field(description="Model it is meant for, if any.")
    created_at: datetime = Field(description="When it was published (UTC).")
    created_by: str = Field(description="Principal that published it.")


class LineageView(Response):
    adapter: AdapterVersionView = Field(description="The adapter version.")
    base_model: BaseModelRef = Field(description="The base model it adapts.")
    training_job_id: str | None = Field(description="Training job that produced it.")
    hyperparameters: dict[str, Any] | None = Field(description="LoRA settings it was trained with.")
    dataset: DatasetVersionView | None = Field(
        description="Dataset version it was trained on; its rows are at /registry/v1/datasets/{name}/versions/{version}/rows."
    )
    evaluations: list[EvaluationView] = Field(description="Evaluations of this exact version, oldest first.")


class PromptCreate(Request):
    name: PromptName = Field(description="Prompt name.")
    template: str = Field(
        min_length=1, max_length=200_000, description="Jinja template text; variables are found in it."
    )
    model_name: ModelName | None = Field(default=None, description="Model the prompt targets.")
    labels: list[PromptLabel] = Field(
        default_factory=list, max_length=20, description="Labels to point at the new version, e.g. production."
    )


class PromptVersionView(RegistryView):
    name: str = Field(description="Prompt name.")
    version: int = Field(description="Version number, per name, from 1.")
    template: str = Field(description="Template text.")
    variables: list[str] = Field(description="Variables the template needs.")
    model_name: str | None = Field(description="Model the prompt targets.")
    labels: list[str] = Field(
        default_factory=list, description="Labels pointing at this version (in single-version answers)."
    )
    label_traffic: dict[str, float] = Field(
        default_factory=dict,
        description="A/B share (percent of production-label traffic) declared on those labels, where one is.",
    )
    created_at: datetime = Field(description="When it was published (UTC).")
    created_by: str = Field(description="Principal that published it.")


class GuardPolicyCreate(Request):
    name: GuardPolicyName = Field(description="Guard policy name; each publication is its next version.")
    model_name: ModelName = Field(description="The model whose gateway calls it guards (by the name callers ask for).")
    route: ServedRoute | None = Field(
        default=None,
        description="Attach it to the model's calls on this route only (production, staging, canary, pinned, direct); it then takes precedence over a policy of the whole model.",
    )
    prompt_name: PromptName | None = Field(
        default=None,
        description="Attach it to the model's calls that use this registry prompt only; it then takes precedence over a route's or the whole model's policy.",
    )
    spec: GuardPolicySpec = Field(description="What it checks on each side of a call, and how the cache may be used.")
    activate: bool = Field(
        default=True, description="Make the new version the active one now; false keeps the current one active."
    )

    @model_validator(mode="after")
    def _one_attachment(self) -> Self:
        if self.route is not None and self.prompt_name is not None:
            raise ValueError(ATTACHED_ONCE)
        return self

    @model_validator(mode="before")
    @classmethod
    def _spec_names_known_checks(cls, data: Any) -> Any:
        # Events ignore unknown fields (an older consumer reads a newer spec); a request must not: a
        # misspelled check (`input_secret`) would silently guard nothing.
        spec = data.get("spec") if isinstance(data, dict) else None
        unknown = sorted(set(spec) - set(GuardPolicySpec.model_fields)) if isinstance(spec, dict) else []
        if unknown:
            raise ValueError(
                f"spec has unknown field(s) {', '.join(unknown)}; known: {', '.join(GuardPolicySpec.model_fields)}"
            )
        return data


class GuardPolicyActivate(Request):
    version: VersionNumber = Field(description="Version to make active; an earlier one is a rollback.")


class GuardPolicyView(RegistryView):
    name: str = Field(description="Guard policy name.")
    version: int = Field(description="Version number, per name, from 1.")
    model_name: str = Field(description="The model whose calls it guards.")
    route: ServedRoute | None = Field(default=None, description="The route it is attached to; none: see prompt_name.")
    prompt_name: str | None = Field(
        default=None, description="The prompt it is attached to; with route, none: the whole model."
    )
    spec: GuardPolicySpec = Field(description="What it checks and does.")
    active: bool = Field(default=False, description="Whether this version is the one the gateway applies now.")
    created_at: datetime = Field(description="When it was published (UTC).")
    created_by: str = Field(description="Principal that published it.")


class PromptLabelMove(Request):
    version: VersionNumber = Field(description="Version the label should point at; moving it back is a rollback.")
    traffic_percent: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Declare an A/B split: this percent of the traffic asking for the production label gets this label's version, sticky per user. 0 ends the split; unset keeps the label's current share. Not allowed on production itself.",
    )


class PromptRenderRequest(Request):
    version: VersionNumber | None = Field(
        default=None, description="Version to render; none: by label, else the latest."
    )
    label: PromptLabel | None = Field(
        default=None, description="Label to render, e.g. production; used when version is none."
    )
    variables: dict[str, Any] = Field(
        default_factory=dict, description="Values for the template's variables; each one it needs is required."
    )


class PromptRendered(Response):
    name: str = Field(description="Prompt name.")
    version: int = Field(description="Version rendered.")
    text: str = Field(description="The rendered text.")


class DatasetCreate(Request):
    name: DatasetName = Field(description="Dataset name; each upload is its next version.")
    split: Literal["train", "golden"] = Field(
        description="train, or golden (for evaluation; chat or instruction records only)."
    )
    jsonl: str = Field(
        description='The records, one JSON object per line, all of one format: chat ({"messages": [...]}), instruction ({"instruction", "output"}) or preference ({"prompt": [...], "chosen", "rejected", "provenance"?}, the prompt ending with a user turn).'
    )
    provenance: Literal["uploaded", "feedback", "preferences"] = Field(
        default="uploaded",
        description="uploaded, feedback (built from corrections) or preferences (built from feedback as preference pairs).",
    )
    model_name: ModelName | None = Field(default=None, description="Model it is meant for.")


class AuditEntryView(RegistryView):
    id: int = Field(description="Entry id, increasing.")
    at: datetime = Field(description="When (UTC).")
    actor: str = Field(description="Principal: a key's principal, cli:<user>, service:<name>, or anonymous.")
    action: str = Field(description="What was done or attempted, e.g. adapter.stage.production.")
    object_type: str = Field(description="model, adapter, prompt, dataset, evaluation or key.")
    object_id: str = Field(description="The object, e.g. smol:v3 or support@production.")
    outcome: Literal["ok", "refused"] = Field(description="ok, or refused (nothing changed).")
    before: dict[str, Any] | None = Field(description="The relevant state before.")
    after: dict[str, Any] | None = Field(description="The relevant state after.")
    detail: str | None = Field(description="Reason given, or the refusal's status and message.")


class ApiKeyCreate(Request):
    principal: str = Field(
        min_length=1, max_length=256, description="Who the key is for; recorded as the actor of what it does."
    )
    role: Role = Field(description="What the key may do.")
    ttl_s: int | None = Field(
        default=None,
        ge=60,
        le=10 * 365 * 86400,
        description="Seconds until the key expires; unset: it does not expire.",
    )


class ApiKeyCreated(Response):
    key: str = Field(
        description="The API key; shown once, stored only as a keyed hash (HMAC under the server's pepper)."
    )
    key_id: str = Field(description="The key's id, to revoke it.")
    principal: str = Field(description="Who the key is for.")
    role: Role = Field(description="What the key may do.")
    expires_at: datetime | None = Field(default=None, description="When the key stops working (UTC); none: never.")


# ------------------------------------------------------------------------------------------ review


class RubricScale(StrEnum):
    """How one dimension of a rubric is scored: thumbs (up or down), rating (1 to 5, ordered), or one of
    the dimension's own labels (unordered)."""

    thumbs = "thumbs"
    rating = "rating"
    label = "label"


ReviewLabel = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]


class RubricDimension(BaseModel):
    """One thing reviewers judge, and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="Dimension name, e.g. `correct`, `tone`; unique within the rubric.")
    description: str = Field(min_length=1, max_length=1000, description="What the reviewer judges, as they read it.")
    scale: RubricScale = Field(description="thumbs, rating (1 to 5) or label (one of `labels`).")
    labels: list[ReviewLabel] = Field(
        default_factory=list,
        max_length=12,
        description="The choices of a `label` dimension (2 to 12, distinct); none for the other scales.",
    )

    @model_validator(mode="after")
    def _labels_fit_the_scale(self) -> Self:
        if self.scale is RubricScale.label:
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ValueError(f"dimension {self.name!r}: a label scale needs 2 to 12 distinct labels")
        elif self.labels:
            raise ValueError(
                f"dimension {self.name!r}: only a label scale has labels; a {self.scale.value} scale has none"
            )
        return self


class RubricCreate(Request):
    """A rubric: the dimensions reviewers score an answer on. Each publication of a name is its next version."""

    name: RubricName = Field(description="Rubric name; each publication is its next version.")
    instructions: str = Field(
        default="", max_length=20_000, description="What reviewers are asked to judge, shown above each item."
    )
    dimensions: list[RubricDimension] = Field(
        min_length=1, max_length=12, description="What reviewers score, in the order they see it."
    )

    @model_validator(mode="after")
    def _distinct_dimensions(self) -> Self:
        names = [dimension.name for dimension in self.dimensions]
        if len(set(names)) != len(names):
            raise ValueError(f"dimension names must be distinct; got {', '.join(names)}")
        return self


class RubricVersionView(RegistryView):
    name: str = Field(description="Rubric name.")
    version: int = Field(description="Version number, per name, from 1.")
    instructions: str = Field(description="What reviewers are asked to judge.")
    dimensions: list[RubricDimension] = Field(description="What reviewers score, in order.")
    created_at: datetime = Field(description="When it was published (UTC).")
    created_by: str = Field(description="Principal that published it.")


class ReviewSelect(StrEnum):
    """Which answers (or traces, or sessions) a queue's rule puts in front of reviewers."""

    traffic = "traffic"
    thumbs_down = "thumbs_down"
    low_groundedness = "low_groundedness"
    judge_disagreement = "judge_disagreement"
    pairs = "pairs"
    errored = "errored"


class ReviewTarget(StrEnum):
    """What one item of a queue is: an answered inference, a whole trace, or a whole session."""

    inference = "inference"
    trace = "trace"
    session = "session"


class ReviewChoice(StrEnum):
    """A reviewer's pick on a pairwise item: the first answer shown, the second, or neither (a tie)."""

    first = "first"
    second = "second"
    tie = "tie"


class ReviewOrder(StrEnum):
    """Which items reviewers get first. uncertainty: the live watcher's doubt, the lowest MiniLM groundedness
    of the answer in its prompt. least_confident: the model's own doubt, the lowest mean log-probability of
    the answer's tokens (inference.logged's mean_token_logprob); answers without one (logged before it
    existed, or by an app) come last. newest: the most recent call first."""

    uncertainty = "uncertainty"
    least_confident = "least_confident"
    newest = "newest"


class ReviewRule(Request):
    """A declarative sampling rule over the stored, answered inferences of one model, or over stored traces
    or sessions (`target`)."""

    target: ReviewTarget = Field(
        default=ReviewTarget.inference,
        description="What an item is: an answered inference (the default), a whole trace, or a whole session. "
        "A trace or session rule selects traffic (a `share` of them), thumbs_down (those with negative feedback: "
        "thumbs down or a rating of 1 or 2, from anyone but a reviewer, on the trace or session, on any of its spans, "
        "or on any of its inferences; a session's also counts its traces') or errored (those with a span whose status "
        "is error); low_groundedness, judge_disagreement, pairs and `route` are inference rules only. Items come newest "
        "first (by the first span's start).",
    )
    select: ReviewSelect = Field(
        description="traffic: a share of answered calls; thumbs_down: answers anyone but a reviewer gave thumbs down; "
        "low_groundedness: answers whose MiniLM groundedness in their prompt is under `floor`; "
        "judge_disagreement: answers on which a judge (feedback source judge) and an end user (source end_user) disagree, "
        "one verdict positive and the other negative. A verdict is a feedback's thumbs (up positive, down negative) or, "
        "without thumbs, its rating (4-5 positive, 1-2 negative; 3, the middle of the scale, is neither, so it never disagrees). "
        "Each judge and each end user counts by their latest verdict on the inference, so one who changed their mind "
        "counts as they ended; feedback with no actor counts on its own, and feedback with neither thumbs nor rating "
        "(a comment) leaves the verdict before it standing. Only feedback on the inference itself counts, not on its trace or session. "
        "pairs: two answers to the same rendered prompt (`input_text`), for reviewers to pick the better one: the newest answer, "
        "against the newest answer of another arm (adapter version and route, e.g. a canary against production) whose text differs, "
        "else the newest of the same arm whose text differs; a prompt with no second, different answer is not taken, and answers "
        "replayed from the response cache are not answers of their own. One item per prompt; `share` samples prompts, not calls. "
        "Which answer is shown first is a coin flip per item (a hash of the two ids): reviewers favour the first answer they read, "
        "so neither arm may always lead. Reviewers submit a `choice` instead of scores; the rubric's instructions say what to compare by. "
        "errored: traces or sessions with an error span (a trace or session rule only)."
    )
    model_name: ModelName | None = Field(
        default=None,
        description="The model whose answers are sampled (by the name callers ask for); required by an inference rule. "
        "On a trace or session rule, when given, only traces with a span or a logged inference of this model.",
    )
    route: ServedRoute | None = Field(
        default=None, description="Only calls served on this route (e.g. canary), when set."
    )
    share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Share of the matching calls taken, chosen by a hash of the inference id (the same calls on every fill).",
    )
    floor: float = Field(
        default=0.5, ge=0, le=1, description="For low_groundedness: answers scoring under it are taken."
    )
    window_hours: int = Field(default=24, ge=1, le=2160, description="How far back a fill looks.")
    order: ReviewOrder = Field(default=ReviewOrder.uncertainty, description="Which items come first.")


class ReviewQueueCreate(Request):
    """A named review queue; creating one with an existing name makes its next version (the items already
    in it stay, with the version they were added under)."""

    name: ReviewQueueName = Field(description="Queue name.")
    rule: ReviewRule = Field(description="What fills it.")
    rubric: RubricName = Field(description="The registry rubric reviewers score on.")
    rubric_version: VersionNumber | None = Field(
        default=None,
        description="Its version; the latest when the queue is created, when omitted (the queue keeps that one).",
    )
    reviewers_per_item: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Distinct reviewers each item needs; two or more measure agreement, and items they disagree on go to adjudication.",
    )
    lease_seconds: int = Field(
        default=600, ge=30, le=3600, description="How long a claim holds an item before another reviewer may take it."
    )
    max_items: int = Field(default=200, ge=1, le=10_000, description="Most items a fill adds.")


class ReviewQueueCounts(Response):
    open: int = Field(description="Items waiting for a review.")
    claimed: int = Field(description="Items a reviewer holds under a live lease.")
    adjudication: int = Field(description="Items whose reviewers disagreed, waiting for an adjudicator.")
    done: int = Field(description="Items with all their reviews (or adjudicated).")
    gone: int = Field(
        description="Items taken out because their inference (trace, session) is no longer stored (a TTL or a deletion); never offered again.",
    )
    skips: int = Field(description="Skips recorded, with their reasons.")


class ReviewAgreement(Response):
    dimension: str = Field(description="Rubric dimension.")
    level: str = Field(description="nominal (thumbs, labels) or ordinal (ratings).")
    items: int = Field(description="Items judged by two or more reviewers on this dimension.")
    alpha: float | None = Field(
        description="Krippendorff's alpha; none when it is undefined (too few judgements, or no variation)."
    )
    kappa: float | None = Field(
        default=None, description="Cohen's kappa, when exactly two reviewers judged the same items."
    )
    alpha_without: dict[str, float | None] = Field(
        default_factory=dict, description="Alpha with each reviewer's judgements left out."
    )


class ReviewQueueView(Response):
    name: str = Field(description="Queue name.")
    version: int = Field(description="Version of its definition, from 1.")
    rule: ReviewRule = Field(description="What fills it.")
    rubric: RubricVersionView = Field(description="The rubric, as published when the queue was defined.")
    reviewers_per_item: int = Field(description="Distinct reviewers each item needs.")
    lease_seconds: int = Field(description="How long a claim holds an item.")
    max_items: int = Field(description="Most items a fill adds.")
    created_at: datetime = Field(description="When this version was defined (UTC).")
    created_by: str = Field(description="Principal that defined it.")
    counts: ReviewQueueCounts = Field(description="Its items, by state.")
    agreement: list[ReviewAgreement] = Field(default_factory=list, description="Agreement per rubric dimension.")


class ReviewFillResult(Response):
    queue: str = Field(description="Queue name.")
    considered: int = Field(
        description="Answered inferences (traces, sessions) the rule matched in its window; for a `pairs` rule, the pairs of answers it formed."
    )
    added: int = Field(description="Items added.")
    already_queued: int = Field(description="Matches already in the queue.")
    duplicate_prompts: int = Field(description="Matches left out because an item with the same prompt is queued.")


class ReviewSpan(Response):
    """One span of a trace under review, where the tree puts it (depth first, children under their parent)."""

    span_id: str = Field(description="Span id.")
    parent_span_id: str | None = Field(default=None, description="Parent span; none for the root.")
    depth: int = Field(description="How deep in the tree: 0 for a root (or a span whose parent is not stored).")
    name: str = Field(description="Span name.")
    kind: str = Field(description="llm, retrieval, tool, chain, agent, ...")
    input: str = Field(description="The step's input, personal data removed as the sink stored it.")
    output: str = Field(description="The step's output, personal data removed as the sink stored it.")
    status: str = Field(description="unset, ok or error.")
    error: str | None = Field(default=None, description="The error, when its status is error.")
    duration_ms: float = Field(description="How long it took, in milliseconds.")


class ReviewTurn(Response):
    """One exchange of a session under review: a trace's root input and output."""

    trace_id: str = Field(description="The turn's trace.")
    name: str = Field(description="Its root span's name.")
    input: str = Field(description="The root span's input.")
    output: str = Field(description="The root span's output.")
    status: str = Field(description="error when any span of the trace failed, else its root's status.")
    started_at: datetime = Field(description="When the turn began (UTC).")


class ReviewItemView(Response):
    item_id: str = Field(description="Item id; submit or skip it while the lease holds.")
    queue: str = Field(description="Queue name.")
    queue_version: int = Field(description="Queue version it was added under.")
    stage: Literal["review", "adjudication"] = Field(description="review, or adjudication after reviewers disagreed.")
    target: ReviewTarget = Field(
        default=ReviewTarget.inference, description="What is under review: an inference, a trace or a session."
    )
    inference_id: str | None = Field(description="The inference under review; none on a trace or session item.")
    model_name: str | None = Field(
        description="Model that answered; on a trace or session item, the model of its first LLM span, if any."
    )
    adapter_version: int | None = Field(default=None, description="Adapter version that answered.")
    route: str | None = Field(description="Route it was served on; none on a trace or session item.")
    messages: list[dict[str, str]] = Field(
        description="The conversation sent to the model ({role, content}), personal data removed; on a trace item its "
        "root span's input, on a session item each turn's input and output in order."
    )
    answer: str = Field(
        description="The model's answer, personal data removed; on a trace item its root span's output, on a session "
        "item the last turn's."
    )
    trace_id: str | None = Field(
        default=None, description="The trace of the call, when it was traced; the trace under review on a trace item."
    )
    session_id: str | None = Field(default=None, description="The session under review, on a session item.")
    spans: list[ReviewSpan] = Field(
        default_factory=list,
        description="The trace's spans as a tree (depth first), when there is a trace: a trace item's, or an inference item's whose call was traced.",
    )
    turns: list[ReviewTurn] = Field(
        default_factory=list, description="A session item's turns (each trace's root input and output), in order."
    )
    second_inference_id: str | None = Field(
        default=None, description="A pairwise item's second answer's inference, shown beside the first (`answer`)."
    )
    second_adapter_version: int | None = Field(default=None, description="Adapter version of the second answer.")
    second_route: str | None = Field(default=None, description="Route the second answer was served on.")
    second_answer: str | None = Field(
        default=None, description="A pairwise item's second answer to the same prompt, personal data removed."
    )
    groundedness: float | None = Field(
        default=None, description="MiniLM groundedness of the answer in its prompt, when it was scored."
    )
    mean_token_logprob: float | None = Field(
        default=None,
        description="How sure the model was of the answer: the mean log-probability of its tokens, when it was logged.",
    )
    rubric: RubricVersionView = Field(description="What to score.")
    reviews: list[dict[str, Any]] = Field(
        default_factory=list,
        description="For adjudication: the reviews that disagree (reviewer, scores, correction, and a pairwise item's choice).",
    )
    reviews_needed: int = Field(description="Reviews the item still needs.")
    lease_expires_at: datetime = Field(description="When the claim lapses (UTC).")


class ReviewSubmit(Request):
    scores: dict[Name, str] = Field(
        default_factory=dict,
        max_length=12,
        description="A score per rubric dimension, by name: `up`/`down`, `1`..`5`, or one of its labels; none on a pairwise item.",
    )
    choice: ReviewChoice | None = Field(
        default=None,
        description="A pairwise item's judgement, and only a pairwise item's: the `first` answer (`answer`), the `second`, or `tie`.",
    )
    correction: str | None = Field(
        default=None, max_length=32000, description="The answer that should have been given."
    )
    comment: str | None = Field(default=None, max_length=8000, description="Free-text comment.")


class ReviewSkip(Request):
    reason: str = Field(min_length=1, max_length=500, description="Why the reviewer passes the item on.")


class ReviewAccepted(Response):
    item_id: str = Field(description="The item reviewed.")
    feedback_id: str = Field(description="The feedback.reviewed event's feedback id.")
    stage: Literal["waiting", "adjudication", "done"] = Field(
        description="waiting: it needs more reviewers; adjudication: its reviewers disagreed; done."
    )


# ---------------------------------------------------------------------- OpenAI-compatible gateway


class ChatMessage(Request):
    role: Literal["system", "user", "assistant", "tool", "developer"] = Field(description="Author of the message.")
    content: str | None = Field(default=None, description="Message text.")
    name: str | None = Field(default=None, description="Optional author name.")


class PromptReference(Request):
    name: PromptName = Field(description="Registered prompt name.")
    version: VersionNumber | None = Field(default=None, description="Version; none: the version the label points at.")
    label: PromptLabel | None = Field(default=None, description="Label, e.g. production; used when version is none.")
    variables: dict[str, str] = Field(default_factory=dict, description="Values for the template's variables.")


class _SamplingRequest(Request):
    model: str = Field(min_length=1, description="`name` (production), `name@stage`, or `name:vN`.")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stream: bool = Field(default=False, description="Stream tokens as server-sent events.")
    stop: str | list[str] | None = Field(default=None, description="Sequences that end generation.")
    seed: int | None = Field(default=None, description="Sampling seed.")
    user: str | None = Field(
        default=None, max_length=256, description="End-user id: canary stickiness and feedback analysis."
    )
    n: int = Field(default=1, ge=1, le=1, description="Choices to return (only 1 is supported).")
    prompt_ref: PromptReference | None = Field(
        default=None, description="Flywheel extension: render a registered prompt server-side."
    )
    metadata: dict[str, str] = Field(default_factory=dict, description="Free-form tags stored with the inference.")
    grounding_context: str | None = Field(
        default=None,
        max_length=100_000,
        description="Flywheel extension: the passages the answer must be grounded in (what a RAG app retrieved); the output guard's groundedness check scores the answer against them.",
    )


class JsonSchemaFormat(Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="The schema's name, as OpenAI asks."
    )
    description: str | None = Field(default=None, max_length=2000, description="What the answer is for.")
    json_schema: dict[str, Any] | None = Field(
        default=None,
        alias="schema",
        description="The JSON Schema the answer must satisfy (at most 16 KB; no `pattern`, no `$ref` outside it).",
    )
    strict: bool | None = Field(default=None, description="Accepted for compatibility; the guard always checks fully.")


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text (no check), json_object (any JSON object) or json_schema (the given schema)."
    )
    json_schema: JsonSchemaFormat | None = Field(default=None, description="The schema, with type json_schema.")

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> Self:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(default_factory=list, description="The conversation so far.")
    response_format: ResponseFormat | None = Field(
        default=None,
        description="A structured answer: the output guard checks it (output_json_schema); decoding is not constrained.",
    )


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
    EvaluationStatus,
    EvaluationList,
    QueryRequest,
    QueryResult,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    BaseModelCreate,
    BaseModelView,
    AdapterVersionCreate,
    AdapterVersionView,
    StageTransition,
    EvaluationView,
    LineageView,
    PromptCreate,
    PromptVersionView,
    PromptLabelMove,
    PromptRenderRequest,
    GuardPolicyCreate,
    GuardPolicyActivate,
    GuardPolicyView,
    RubricCreate,
    RubricVersionView,
    ReviewQueueCreate,
    ReviewQueueView,
    ReviewFillResult,
    ReviewItemView,
    ReviewSubmit,
    ReviewSkip,
    ReviewAccepted,
    PromptRendered,
    DatasetCreate,
    DatasetVersionView,
    AuditEntryView,
    ApiKeyCreate,
    ApiKeyCreated,
)


# ------------------------------------------------------------------------ keys and approvals


class ApiKeyView(RegistryView):
    key_id: str = Field(description="The key's id.")
    principal: str = Field(description="Who the key is for.")
    role: Role = Field(description="What the key may do.")
    created_at: datetime = Field(description="When it was created (UTC).")
    created_by: str = Field(description="Who created it.")
    expires_at: datetime | None = Field(default=None, description="When it stops working; none: never.")
    revoked_at: datetime | None = Field(default=None, description="When it was revoked; none: it was not.")
    last_used_at: datetime | None = Field(
        default=None, description="Last use, to within a minute; none: never used since 0004."
    )
    rotated_from: str | None = Field(default=None, description="The key this one replaced by rotation.")


class ApiKeyRotate(Request):
    grace_s: int = Field(
        default=0,
        ge=0,
        le=30 * 86400,
        description="Seconds the old key keeps working (it expires then); 0: revoked at once.",
    )
    ttl_s: int | None = Field(
        default=None,
        ge=60,
        le=10 * 365 * 86400,
        description="Seconds until the new key expires; unset: it does not expire.",
    )


class ApiKeyIdentity(Response):
    key_id: str = Field(description="The presented key's id.")
    principal: str = Field(description="Who the key is for.")
    role: Role = Field(description="What the key may do.")
    expires_at: datetime | None = Field(default=None, description="When it stops working; none: never.")


class ApprovalCreate(Request):
    target: Literal["production"] = Field(
        default="production",
        description="The stage (adapter) or label (prompt) approved; only production needs approval.",
    )
    comment: str | None = Field(default=None, max_length=2000, description="Why, in words.")


class ApprovalView(RegistryView):
    id: int = Field(description="Approval id.")
    object_type: str = Field(description="adapter or prompt.")
    object_id: str = Field(description="The version approved, e.g. smol:v3 or support:v2.")
    target: str = Field(description="The stage or label approved: production.")
    approved_by: str = Field(description="The approving principal.")
    approved_role: Role = Field(description="Its role when it approved.")
    approved_at: datetime = Field(description="When (UTC).")
    comment: str | None = Field(default=None, description="Why, in words.")
    used_by: str | None = Field(
        default=None, description="The principal whose promotion used it up; none: still unused."
    )
    used_at: datetime | None = Field(default=None, description="When it was used.")


HTTP_MODELS = (*HTTP_MODELS, ApiKeyView, ApiKeyRotate, ApiKeyIdentity, ApprovalCreate, ApprovalView)
