"""Every event named in ARCHITECTURE.md, once. Topics and partition keys live on the classes.

Compatibility rule: within a `schema_version`, fields are only added, and only with defaults.
tests/unit/test_contract_schemas.py compares against the committed snapshot in contracts/schemas/.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints, ValidationInfo, field_validator, model_validator

from contracts.envelope import ContractModel, Payload
from contracts.ids import (
    AlertId,
    DatasetName,
    DeploymentId,
    EvaluationId,
    FeedbackId,
    GuardPolicyName,
    Identifier,
    InferenceId,
    JobId,
    MetricSuiteName,
    ModelName,
    Name,
    PromptLabel,
    PromptName,
    ReviewQueueName,
    RuleName,
    SessionId,
    Sha256,
    SpanId,
    TraceId,
)


class Stage(StrEnum):
    none = "none"
    staging = "staging"
    production = "production"
    archived = "archived"


class ServedRoute(StrEnum):
    """How the gateway chose what answers a call to a model: a stage's version, a declared canary, a
    version named by the caller (pinned), or the base model (direct)."""

    production = "production"
    staging = "staging"
    canary = "canary"
    pinned = "pinned"
    direct = "direct"


class Thumbs(StrEnum):
    up = "up"
    down = "down"


class FeedbackSource(StrEnum):
    end_user = "end_user"
    reviewer = "reviewer"
    judge = "judge"


class InferenceStatus(StrEnum):
    ok = "ok"
    error = "error"


class SpanKind(StrEnum):
    """What a step of a pipeline is (OpenInference's span kinds; GenAI operations map onto them)."""

    llm = "llm"
    retrieval = "retrieval"
    tool = "tool"
    chain = "chain"
    agent = "agent"
    embedding = "embedding"
    reranker = "reranker"
    guardrail = "guardrail"
    evaluator = "evaluator"
    unknown = "unknown"


class SpanStatus(StrEnum):
    """OpenTelemetry's status codes."""

    unset = "unset"
    ok = "ok"
    error = "error"


class Severity(StrEnum):
    info = "info"
    warning = "warning"
    critical = "critical"


class AlertState(StrEnum):
    open = "open"
    acknowledged = "acknowledged"
    resolved = "resolved"


class DeploymentAction(StrEnum):
    load = "load"
    unload = "unload"


class Hyperparameters(ContractModel):
    """LoRA fine-tuning settings; ranges are checked here so a bad request fails before it queues."""

    rank: int = Field(default=16, ge=1, le=256, description="LoRA rank r.")
    alpha: float = Field(default=32.0, gt=0, le=1024, description="LoRA scaling alpha.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the modules that get adapters.",
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0, description="Peak learning rate.")
    epochs: float = Field(default=3.0, gt=0, le=100, description="Passes over the training split.")
    batch_size: int = Field(
        default=8, ge=1, le=1024, description="Sequences per optimiser step (dpo: pairs, two sequences each)."
    )
    max_seq_length: int = Field(default=512, ge=16, le=32768, description="Tokens per training sequence.")
    seed: int = Field(default=0, ge=0, description="Seed for data order, initialisation and dropout.")
    # Both added with defaults: events and stored jobs from before preference tuning still validate, as SFT jobs.
    method: Literal["sft", "dpo", "sft_then_dpo"] = Field(
        default="sft",
        description=(
            "sft: supervised fine-tuning on chat records (`messages`); dpo: direct preference optimisation on "
            "preference records (`prompt`, `chosen`, `rejected`); sft_then_dpo: one job in two stages, SFT on "
            "the chat records, then DPO on the request's preference_dataset from the SFT stage's adapter, which "
            "is also DPO's reference."
        ),
    )
    dpo_beta: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="DPO only: strength of the pull towards the base model (higher stays closer to it).",
    )
    # DPO on LoRA at SFT's learning rate separates easy pairs in a few steps and then widens an unbounded margin
    # until the text collapses; 5e-5 did not (bench/results/preference-2026-12-07.md, third run).
    dpo_learning_rate: float = Field(
        default=5e-5,
        gt=0,
        le=1,
        description="sft_then_dpo only: the DPO stage's learning rate (the SFT stage uses learning_rate).",
    )


class DatasetRef(ContractModel):
    """A pointer to one immutable dataset version."""

    name: DatasetName = Field(description="Dataset name.")
    # The registry and the trainer store versions as signed 64-bit integers: a larger one is refused here, not a 500 there.
    version: int = Field(ge=1, le=2**63 - 1, description="Dataset version number.")


def check_preference_dataset(method: str, preference_dataset: DatasetRef | None) -> None:
    """sft_then_dpo needs a second dataset for its DPO stage; sft and dpo train on `dataset` alone, so one there
    would be silently ignored and is refused instead."""
    if method == "sft_then_dpo" and preference_dataset is None:
        raise ValueError(
            "hyperparameters.method sft_then_dpo needs preference_dataset: the preference records of its DPO stage"
        )
    if method != "sft_then_dpo" and preference_dataset is not None:
        raise ValueError(
            f"preference_dataset is only for hyperparameters.method sft_then_dpo; a {method} job trains on dataset alone"
        )


# ---------------------------------------------------------------------------------------- registry


