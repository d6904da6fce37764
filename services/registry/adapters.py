"""Adapter versions: registered from training, judged by evaluations, moved between stages.

A production promotion uses up an approval (approvals.py). Becoming the full production version when
another one holds it needs `replaces` naming that version: a compare-and-swap on the model's stage
revision, so of two concurrent promotions exactly one wins and the other gets a Conflict.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from contracts.events import (
    AdapterRegistered,
    DatasetRef,
    EvaluationCompleted,
    Hyperparameters,
    SpanKind,
    SpanLogged,
    Stage,
    StageChanged,
    TrainingCompleted,
)
from contracts.http import AdapterVersionView, BaseModelRef, DatasetVersionView, EvaluationView, LineageView
from services.registry import store
from services.registry.approvals import PRODUCTION_LABEL, Approvals
from services.registry.changes import Changes
from services.registry.errors import Conflict, Invalid
from services.registry.models import AdapterVersion, EvaluationRecord
from services.registry.outbox import stage_event
from services.registry.store import Page
from services.runtime.artifacts import ArtifactError, ArtifactStore
from services.runtime.spans import RetrainingTrace, service_span_event_id

SERVICE_NAME = "flywheel-registry"

# Legal moves between stages. Archived → production is a rollback; it passes the same gate.
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.none: frozenset({Stage.staging, Stage.archived}),
    Stage.staging: frozenset({Stage.production, Stage.archived}),
    Stage.production: frozenset({Stage.production, Stage.staging, Stage.archived}),
    Stage.archived: frozenset({Stage.staging, Stage.production}),
}


class Adapters:
    """Adapter versions, their evaluations and their stages."""

    def __init__(self, changes: Changes, artifacts: ArtifactStore, approvals: Approvals) -> None:
        self.changes = changes
        self.artifacts = artifacts
        self.approvals = approvals

    def register_adapter(
        self,
        actor: str,
        *,
        model_name: str,
        artifact_uri: str,
        artifact_sha256: str,
        training_job_id: str | None = None,
        dataset: DatasetRef | None = None,
        hyperparameters: Hyperparameters | None = None,
        metrics: dict[str, float] | None = None,
        correlation_id: str | None = None,
        event_id: str | None = None,
        preference_dataset: DatasetRef | None = None,
    ) -> AdapterVersionView:
        """Register the next adapter version of a model; the same training job registers once."""
        with self.changes.change(
            actor, "adapter.register", "adapter", f"{model_name}:job={training_job_id or '-'}"
        ) as session:
            if not self.changes.first_time(session, event_id, "training.completed"):
                return AdapterVersionView.model_validate(store.adapter_of_job(session, training_job_id))
            store.model_named(session, model_name)
            if training_job_id is not None:
                existing = store.adapter_of_job(session, training_job_id)
                if existing is not None:
                    if existing.artifact_sha256 != artifact_sha256:
                        raise Conflict(
                            f"training job {training_job_id} already registered {model_name}:v{existing.version} with another artifact",
                            param="training_job_id",
                            code="duplicate_training_job",
                        )
                    return AdapterVersionView.model_validate(existing)
            for known in (dataset, preference_dataset):
                if known is not None:
                    store.dataset_version(session, known.name, known.version)
            try:
                # Adapters are small (a manifest and a few MB): verify now, so a tampered artifact is never registered.
                self.artifacts.get_bytes(artifact_uri, artifact_sha256)
            except ArtifactError as error:
                raise Invalid(
                    f"adapter artifact refused: {error}", param="artifact_uri", code="artifact_invalid"
                ) from None
            version = store.next_adapter_version(session, model_name)
            row = AdapterVersion(
                model_name=model_name,
                version=version,
                artifact_uri=artifact_uri,
                artifact_sha256=artifact_sha256,
                training_job_id=training_job_id,
                dataset_name=dataset.name if dataset else None,
                dataset_version=dataset.version if dataset else None,
                preference_dataset_name=preference_dataset.name if preference_dataset else None,
                preference_dataset_version=preference_dataset.version if preference_dataset else None,
                hyperparameters=hyperparameters.model_dump() if hyperparameters else None,
                metrics=dict(metrics or {}),
                correlation_id=correlation_id,
                created_by=actor,
            )
            session.add(row)
            self.changes.record(
                session,
                actor,
                "adapter.register",
                "adapter",
                f"{model_name}:v{version}",
                after={
                    "artifact_sha256": artifact_sha256,
                    "training_job_id": training_job_id,
                    "dataset": dataset.model_dump() if dataset else None,
                },
            )
            stage_event(
                session,
                AdapterRegistered(
                    model_name=model_name,
                    adapter_version=version,
                    artifact_uri=artifact_uri,
                    artifact_sha256=artifact_sha256,
                    training_job_id=training_job_id,
                    dataset=dataset,
                    hyperparameters=hyperparameters,
                    metrics=dict(metrics or {}),
                    preference_dataset=preference_dataset,
                ),
                correlation_id=correlation_id,
            )
        return AdapterVersionView.model_validate(row)

    def register_trained_adapter(
        self, event: TrainingCompleted, *, event_id: str, correlation_id: str | None
    ) -> AdapterVersionView:
        """Register the adapter a training job produced (training.completed), once per event and per job."""
        return self.register_adapter(
            f"service:trainer/{event.job_id}",
            model_name=event.model_name,
            artifact_uri=event.artifact_uri,
            artifact_sha256=event.artifact_sha256,
            training_job_id=event.job_id,
            dataset=event.dataset,
            hyperparameters=event.hyperparameters,
            metrics=event.metrics,
            correlation_id=correlation_id,
            event_id=event_id,
            preference_dataset=event.preference_dataset,
        )

    def get_adapter(self, model_name: str, version: int) -> AdapterVersionView:
        """One adapter version."""
        with self.changes.store.reading() as session:
            return AdapterVersionView.model_validate(store.adapter_version(session, model_name, version))

    def list_adapters(
        self,
        *,
        model_name: str | None = None,
        stage: Stage | None = None,
        dataset: DatasetRef | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page:
        """Adapter versions, filtered by model, stage or the dataset version they were trained on."""
        with self.changes.store.reading() as session:
            return store.page(
                session,
                store.adapters_query(model_name, stage, dataset),
                AdapterVersion,
                AdapterVersionView.model_validate,
                cursor,
                limit,
            )

    def lineage(self, model_name: str, version: int) -> LineageView:
        """Where an adapter version came from (base model, dataset version, training job) and how it was judged."""
        with self.changes.store.reading() as session:
            adapter = store.adapter_version(session, model_name, version)
            model = store.model_named(session, model_name)
            dataset = (
                store.dataset_version(session, adapter.dataset_name, adapter.dataset_version)
                if adapter.dataset_name and adapter.dataset_version
                else None
            )
            return LineageView(
                adapter=AdapterVersionView.model_validate(adapter),
                base_model=BaseModelRef(name=model.name, source=model.source, artifact_sha256=model.artifact_sha256),
                training_job_id=adapter.training_job_id,
                hyperparameters=adapter.hyperparameters,
                dataset=DatasetVersionView.model_validate(dataset) if dataset else None,
                evaluations=[
                    EvaluationView.model_validate(row) for row in store.evaluations_of(session, model_name, version)
                ],
            )

    def attach_evaluation(self, event: EvaluationCompleted, *, event_id: str | None = None) -> EvaluationView | None:
        """Record an evaluation result against the exact adapter version it judged; once per evaluation id.
        An evaluation of a prompt version is audited against the prompt and returns None."""
        candidate = event.candidate
        with self.changes.change(
            "service:evaluator", "evaluation.attach", "evaluation", event.evaluation_id
        ) as session:
            if not self.changes.first_time(session, event_id, "evaluation.completed"):
                return None
            existing = session.get(EvaluationRecord, event.evaluation_id)
            if existing is not None:
                return EvaluationView.model_validate(existing)
            if candidate.prompt_name is not None:
                # A prompt version was judged, on these weights: that is no evidence about the adapter, so it is
                # audited against the prompt and never counted by the adapter's promotion gate.
                self.changes.record(
                    session,
                    "service:evaluator",
                    "evaluation.attach",
                    "prompt",
                    f"{candidate.prompt_name}:v{candidate.prompt_version}",
                    after={
                        "evaluation_id": event.evaluation_id,
                        "passed": event.passed and event.status == "completed",
                        "gate_policy": event.gate_policy,
                        "model_name": candidate.model_name,
                        "adapter_version": candidate.adapter_version,
                    },
                )
                return None
            if candidate.adapter_version is not None:
                store.adapter_version(session, candidate.model_name, candidate.adapter_version)
            row = EvaluationRecord(
                evaluation_id=event.evaluation_id,
                model_name=candidate.model_name,
                adapter_version=candidate.adapter_version,
                passed=event.passed and event.status == "completed",
                status=event.status,
                gate_policy=event.gate_policy,
                golden_name=event.golden.name,
                golden_version=event.golden.version,
                reasons=list(event.reasons),
                metrics=[metric.model_dump() for metric in event.metrics],
                report_uri=event.report_uri,
            )
            session.add(row)
            target = (
                f"{candidate.model_name}:v{candidate.adapter_version}"
                if candidate.adapter_version
                else candidate.model_name
            )
            self.changes.record(
                session,
                "service:evaluator",
                "evaluation.attach",
                "adapter",
                target,
                after={"evaluation_id": event.evaluation_id, "passed": row.passed, "gate_policy": event.gate_policy},
            )
        return EvaluationView.model_validate(row)

    def transition(
        self,
        actor: str,
        *,
        model_name: str,
        version: int,
        to_stage: Stage,
        reason: str | None = None,
        canary_percent: float | None = None,
        replaces: int | None = None,
    ) -> AdapterVersionView:
        """Move an adapter version to a stage, enforcing the gate, the approval and one production version per model.

        Entering production (from staging or archived) uses up an approval by another principal
        (`Approvals.approve`); a canary already in production becomes the full version under the
        approval that admitted it.

        Becoming the full production version when another one holds it needs `replaces` naming
        that version (which is archived): a compare-and-swap, so of two concurrent promotions
        exactly one wins and the other gets a 409.
        """
        object_id = f"{model_name}:v{version}"
        with self.changes.change(actor, f"adapter.stage.{to_stage.value}", "adapter", object_id) as session:
            model = store.model_named(session, model_name)
            adapter = store.adapter_version(session, model_name, version)
            current = Stage(adapter.stage)
            if to_stage not in TRANSITIONS[current] or (
                to_stage == current and canary_percent == adapter.canary_percent
            ):
                raise Conflict(
                    f"{object_id} is {current.value}; it cannot move to {to_stage.value} (allowed: {', '.join(sorted(s.value for s in TRANSITIONS[current] if s != current)) or 'none'})",
                    param="to_stage",
                    code="illegal_transition",
                )
            if canary_percent is not None and to_stage != Stage.production:
                raise Invalid("canary_percent applies to production only", param="canary_percent")
            if canary_percent is not None and not 0 < canary_percent < 100:
                raise Invalid("canary_percent must be between 0 and 100 (exclusive)", param="canary_percent")
            events: list[StageChanged] = []
            replaced: int | None = None
            approver: str | None = None
            approval_id: int | None = None
            gate: EvaluationRecord | None = None
            if to_stage == Stage.production:
                gate = store.latest_passing_evaluation(session, model_name, version)
                if gate is None:
                    raise Conflict(
                        f"{object_id} has no passing evaluation; run one (evaluation.requested) before promoting",
                        param="version",
                        code="evaluation_required",
                    )
                holder = store.production_holder(session, model_name, other_than=version)
                if canary_percent is None:
                    if holder is not None and replaces != holder.version:
                        raise Conflict(
                            f"{model_name}:v{holder.version} is in production; pass replaces={holder.version} to replace it, or declare a canary with canary_percent",
                            param="replaces",
                            code="production_occupied",
                        )
                    if holder is None and replaces is not None:
                        raise Conflict(
                            f"replaces={replaces} but no other version of {model_name} is in production",
                            param="replaces",
                            code="production_changed",
                        )
                    if holder is not None:
                        holder.stage = Stage.archived.value
                        session.add(holder)
                        session.flush()
                        replaced = holder.version
                else:
                    other_canary = store.production_canary(session, model_name, other_than=version)
                    if other_canary is not None:
                        raise Conflict(
                            f"{model_name}:v{other_canary.version} is already the canary; promote or archive it first",
                            param="canary_percent",
                            code="canary_occupied",
                        )
                    if holder is None:
                        raise Conflict(
                            f"a canary needs a production version to split traffic with; {model_name} has none",
                            param="canary_percent",
                            code="no_production",
                        )
                how = f"flywheel registry approve {model_name} {version}, or POST /registry/v1/adapters/{model_name}/versions/{version}/approvals"
                if current == Stage.production:
                    admitted = store.last_used_approval(session, "adapter", object_id, PRODUCTION_LABEL)
                    if admitted is not None:
                        approver, approval_id = admitted.approved_by, admitted.id
                else:
                    approval = self.approvals.use(session, actor, "adapter", object_id, PRODUCTION_LABEL, how)
                    approver, approval_id = approval.approved_by, approval.id
            before = {"stage": current.value, "canary_percent": adapter.canary_percent}
            adapter.stage = to_stage.value
            adapter.canary_percent = canary_percent
            session.add(adapter)
            # The compare-and-swap: a concurrent stage change of this model committed first makes this update miss.
            if not store.claim_stage_revision(session, model):
                raise Conflict(
                    f"the stages of {model_name} changed concurrently; reload and retry", code="concurrent_change"
                )
            events.append(
                StageChanged(
                    model_name=model_name,
                    adapter_version=version,
                    from_stage=current,
                    to_stage=to_stage,
                    actor=actor,
                    reason=reason,
                    canary_percent=canary_percent,
                    approver=approver,
                    replaces_version=replaced,
                )
            )
            if replaced is not None:
                # After the promotion, so a follower (serving) switches production from the old version to
                # the new one in one step; the other order leaves production empty, the base model
                # answering, while the new adapter loads.
                events.append(
                    StageChanged(
                        model_name=model_name,
                        adapter_version=replaced,
                        from_stage=Stage.production,
                        to_stage=Stage.archived,
                        actor=actor,
                        reason=f"replaced by v{version}",
                        approver=approver,
                    )
                )
            self.changes.record(
                session,
                actor,
                f"adapter.stage.{to_stage.value}",
                "adapter",
                object_id,
                before=before,
                after={
                    "stage": to_stage.value,
                    "canary_percent": canary_percent,
                    "approver": approver,
                    "approval_id": approval_id,
                    "replaces": replaces,
                },
                detail=reason,
            )
            if adapter.correlation_id:
                # In the same transaction as the stage change: the retraining's trace shows a promotion exactly
                # when it happened. An adapter with no correlation id (uploaded at the door) has no trace to join.
                # The outbox keeps the envelope, so a republished span keeps its (random) step and event id.
                span = stage_span(
                    events[0],
                    adapter.correlation_id,
                    step=f"stage/{uuid.uuid4().hex}",
                    at=datetime.now(UTC),
                    gate_evaluation=gate.evaluation_id if gate is not None else None,
                )
                stage_event(session, span, correlation_id=adapter.correlation_id, event_id=service_span_event_id(span))
            for changed in events:
                stage_event(session, changed, correlation_id=adapter.correlation_id)
        return AdapterVersionView.model_validate(adapter)


def stage_span(
    changed: StageChanged, correlation_id: str, *, step: str, at: datetime, gate_evaluation: str | None
) -> SpanLogged:
    """A stage change as a span of its adapter's retraining: an instant, the decision and who made it."""
    attributes = {
        "flywheel.from_stage": changed.from_stage.value,
        "flywheel.to_stage": changed.to_stage.value,
        "flywheel.actor": changed.actor,
    }
    optional = {
        "flywheel.approver": changed.approver,
        "flywheel.reason": changed.reason,
        "flywheel.canary_percent": None if changed.canary_percent is None else f"{changed.canary_percent:g}",
        "flywheel.replaces_version": None if changed.replaces_version is None else str(changed.replaces_version),
        "flywheel.gate.evaluation_id": gate_evaluation,
    }
    attributes.update({key: value for key, value in optional.items() if value is not None})
    verb = "promote" if changed.to_stage == Stage.production else "stage"
    return RetrainingTrace(correlation_id).span(
        step,
        name=f"{verb} {changed.model_name}:v{changed.adapter_version} to {changed.to_stage.value}",
        kind=SpanKind.chain,
        service_name=SERVICE_NAME,
        started_at=at,
        ended_at=at,
        model_name=changed.model_name,
        adapter_version=changed.adapter_version,
        attributes=attributes,
    )