class ModelRegistered(Payload):
    event_type: ClassVar[str] = "model.registered"
    key_field: ClassVar[str] = "model_name"
    retention_ms: ClassVar[int | None] = -1

    model_name: ModelName = Field(description="Registered name of the base model.")
    source: str = Field(description="Where it came from: a package, a local directory or a hub id.")
    architecture: str = Field(description="Model architecture, e.g. LlamaForCausalLM.")
    parameter_count: int = Field(ge=0, description="Number of parameters.")
    license: str | None = Field(default=None, description="License identifier, when known.")
    artifact_uri: str = Field(description="Where the safetensors weights are stored.")
    artifact_sha256: Sha256 = Field(description="Digest of the stored weights.")


class AdapterRegistered(Payload):
    event_type: ClassVar[str] = "adapter.registered"
    key_field: ClassVar[str] = "model_name"
    retention_ms: ClassVar[int | None] = -1

    model_name: ModelName = Field(description="Base model the adapter belongs to.")
    adapter_version: int = Field(ge=1, description="Version number, counted per model.")
    artifact_uri: str = Field(description="Where the adapter's safetensors are stored.")
    artifact_sha256: Sha256 = Field(description="Digest of the adapter weights.")
    training_job_id: JobId | None = Field(default=None, description="Training job that produced it.")
    dataset: DatasetRef | None = Field(default=None, description="Dataset version it was trained on.")
    hyperparameters: Hyperparameters | None = Field(default=None, description="Hyperparameters used.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Training metrics (final loss, ...).")
    preference_dataset: DatasetRef | None = Field(
        default=None,
        description="sft_then_dpo: the preference dataset version of its DPO stage (`dataset` is the SFT stage's).",
    )


class PromptPublished(Payload):
    event_type: ClassVar[str] = "prompt.published"
    key_field: ClassVar[str] = "prompt_name"
    retention_ms: ClassVar[int | None] = -1

    prompt_name: PromptName = Field(description="Prompt template name.")
    version: int = Field(ge=1, description="Prompt version number.")
    model_name: ModelName | None = Field(default=None, description="Model the prompt targets, if any.")
    template: str = Field(description="Template text.")
    variables: list[str] = Field(default_factory=list, description="Variables the template needs.")
    labels: list[PromptLabel] = Field(default_factory=list, description="Labels pointing at this version now.")
    label_traffic: dict[PromptLabel, float] = Field(
        default_factory=dict,
        description="A/B splits declared on this version's labels: percent of the traffic asking for the production label that goes to this version instead, sticky per user. Labels not listed take none.",
    )


class DatasetPublished(Payload):
    event_type: ClassVar[str] = "dataset.published"
    key_field: ClassVar[str] = "dataset_name"

    dataset_name: DatasetName = Field(description="Dataset name.")
    version: int = Field(ge=1, description="Dataset version number.")
    split: str = Field(description="`train` or `golden`.")
    row_count: int = Field(ge=0, description="Number of records.")
    sha256: Sha256 = Field(description="Content digest of the JSONL.")
    artifact_uri: str = Field(description="Where the JSONL is stored.")
    provenance: str = Field(
        description="`uploaded`, `feedback` when built from corrections, or `preferences` when built from feedback as preference pairs."
    )
    model_name: ModelName | None = Field(default=None, description="Model the dataset is meant for, if any.")


TopicName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,40}$")]
"""A denied topic's name, lower-case letters, digits and `_`: it becomes part of a label (TOPIC_<name>)."""


class GuardAction(StrEnum):
    """What a guard does with what one check finds."""

    off = "off"  # the check does not run
    flag = "flag"  # the text goes on as it is; the finding is recorded
    redact = "redact"  # each value is replaced by its label ([CARD], [OPENAI_KEY], ...)
    block = "block"  # the request is refused, or the answer does not go out


# The checks whose finding is no value in the text, so that there is nothing to replace: flag or block only.
_NOTHING_TO_REPLACE = {
    "input_injection": "a prompt injection (there is no value to replace)",
    "input_denied_topics": "a denied topic (there is no value to replace)",
    "output_json_schema": "an answer that is not the JSON asked for",
    "output_groundedness": "an answer not grounded in its context",
}


def guard_attachment(route: str | None, prompt_name: str | None) -> str:
    """Where a guard policy attaches within its model, as one key: "" (the whole model), "route:<route>" or
    "prompt:<name>". The registry stores it (one column, uniquely indexed) and serving keys policies by it."""
    if prompt_name is not None:
        return f"prompt:{prompt_name}"
    return f"route:{route}" if route is not None else ""


ATTACHED_ONCE = "a guard policy is attached to a whole model, to one of its routes or to one prompt: give route or prompt_name, not both"


class GuardPolicySpec(ContractModel):
    """What a gateway does inline with one model's traffic: an action per check on each side of a call,
    and how its response cache may be used."""

    input_secrets: GuardAction = Field(
        default=GuardAction.off, description="Secrets (API keys, private keys, credentials) in the model input."
    )
    input_personal: GuardAction = Field(
        default=GuardAction.off,
        description="Personal data (email, card, IBAN, SSN, phone, IP address) in the model input.",
    )
    input_injection: GuardAction = Field(
        default=GuardAction.off,
        description="Prompt injection or jailbreak in what the caller wrote (user and tool messages, a prompt, prompt_ref variables): off, flag or block.",
    )
    input_denied_topics: GuardAction = Field(
        default=GuardAction.off,
        description="What the caller wrote being on one of `denied_topics` (TOPIC_<name>): off, flag or block.",
    )
    denied_topics: dict[
        TopicName,
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=300)]], Field(min_length=1, max_length=20)
        ],
    ] = Field(
        default_factory=dict,
        max_length=20,
        description="Subjects the model must not be asked about, each as a few example requests (a request is on a topic when its MiniLM similarity to one of them is at least `denied_topic_threshold`).",
    )
    denied_topic_threshold: float = Field(
        default=0.5, ge=0.3, le=1.0, description="The MiniLM cosine similarity at which a request is on a denied topic."
    )
    output_secrets: GuardAction = Field(default=GuardAction.off, description="Secrets in the answer.")
    output_personal: GuardAction = Field(default=GuardAction.off, description="Personal data in the answer.")
    output_unsafe: GuardAction = Field(
        default=GuardAction.off,
        description="Unsafe content in the answer, by category of the project's lexicon (self_harm, violence, weapons, crime, hate, sexual, harassment); found as UNSAFE_<CATEGORY>, redacted to that label.",
    )
    output_json_schema: GuardAction = Field(
        default=GuardAction.off,
        description="Whether a chat answer asked for with `response_format` (json_object or json_schema) is JSON satisfying it, found as INVALID_JSON: off, flag or block. Blocking holds a stream's text until the answer is whole.",
    )
    output_groundedness: GuardAction = Field(
        default=GuardAction.off,
        description="Whether an answer to a request with `grounding_context` is grounded in it (groundedness at least `groundedness_floor`, and no number the context lacks), found as UNGROUNDED: off, flag or block. Blocking holds a stream's text until the answer is whole.",
    )
    groundedness_floor: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="The lowest groundedness score (half MiniLM similarity, half the share of the answer's content words found in the context) an answer may have.",
    )
    cache_shared: bool = Field(
        default=False,
        description="Whether cached answers are shared between API keys: by default each key sees only the answers to its own requests.",
    )
    cache_semantic_threshold: float | None = Field(
        default=None,
        ge=0.5,
        le=1.0,
        description="Opt in to the semantic cache at this MiniLM cosine similarity of questions; none: exact matches only.",
    )

    @field_validator(*_NOTHING_TO_REPLACE)
    @classmethod
    def _flagged_or_blocked_only(cls, action: GuardAction, info: ValidationInfo) -> GuardAction:
        if action is GuardAction.redact:
            raise ValueError(f"{_NOTHING_TO_REPLACE[info.field_name or '']} cannot be redacted: flag or block it")
        return action

    @model_validator(mode="after")
    def _topics_declared_where_checked(self) -> GuardPolicySpec:
        if self.input_denied_topics is not GuardAction.off and not self.denied_topics:
            raise ValueError(
                "input_denied_topics is on but denied_topics declares none: name each with example requests"
            )
        return self


class GuardPolicyActivated(Payload):
    """A guard policy version became the one a model's traffic is guarded by (published active, or a
    rollback to an earlier version)."""

    event_type: ClassVar[str] = "guard_policy.activated"
    key_field: ClassVar[str] = "policy_name"
    retention_ms: ClassVar[int | None] = -1

    policy_name: GuardPolicyName = Field(description="Guard policy name.")
    version: int = Field(ge=1, description="The version now active.")
    model_name: ModelName = Field(description="The model whose calls it guards.")
    route: ServedRoute | None = Field(
        default=None, description="Attached to the model's calls on this route only; none: the whole model."
    )
    prompt_name: PromptName | None = Field(
        default=None, description="Attached to the model's calls that use this registry prompt only."
    )
    spec: GuardPolicySpec = Field(description="What it checks and does.")
    actor: str = Field(description="Principal that activated it.")

    @property
    def attached_to(self) -> str:
        return guard_attachment(self.route.value if self.route else None, self.prompt_name)

    @model_validator(mode="after")
    def _one_attachment(self) -> GuardPolicyActivated:
        if self.route is not None and self.prompt_name is not None:
            raise ValueError(ATTACHED_ONCE)
        return self


class StageChanged(Payload):
    event_type: ClassVar[str] = "stage.changed"
    key_field: ClassVar[str] = "model_name"
    retention_ms: ClassVar[int | None] = -1

    model_name: ModelName = Field(description="Base model name.")
    adapter_version: int = Field(ge=1, description="Adapter version whose stage changed.")
    from_stage: Stage = Field(description="Stage before.")
    to_stage: Stage = Field(description="Stage after.")
    actor: str = Field(description="Principal that made the change.")
    reason: str | None = Field(default=None, description="Why, in words.")
    canary_percent: float | None = Field(
        default=None, ge=0, le=100, description="Share of production traffic for a declared canary."
    )
    approver: str | None = Field(
        default=None, description="Who approved the change (always present for a promotion to production)."
    )
    replaces_version: int | None = Field(
        default=None,
        ge=1,
        description="On a promotion to full production: the version it replaced, archived in the same change.",
    )


# ----------------------------------------------------------------------------------------- trainer


class TrainingRequested(Payload):
    event_type: ClassVar[str] = "training.requested"
    key_field: ClassVar[str] = "model_name"

    job_id: JobId = Field(description="Idempotency key of the job: a redelivered request starts no second job.")
    model_name: ModelName = Field(description="Base model to adapt.")
    dataset: DatasetRef = Field(description="Training dataset version.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="LoRA settings.")
    start_adapter_version: int | None = Field(
        default=None,
        ge=1,
        le=2**63 - 1,
        description="Version of one of model_name's adapters to go on training (SFT then DPO: the SFT adapter); the hyperparameters state its LoRA shape; for DPO it is also the reference. None: a new adapter.",
    )
    # One job, two datasets, rather than two chained jobs: the stages share a job id, a work directory, one
    # progress count and one terminal event, so a retraining is one thing to follow, resume, cancel and gate.
    preference_dataset: DatasetRef | None = Field(
        default=None,
        description="sft_then_dpo only, and required there: the preference records (`prompt`, `chosen`, `rejected`) "
        "of the DPO stage; `dataset` holds the SFT stage's chat records.",
    )
    requested_by: str = Field(description="Principal or service that asked for it.")
    reason: str | None = Field(default=None, description="Why, e.g. the alert that triggered a retraining.")

    @model_validator(mode="after")
    def _preference_dataset_fits_method(self) -> TrainingRequested:
        check_preference_dataset(self.hyperparameters.method, self.preference_dataset)
        return self


class TrainingStarted(Payload):
    event_type: ClassVar[str] = "training.started"
    key_field: ClassVar[str] = "model_name"

    job_id: JobId = Field(description="Training job id.")
    model_name: ModelName = Field(description="Base model being adapted.")
    total_steps: int = Field(ge=0, description="Optimiser steps planned.")
    resumed_from_step: int = Field(default=0, ge=0, description="Checkpoint step the job resumed from.")
    device: str = Field(description="Device the job runs on, e.g. cpu or cuda:0.")


class TrainingProgress(Payload):
    event_type: ClassVar[str] = "training.progress"
    key_field: ClassVar[str] = "model_name"

    job_id: JobId = Field(description="Training job id.")
    model_name: ModelName = Field(description="Base model being adapted.")
    step: int = Field(ge=0, description="Optimiser steps done.")
    total_steps: int = Field(ge=0, description="Optimiser steps planned.")
    epoch: float = Field(ge=0, description="Fractional epoch.")
    loss: float = Field(description="Training loss over the last logging interval.")
    learning_rate: float = Field(ge=0, description="Current learning rate.")
    tokens_per_second: float = Field(ge=0, description="Trained (non-padding) tokens per second.")
    eta_seconds: float = Field(ge=0, description="Estimated seconds to completion.")
    stage: Literal["sft", "dpo"] | None = Field(
        default=None,
        description="sft_then_dpo: the stage this step belongs to (step and total_steps count across both stages, "
        "epoch is the stage's own); None for a one-stage job.",
    )


class TrainingCompleted(Payload):
    event_type: ClassVar[str] = "training.completed"
    key_field: ClassVar[str] = "model_name"

    job_id: JobId = Field(description="Training job id.")
    model_name: ModelName = Field(description="Base model adapted.")
    dataset: DatasetRef = Field(description="Dataset version trained on.")
    hyperparameters: Hyperparameters = Field(description="Hyperparameters used.")
    artifact_uri: str = Field(description="Where the adapter's safetensors are stored.")
    artifact_sha256: Sha256 = Field(description="Digest of the adapter weights.")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Final loss, tokens/s, duration ...; dpo adds reward_accuracy and reward_margin; sft_then_dpo "
        "reports its DPO stage under these names and each stage's own under sft_ and dpo_ prefixes.",
    )
    preference_dataset: DatasetRef | None = Field(
        default=None, description="sft_then_dpo: the preference dataset version of its DPO stage."
    )


class TrainingFailed(Payload):
    event_type: ClassVar[str] = "training.failed"
    key_field: ClassVar[str] = "model_name"

    job_id: JobId = Field(description="Training job id.")
    model_name: ModelName = Field(description="Base model the job was for.")
    reason: str = Field(description="What went wrong, in words a user can act on.")
    error_type: str = Field(description="Machine-readable class: invalid_input, out_of_memory, cancelled, internal.")


# --------------------------------------------------------------------------------------- evaluator


class ModelTarget(ContractModel):
    """What is evaluated: a base model alone, or with an adapter version and/or a prompt version."""

    model_name: ModelName = Field(description="Base model name.")
    adapter_version: int | None = Field(default=None, ge=1, description="Adapter version; none means the base model.")
    prompt_name: PromptName | None = Field(default=None, description="Prompt template name, if one is applied.")
    prompt_version: int | None = Field(default=None, ge=1, description="Prompt version, if one is applied.")


class EvaluationRequested(Payload):
    event_type: ClassVar[str] = "evaluation.requested"
    key_field: ClassVar[str] = "evaluation_id"

    evaluation_id: EvaluationId = Field(description="Idempotency key of the evaluation.")
    candidate: ModelTarget = Field(description="What is being judged.")
    baseline: ModelTarget | None = Field(
        default=None, description="What it is compared with; none means the current production version."
    )
    golden: DatasetRef = Field(description="Golden dataset version.")
    metric_suite: MetricSuiteName = Field(default="default", description="Named set of metrics to compute.")
    requested_by: str = Field(description="Principal or service that asked for it.")


class MetricComparison(ContractModel):
    """One metric, candidate against baseline, with the paired bootstrap interval on the difference."""

    metric: str = Field(description="Metric name.")
    candidate: float = Field(description="Candidate mean.")
    baseline: float | None = Field(default=None, description="Baseline mean.")
    difference: float | None = Field(default=None, description="Mean paired difference, candidate minus baseline.")
    ci_low: float | None = Field(default=None, description="Lower bound of the confidence interval on the difference.")
    ci_high: float | None = Field(default=None, description="Upper bound of the confidence interval on the difference.")
    examples: int = Field(ge=0, description="Examples scored.")
    errors: int = Field(default=0, ge=0, description="Examples on which the metric errored.")


class EvaluationCompleted(Payload):
    event_type: ClassVar[str] = "evaluation.completed"
    key_field: ClassVar[str] = "evaluation_id"

    evaluation_id: EvaluationId = Field(description="Evaluation id.")
    candidate: ModelTarget = Field(description="What was judged.")
    baseline: ModelTarget | None = Field(default=None, description="What it was compared with.")
    golden: DatasetRef = Field(description="Golden dataset version.")
    passed: bool = Field(description="The gate's verdict.")
    reasons: list[str] = Field(default_factory=list, description="Why the gate decided so, one line each.")
    gate_policy: str = Field(description="Name and version of the gate policy applied, e.g. `default@v1`.")
    metrics: list[MetricComparison] = Field(default_factory=list, description="Summary per metric.")
    report_uri: str | None = Field(default=None, description="Where the HTML report is stored.")
    status: str = Field(default="completed", description="`completed`, or `failed` when it could not run.")
    error: str | None = Field(default=None, description="Why it failed, when it failed.")


# ----------------------------------------------------------------------------------------- serving


class DeploymentRequested(Payload):
    event_type: ClassVar[str] = "deployment.requested"
    key_field: ClassVar[str] = "model_name"

    deployment_id: DeploymentId = Field(description="Idempotency key of the deployment.")
    model_name: ModelName = Field(description="Base model name.")
    adapter_version: int = Field(ge=1, description="Adapter version to load or unload.")
    action: DeploymentAction = Field(default=DeploymentAction.load, description="Load or unload.")
    requested_by: str = Field(description="Principal or service that asked for it.")


class DeploymentCompleted(Payload):
    event_type: ClassVar[str] = "deployment.completed"
    key_field: ClassVar[str] = "model_name"

    deployment_id: DeploymentId = Field(description="Deployment id.")
    model_name: ModelName = Field(description="Base model name.")
    adapter_version: int = Field(ge=1, description="Adapter version.")
    action: DeploymentAction = Field(description="Load or unload.")
    ready: bool = Field(description="Whether the adapter is ready to serve (for load) or gone (for unload).")
    replica: str = Field(description="Serving replica that reports.")
    error: str | None = Field(default=None, description="Why it is not ready, when it is not.")


class GuardOutcome(StrEnum):
    """What one of the gateway's guards did to the text it checked (the model's input, or its answer)."""

    passed = "passed"  # nothing it acts on was found
    flagged = "flagged"  # found, and let through as it was
    redacted = "redacted"  # found, and replaced
    blocked = "blocked"  # found, and the request refused or the answer not sent


# A detector's label: CARD, EMAIL, OPENAI_KEY, or a deployment's own pattern's name.
GuardLabel = Annotated[str, StringConstraints(max_length=64)]


class InferenceLogged(Payload):
    event_type: ClassVar[str] = "inference.logged"
    key_field: ClassVar[str] = "inference_id"
    partitions: ClassVar[int] = 6

    inference_id: InferenceId = Field(
        description="Id of the inference; the gateway's response id; feedback refers to it."
    )
    # Not a ModelName: a refused request is logged with the model it named, whatever that was. It is
    # only ever a ClickHouse value, never a path or a registry key.
    model_name: str = Field(description="Base model name.")
    adapter_version: int | None = Field(default=None, description="Adapter version served; none for the base model.")
    prompt_name: PromptName | None = Field(default=None, description="Registered prompt rendered server-side, if any.")
    prompt_version: int | None = Field(default=None, description="Its version.")
    route: str = Field(
        default="direct",
        description="How the version was chosen: production, staging, pinned, canary, ab, direct; cache when the answer was replayed from the gateway's response cache.",
    )
    endpoint: str = Field(default="chat.completions", description="API used: chat.completions, completions, or app.")
    user_id: str | None = Field(default=None, description="End user id (canary stickiness, per-user analysis).")
    principal: str | None = Field(default=None, description="API key principal that made the call.")
    input_messages: list[dict[str, Any]] = Field(
        default_factory=list, description="Chat messages sent (role, content)."
    )
    input_text: str = Field(default="", description="Prompt text as sent to the model (after templates).")
    output_text: str = Field(default="", description="Generated text.")
    finish_reason: str | None = Field(default=None, description="stop, length, or error.")
    prompt_tokens: int = Field(default=0, ge=0, description="Tokens in.")
    completion_tokens: int = Field(default=0, ge=0, description="Tokens out.")
    latency_queue_ms: float = Field(default=0.0, ge=0, description="Time waiting for a batch slot.")
    latency_compute_ms: float = Field(default=0.0, ge=0, description="Time computing.")
    latency_total_ms: float = Field(default=0.0, ge=0, description="End-to-end time in the gateway.")
    status: InferenceStatus = Field(default=InferenceStatus.ok, description="ok or error.")
    error: str | None = Field(default=None, description="Error message, when status is error.")
    started_at: datetime | None = Field(default=None, description="When the request arrived (UTC).")
    metadata: dict[str, str] = Field(default_factory=dict, description="Free-form tags from the app.")
    trace_id: TraceId | None = Field(
        default=None, description="Trace the call belongs to (the caller's W3C traceparent, or the gateway's own)."
    )
    span_id: SpanId | None = Field(default=None, description="The gateway's span for this call within that trace.")
    session_id: SessionId | None = Field(default=None, description="Conversation the call belongs to, if the app said.")
    guard_input_outcome: GuardOutcome | None = Field(
        default=None, description="What the gateway's input guard did to the model input; none when it did not check."
    )
    guard_input_found: list[GuardLabel] = Field(
        default_factory=list,
        max_length=32,
        description="Labels of what the input guard found in the model input (EMAIL, OPENAI_KEY, ...).",
    )
    guard_output_outcome: GuardOutcome | None = Field(
        default=None, description="What the gateway's output guard did to the answer; none when it did not check one."
    )
    guard_output_found: list[GuardLabel] = Field(
        default_factory=list,
        max_length=32,
        description="Labels of what the output guard found in the answer (CARD, EMAIL, OPENAI_KEY, ...).",
    )
    guard_policy: str | None = Field(
        default=None,
        max_length=160,
        description="The guard policy version that decided (`name:vN`, from the registry); none when the gateway's own settings did.",
    )
    mean_token_logprob: float | None = Field(
        default=None,
        le=0.0,
        description="How sure the model was of its answer: the mean log-probability of the answer's tokens under "
        "the served version's own distribution (before temperature and top_p shape the draw); none without "
        "generated tokens, and for an answer replayed from the response cache.",
    )
    min_token_logprob: float | None = Field(
        default=None,
        le=0.0,
        description="The lowest log-probability among the answer's tokens: the one place the model was least sure.",
    )


# ------------------------------------------------------------------------------------------- spans


# The span table stores counts as UInt32: a larger value would fail the sink's whole batch.
UINT32_MAX = 2**32 - 1

SPAN_TEXT_MAX = 64_000
"""Longest input or output text a span carries; longer text is cut at intake and flagged."""


class SpanLogged(Payload):
    """One step of an LLM pipeline: an OpenTelemetry span, as the OTLP intake or a service recorded it.

    Keyed by trace so the spans of one trace stay in order on one partition."""

    event_type: ClassVar[str] = "span.logged"
    key_field: ClassVar[str] = "trace_id"
    partitions: ClassVar[int] = 6

    trace_id: TraceId = Field(description="Trace id (32 lowercase hex digits).")
    span_id: SpanId = Field(description="Span id (16 lowercase hex digits), unique within the trace.")
    parent_span_id: SpanId | None = Field(default=None, description="Parent span; none for a trace's root.")
    session_id: SessionId | None = Field(default=None, description="Conversation the trace belongs to, if known.")
    name: str = Field(min_length=1, max_length=256, description="Span name, e.g. `chat smollm2` or `retrieve`.")
    kind: SpanKind = Field(default=SpanKind.unknown, description="llm, retrieval, tool, chain, agent, ...")
    service_name: str | None = Field(
        default=None, max_length=256, description="The emitting service (OpenTelemetry resource `service.name`)."
    )
    started_at: datetime = Field(description="Start (UTC).")
    ended_at: datetime = Field(description="End (UTC); not before the start.")
    status: SpanStatus = Field(default=SpanStatus.unset, description="unset, ok or error.")
    error: str | None = Field(default=None, max_length=8000, description="Status message or exception, if error.")
    # Not a ModelName: whatever model an app's span names (e.g. an external API's), a ClickHouse value only.
    model_name: str | None = Field(default=None, max_length=256, description="Model called, for llm spans.")
    adapter_version: int | None = Field(
        default=None, ge=1, le=UINT32_MAX, description="Flywheel adapter version, if served here."
    )
    inference_id: InferenceId | None = Field(
        default=None, description="The gateway inference this span is, when it went through Flywheel's gateway."
    )
    prompt_tokens: int = Field(default=0, ge=0, le=UINT32_MAX, description="Tokens in.")
    completion_tokens: int = Field(default=0, ge=0, le=UINT32_MAX, description="Tokens out.")
    cost_usd: float | None = Field(default=None, ge=0, description="Cost reported by the app, in US dollars.")
    input_text: str = Field(default="", max_length=SPAN_TEXT_MAX, description="The step's input, as text or JSON.")
    output_text: str = Field(default="", max_length=SPAN_TEXT_MAX, description="The step's output, as text or JSON.")
    truncated: bool = Field(default=False, description="Whether input or output was cut to fit.")
    user_id: str | None = Field(default=None, max_length=256, description="End user id, if the app said.")
    principal: str | None = Field(
        default=None, max_length=256, description="API key principal that sent the span (set by the intake)."
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="The span's other attributes, flattened to strings (bounded at intake)."
    )

    @field_validator("ended_at")
    @classmethod
    def _ends_after_start(cls, ended_at: datetime, info: Any) -> datetime:
        started_at = info.data.get("started_at")
        if started_at is not None and ended_at < started_at:
            raise ValueError("ended_at is before started_at")
        return ended_at


# ---------------------------------------------------------------------------------------- feedback


class FeedbackTarget(StrEnum):
    """What one piece of feedback is about."""

    inference = "inference"
    span = "span"
    trace = "trace"
    session = "session"


FEEDBACK_TARGETS = (
    "inference_id (an inference), trace_id with span_id (a span), trace_id alone (a trace) or session_id (a session)"
)

_NAMED_BY = {
    FeedbackTarget.inference: "an inference (inference_id)",
    FeedbackTarget.span: "a span (trace_id and span_id)",
    FeedbackTarget.trace: "a trace (trace_id)",
    FeedbackTarget.session: "a session (session_id)",
}


def feedback_target(
    inference_id: str | None, trace_id: str | None, span_id: str | None, session_id: str | None
) -> FeedbackTarget:
    """The one thing feedback with these ids is about; ValueError saying what to send when they name
    none, more than one, or a span without its trace. The event and the feedback door's request share it."""
    if span_id is not None and trace_id is None:
        raise ValueError(f"span_id {span_id} needs its trace_id: a span is named by trace_id and span_id together")
    named = [
        target
        for target, given in (
            (FeedbackTarget.inference, inference_id is not None),
            (FeedbackTarget.span, trace_id is not None and span_id is not None),
            (FeedbackTarget.trace, trace_id is not None and span_id is None),
            (FeedbackTarget.session, session_id is not None),
        )
        if given
    ]
    if not named:
        raise ValueError(f"feedback names no target: give {FEEDBACK_TARGETS}")
    if len(named) > 1:
        several = ", ".join(_NAMED_BY[target] for target in named[:-1]) + f" and {_NAMED_BY[named[-1]]}"
        raise ValueError(f"feedback names {len(named)} targets, {several}; give exactly one: {FEEDBACK_TARGETS}")
    return named[0]


class FeedbackReceived(Payload):
    """Feedback on exactly one target: an inference, a span, a trace or a session."""

    event_type: ClassVar[str] = "feedback.received"
    # A property, not a field: the target's id, so feedback on one inference, trace or session stays in
    # order on one partition. Feedback on an inference is keyed by inference_id as it always was.
    key_field: ClassVar[str] = "target_id"
    partitions: ClassVar[int] = 6

    feedback_id: FeedbackId = Field(
        default_factory=lambda: str(uuid.uuid4()), description="Id of this piece of feedback."
    )
    # Optional since feedback may target a span, trace or session instead; exactly one target is required.
    inference_id: InferenceId | None = Field(default=None, description="Inference the feedback is about.")
    trace_id: TraceId | None = Field(
        default=None,
        description="Trace the feedback is about (32 lowercase hex digits); with span_id, the trace of the span it is about.",
    )
    span_id: SpanId | None = Field(
        default=None, description="Span the feedback is about (16 lowercase hex digits), within trace_id."
    )
    session_id: SessionId | None = Field(default=None, description="Session (conversation) the feedback is about.")
    thumbs: Thumbs | None = Field(default=None, description="Thumbs up or down.")
    rating: int | None = Field(default=None, ge=1, le=5, description="Rating from 1 to 5.")
    comment: str | None = Field(default=None, max_length=8000, description="Free-text comment.")
    correction: str | None = Field(
        default=None, max_length=32000, description="The answer that should have been given."
    )
    tags: list[str] = Field(default_factory=list, description="Labels, e.g. wrong-fact, tone.")
    source: FeedbackSource = Field(default=FeedbackSource.end_user, description="Who gave it.")
    actor: str | None = Field(default=None, description="Id of the person or judge that gave it.")
    queue: ReviewQueueName | None = Field(
        default=None, description="Review queue it was given in, when a reviewer worked one (`item` names the item)."
    )
    item_id: Identifier | None = Field(default=None, description="Review queue item it was given on.")
    rubric: str | None = Field(
        default=None, max_length=220, description="Rubric version it was scored on (`name:vN`), with `scores`."
    )
    scores: dict[Name, Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=dict,
        max_length=12,
        description="Score per rubric dimension: `up`/`down`, `1`..`5`, or one of the dimension's labels.",
    )
    preferred_over: InferenceId | None = Field(
        default=None,
        description="In a reviewer's pairwise choice: the other answer to the same prompt, which this one was preferred to.",
    )
    tied_with: InferenceId | None = Field(
        default=None,
        description="In a reviewer's pairwise choice: the other answer to the same prompt, judged as good as this one (a tie prefers neither).",
    )

    @model_validator(mode="after")
    def _one_target(self) -> FeedbackReceived:
        feedback_target(self.inference_id, self.trace_id, self.span_id, self.session_id)
        return self

    @property
    def target(self) -> FeedbackTarget:
        """What this feedback is about."""
        return feedback_target(self.inference_id, self.trace_id, self.span_id, self.session_id)

    @property
    def names_a_review(self) -> bool:
        """Whether it names what only a review carries: a queue, an item, a rubric, scores or a pairwise choice."""
        return bool(self.queue or self.item_id or self.rubric or self.scores or self.preferred_over or self.tied_with)

    @property
    def target_id(self) -> str:
        """The target's id, the Kafka key: a span's feedback is keyed by its trace, as span.logged is, so
        the feedback on one trace and on its spans stays in order together."""
        return str(self.inference_id or self.trace_id or self.session_id)


# Kafka does not tell a consumer which principal wrote a record, and the envelope's `producer` is
# whatever the writer declared, so a claim inside feedback.received cannot be checked. Reviewer
# feedback (what automatic retraining learns from) has a topic of its own instead, which only the
# feedback service's principal may write (infra/kafka_acls.py): its door publishes there for keys
# whose role grants reviewer.
REVIEWER_FEEDBACK_ONLY_ON_ITS_TOPIC = (
    "feedback.received may not carry source reviewer: reviewer feedback travels as feedback.reviewed, "
    "which only the feedback service publishes (POST /feedback/v1/feedback with a reviewer's key)"
)
REVIEWS_ONLY_ON_THEIR_TOPIC = (
    "feedback.received may not name a review queue, item, rubric, scores or a pairwise choice (preferred_over, tied_with): a review travels as "
    "feedback.reviewed, which only the feedback service publishes (POST /feedback/v1/review/items/{item_id}/submit)"
)


class FeedbackReviewed(FeedbackReceived):
    """A reviewer's feedback, published by the feedback door alone; the same fields as feedback.received."""

    event_type: ClassVar[str] = "feedback.reviewed"

    source: FeedbackSource = Field(
        default=FeedbackSource.reviewer, description="Who gave it: always `reviewer` on this topic."
    )

    @field_validator("source")
    @classmethod
    def _source_is_reviewer(cls, source: FeedbackSource) -> FeedbackSource:
        if source is not FeedbackSource.reviewer:
            raise ValueError(
                f"feedback.reviewed carries source reviewer only, got {source.value}: publish other feedback as feedback.received"
            )
        return source


# ----------------------------------------------------------------------------------------- monitor

SPAN_NAME_MAX = 256


class SpanSelector(ContractModel):
    """Which spans a monitor rule watches: every given field must match; none given means every span."""

    kind: SpanKind | None = Field(default=None, description="Span kind, e.g. `tool` or `llm`.")
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=SPAN_NAME_MAX,
        description="Span name: exact (`retrieve`), or a prefix when it ends in one `*` (`retrieve*`).",
    )
    service: str | None = Field(
        default=None, min_length=1, max_length=SPAN_NAME_MAX, description="Emitting service (`service.name`)."
    )

    @field_validator("name")
    @classmethod
    def _exact_or_prefix(cls, name: str | None) -> str | None:
        # Only a trailing `*`: a prefix is matched literally (startsWith), while a general glob would be a
        # pattern language of its own, with `%` and `_` in real span names to escape.
        if name is None:
            return None
        if "*" in name[:-1]:
            raise ValueError(f"name {name!r}: `*` may only end the name (a prefix, e.g. `retrieve*`)")
        if name == "*":
            raise ValueError("name `*` matches every span: leave name out instead")
        if any(not character.isprintable() for character in name):
            raise ValueError(f"name {name!r} has a control character")
        return name

    @property
    def name_prefix(self) -> str | None:
        """The prefix a name ending in `*` asks for; None for an exact name or none."""
        return self.name[:-1] if self.name and self.name.endswith("*") else None

    def describe(self) -> str:
        """The selector in words, e.g. `spans kind=tool name=retrieve*`; `all spans` when empty."""
        given = [f"{field}={value}" for field, value in self.model_dump(exclude_none=True, mode="json").items()]
        return "spans " + " ".join(given) if given else "all spans"


class AlertRaised(Payload):
    event_type: ClassVar[str] = "alert.raised"
    key_field: ClassVar[str] = "rule_name"

    alert_id: AlertId = Field(description="Alert id; the same open alert is not raised twice.")
    rule_name: RuleName = Field(description="Rule that fired.")
    rule_version: int = Field(ge=1, description="Version of the rule.")
    severity: Severity = Field(description="info, warning or critical.")
    state: AlertState = Field(default=AlertState.open, description="open, acknowledged or resolved.")
    # Not a ModelName: an alert is about the traffic as logged (inference.logged's model_name).
    model_name: str = Field(description="Base model name.")
    adapter_version: int | None = Field(default=None, description="Adapter version concerned.")
    prompt_version: int | None = Field(default=None, description="Prompt version concerned.")
    metric: str = Field(description="Metric that crossed its threshold.")
    value: float = Field(description="Observed value.")
    threshold: float = Field(description="Threshold it crossed.")
    window_start: datetime = Field(description="Start of the evaluated window (UTC).")
    window_end: datetime = Field(description="End of the evaluated window (UTC).")
    message: str = Field(description="What happened, in words.")
    spans: SpanSelector | None = Field(
        default=None, description="The spans a span rule watches; none for a rule over inferences."
    )


EVENTS: tuple[type[Payload], ...] = (
    ModelRegistered,
    AdapterRegistered,
    PromptPublished,
    DatasetPublished,
    GuardPolicyActivated,
    StageChanged,
    TrainingRequested,
    TrainingStarted,
    TrainingProgress,
    TrainingCompleted,
    TrainingFailed,
    EvaluationRequested,
    EvaluationCompleted,
    DeploymentRequested,
    DeploymentCompleted,
    InferenceLogged,
    SpanLogged,
    FeedbackReceived,
    FeedbackReviewed,
    AlertRaised,
)
