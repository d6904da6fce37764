"""The registry's use cases: base models, adapter versions and their stages, evaluations, prompts,
datasets and the audit log. Imports neither Kafka nor FastAPI; the door and the handlers translate.

Every mutation runs in one transaction with its audit entry and its outbox event; a mutation a
rule refuses changes nothing and is audited in a transaction of its own. A refusal of who is asking
(401, 403) writes nothing at all: refusals cost the caller, not the platform.

A production promotion (an adapter version to the production stage, or the production label of a
prompt) needs an approval recorded beforehand by another principal with the approver role or admin
(`approve`); the promotion uses it up, and the audit log names both.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from contracts.events import (
    AdapterRegistered,
    DatasetPublished,
    DatasetRef,
    EvaluationCompleted,
    Hyperparameters,
    ModelRegistered,
    PromptPublished,
    Stage,
    StageChanged,
    TrainingCompleted,
)
from contracts.http import AdapterVersionView, ApiKeyView, ApprovalView, AuditEntryView, BaseModelRef, BaseModelView, DatasetVersionView, EvaluationView, LineageView, PromptVersionView
from services.registry.models import AdapterVersion, Approval, AuditEntry, BaseModelRecord, DatasetVersion, EvaluationRecord, ProcessedEvent, PromptLabel, PromptVersion, utcnow
from services.registry.outbox import stage_event
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactError, ArtifactStore
from services.runtime.auth import GRANTS, ApiKey, Role, add_key, development_pepper, generate_key
from services.runtime.prompts import MissingVariable, TemplateSyntax, UnsafeTemplate, render_template, template_variables

MAX_LIMIT = 500
PRODUCTION_LABEL = "production"

# Legal moves between stages. Archived → production is a rollback; it passes the same gate.
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.none: frozenset({Stage.staging, Stage.archived}),
    Stage.staging: frozenset({Stage.production, Stage.archived}),
    Stage.production: frozenset({Stage.production, Stage.staging, Stage.archived}),
    Stage.archived: frozenset({Stage.staging, Stage.production}),
}


class RegistryError(Exception):
    """A request the registry refuses; `status` is the HTTP status the door answers with."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code:
            self.code = code


class NotFound(RegistryError):
    status = 404
    code = "not_found"


class Conflict(RegistryError):
    status = 409
    code = "conflict"


class Invalid(RegistryError):
    status = 422
    code = "invalid_value"


class Forbidden(RegistryError):
    """Who is asking may not do this (never audited: a refusal of the caller writes nothing)."""

    status = 403
    code = "forbidden"


class TooLarge(RegistryError):
    status = 413
    code = "too_large"


@dataclass
class Page:
    items: list[Any]
    next_cursor: str | None


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


def _iso(moment: datetime | None) -> str | None:
    return _aware(moment).isoformat() if moment else None


def _encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{row_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, value = raw.split(":", 1)
        if kind != "id":
            raise ValueError(kind)
        return int(value)
    except ValueError:
        raise Invalid("cursor is not one this registry issued; pass the next_cursor of a previous page", param="cursor") from None


def _page(session: Session, query: Any, model: Any, view: Callable[[Any], Any], cursor: str | None, limit: int) -> Page:
    limit = max(1, min(limit, MAX_LIMIT))
    rows = list(session.scalars(query.where(model.id > _decode_cursor(cursor)).order_by(model.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(items=[view(row) for row in rows], next_cursor=_encode_cursor(rows[-1].id) if more else None)


# Chat records: {"messages": [{"role", "content"}, ...]}; instruction records: {"instruction", "output", "input"?}.
ROLES = {"system", "user", "assistant"}


def validate_record(record: Any) -> tuple[str, str | None]:
    """(format, error) of one dataset record: format is chat or instruction; error None when valid."""
    if not isinstance(record, dict):
        return "", "a record must be a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "chat", "messages must be a non-empty list"
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                return "chat", f"messages[{index}] must be an object"
            if message.get("role") not in ROLES:
                return "chat", f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}"
            if not isinstance(message.get("content"), str):
                return "chat", f"messages[{index}].content must be a string"
        if messages[-1]["role"] != "assistant":
            return "chat", "the last message must be the assistant's (the target)"
        return "chat", None
    if "instruction" in record:
        for name in ("instruction", "output"):
            if not isinstance(record.get(name), str) or not record[name].strip():
                return "instruction", f"{name} must be a non-empty string"
        if "input" in record and not isinstance(record["input"], str):
            return "instruction", "input must be a string"
        return "instruction", None
    return "", "unknown record: expected {\"messages\": [...]} (chat) or {\"instruction\": ..., \"output\": ...}"


class Registry:
    """The registry's use cases over one store and one artifact store."""

    def __init__(self, store: RegistryStore, artifacts: ArtifactStore, *, max_dataset_bytes: int = 64 * 1024 * 1024, on_commit: Callable[[], None] | None = None, key_pepper: bytes | None = None) -> None:
        self.store = store
        self.artifacts = artifacts
        self.max_dataset_bytes = max_dataset_bytes
        self._on_commit = on_commit or (lambda: None)
        self._key_pepper = key_pepper

    @property
    def key_pepper(self) -> bytes:
        """FLYWHEEL_KEY_PEPPER as given, else the development pepper beside the SQLite database."""
        if self._key_pepper is None:
            self._key_pepper = development_pepper(self.store.url)
        return self._key_pepper

    # ----------------------------------------------------------------------------- plumbing

    @contextmanager
    def _change(self, actor: str, action: str, object_type: str, object_id: str) -> Iterator[Session]:
        try:
            with self.store.transaction() as session:
                yield session
        except Forbidden:
            raise
        except RegistryError as error:
            self._refused(actor, action, object_type, object_id, error)
            raise
        except IntegrityError:
            error = Conflict(f"{object_type} {object_id} was changed concurrently or already exists; reload and retry", code="concurrent_change")
            self._refused(actor, action, object_type, object_id, error)
            raise error from None
        self._on_commit()

    def _refused(self, actor: str, action: str, object_type: str, object_id: str, error: RegistryError) -> None:
        with self.store.transaction() as session:
            session.add(AuditEntry(actor=actor, action=action, object_type=object_type, object_id=object_id, outcome="refused", detail=f"{error.status} {error.code}: {error}"))

    @staticmethod
    def _audit(session: Session, actor: str, action: str, object_type: str, object_id: str, *, before: dict | None = None, after: dict | None = None, detail: str | None = None) -> None:
        session.add(AuditEntry(actor=actor, action=action, object_type=object_type, object_id=object_id, outcome="ok", before=before, after=after, detail=detail))

    @staticmethod
    def _first_time(session: Session, event_id: str | None, event_type: str) -> bool:
        """Record a consumed event id in this transaction; False when it was handled before."""
        if event_id is None:
            return True
        if session.get(ProcessedEvent, event_id) is not None:
            return False
        session.add(ProcessedEvent(event_id=event_id, event_type=event_type))
        return True

    # -------------------------------------------------------------------------- base models

    def register_base_model(self, actor: str, *, name: str, source: str, architecture: str, parameter_count: int, artifact_uri: str, artifact_sha256: str, license: str | None = None, chat_template: str | None = None, details: dict | None = None) -> BaseModelView:
        """Register a base model whose safetensors are already in the artifact store."""
        with self._change(actor, "model.register", "model", name) as session:
            if session.scalar(select(BaseModelRecord).where(BaseModelRecord.name == name)) is not None:
                raise Conflict(f"model {name!r} is already registered; choose another name", param="name", code="duplicate_name")
            try:
                stored = self.artifacts.exists(artifact_uri)
            except ArtifactError as error:  # outside the artifact store: never read, never announced
                raise Invalid(f"base model artifact refused: {error}", param="artifact_uri", code="artifact_invalid") from None
            if not stored:
                raise Invalid(f"no artifact at {artifact_uri}; store the weights first", param="artifact_uri", code="artifact_not_found")
            row = BaseModelRecord(name=name, source=source, architecture=architecture, parameter_count=parameter_count, license=license, artifact_uri=artifact_uri, artifact_sha256=artifact_sha256, chat_template=chat_template, details=details or {}, created_by=actor)
            session.add(row)
            self._audit(session, actor, "model.register", "model", name, after={"source": source, "artifact_sha256": artifact_sha256})
            stage_event(session, ModelRegistered(model_name=name, source=source, architecture=architecture, parameter_count=parameter_count, license=license, artifact_uri=artifact_uri, artifact_sha256=artifact_sha256))
        return BaseModelView.model_validate(row)

    def get_model(self, name: str) -> BaseModelView:
        """One base model by name."""
        with self.store.reading() as session:
            return BaseModelView.model_validate(self._model(session, name))

    def list_models(self, *, cursor: str | None = None, limit: int = 50) -> Page:
        """Base models, oldest first."""
        with self.store.reading() as session:
            return _page(session, select(BaseModelRecord), BaseModelRecord, BaseModelView.model_validate, cursor, limit)

    @staticmethod
    def _model(session: Session, name: str) -> BaseModelRecord:
        row = session.scalar(select(BaseModelRecord).where(BaseModelRecord.name == name))
        if row is None:
            raise NotFound(f"no model named {name!r}", param="model_name", code="model_not_found")
        return row

    # ----------------------------------------------------------------------------- adapters

    def register_adapter(self, actor: str, *, model_name: str, artifact_uri: str, artifact_sha256: str, training_job_id: str | None = None, dataset: DatasetRef | None = None, hyperparameters: Hyperparameters | None = None, metrics: dict[str, float] | None = None, correlation_id: str | None = None, event_id: str | None = None) -> AdapterVersionView:
        """Register the next adapter version of a model; the same training job registers once."""
        with self._change(actor, "adapter.register", "adapter", f"{model_name}:job={training_job_id or '-'}") as session:
            if not self._first_time(session, event_id, "training.completed"):
                existing = session.scalar(select(AdapterVersion).where(AdapterVersion.training_job_id == training_job_id))
                return AdapterVersionView.model_validate(existing)
            self._model(session, model_name)
            if training_job_id is not None:
                existing = session.scalar(select(AdapterVersion).where(AdapterVersion.training_job_id == training_job_id))
                if existing is not None:
                    if existing.artifact_sha256 != artifact_sha256:
                        raise Conflict(f"training job {training_job_id} already registered {model_name}:v{existing.version} with another artifact", param="training_job_id", code="duplicate_training_job")
                    return AdapterVersionView.model_validate(existing)
            if dataset is not None:
                self._dataset(session, dataset.name, dataset.version)
            try:
                # Adapters are small (a manifest and a few MB): verify now, so a tampered artifact is never registered.
                self.artifacts.get_bytes(artifact_uri, artifact_sha256)
            except ArtifactError as error:
                raise Invalid(f"adapter artifact refused: {error}", param="artifact_uri", code="artifact_invalid") from None
            version = (session.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.model_name == model_name)) or 0) + 1
            row = AdapterVersion(model_name=model_name, version=version, artifact_uri=artifact_uri, artifact_sha256=artifact_sha256, training_job_id=training_job_id, dataset_name=dataset.name if dataset else None, dataset_version=dataset.version if dataset else None, hyperparameters=hyperparameters.model_dump() if hyperparameters else None, metrics=dict(metrics or {}), correlation_id=correlation_id, created_by=actor)
            session.add(row)
            self._audit(session, actor, "adapter.register", "adapter", f"{model_name}:v{version}", after={"artifact_sha256": artifact_sha256, "training_job_id": training_job_id, "dataset": dataset.model_dump() if dataset else None})
            stage_event(session, AdapterRegistered(model_name=model_name, adapter_version=version, artifact_uri=artifact_uri, artifact_sha256=artifact_sha256, training_job_id=training_job_id, dataset=dataset, hyperparameters=hyperparameters, metrics=dict(metrics or {})), correlation_id=correlation_id)
        return AdapterVersionView.model_validate(row)

    def register_trained_adapter(self, event: TrainingCompleted, *, event_id: str, correlation_id: str | None) -> AdapterVersionView:
        """Register the adapter a training job produced (training.completed), once per event and per job."""
        return self.register_adapter(f"service:trainer/{event.job_id}", model_name=event.model_name, artifact_uri=event.artifact_uri, artifact_sha256=event.artifact_sha256, training_job_id=event.job_id, dataset=event.dataset, hyperparameters=event.hyperparameters, metrics=event.metrics, correlation_id=correlation_id, event_id=event_id)

    def get_adapter(self, model_name: str, version: int) -> AdapterVersionView:
        """One adapter version."""
        with self.store.reading() as session:
            return AdapterVersionView.model_validate(self._adapter(session, model_name, version))

    def list_adapters(self, *, model_name: str | None = None, stage: Stage | None = None, dataset: DatasetRef | None = None, cursor: str | None = None, limit: int = 50) -> Page:
        """Adapter versions, filtered by model, stage or the dataset version they were trained on."""
        query = select(AdapterVersion)
        if model_name:
            query = query.where(AdapterVersion.model_name == model_name)
        if stage:
            query = query.where(AdapterVersion.stage == stage.value)
        if dataset:
            query = query.where(AdapterVersion.dataset_name == dataset.name, AdapterVersion.dataset_version == dataset.version)
        with self.store.reading() as session:
            return _page(session, query, AdapterVersion, AdapterVersionView.model_validate, cursor, limit)

    @staticmethod
    def _adapter(session: Session, model_name: str, version: int) -> AdapterVersion:
        row = session.scalar(select(AdapterVersion).where(AdapterVersion.model_name == model_name, AdapterVersion.version == version))
        if row is None:
            raise NotFound(f"no adapter version {model_name}:v{version}", param="version", code="adapter_not_found")
        return row

    def lineage(self, model_name: str, version: int) -> LineageView:
        """Where an adapter version came from (base model, dataset version, training job) and how it was judged."""
        with self.store.reading() as session:
            adapter = self._adapter(session, model_name, version)
            model = self._model(session, model_name)
            dataset = self._dataset(session, adapter.dataset_name, adapter.dataset_version) if adapter.dataset_name and adapter.dataset_version else None
            evaluations = list(session.scalars(select(EvaluationRecord).where(EvaluationRecord.model_name == model_name, EvaluationRecord.adapter_version == version).order_by(EvaluationRecord.created_at)))
            return LineageView(
                adapter=AdapterVersionView.model_validate(adapter),
                base_model=BaseModelRef(name=model.name, source=model.source, artifact_sha256=model.artifact_sha256),
                training_job_id=adapter.training_job_id,
                hyperparameters=adapter.hyperparameters,
                dataset=DatasetVersionView.model_validate(dataset) if dataset else None,
                evaluations=[EvaluationView.model_validate(row) for row in evaluations],
            )

    # -------------------------------------------------------------------------- evaluations

    def attach_evaluation(self, event: EvaluationCompleted, *, event_id: str | None = None) -> EvaluationView | None:
        """Record an evaluation result against the exact adapter version it judged; once per evaluation id.
        An evaluation of a prompt version is audited against the prompt and returns None."""
        candidate = event.candidate
        with self._change("service:evaluator", "evaluation.attach", "evaluation", event.evaluation_id) as session:
            if not self._first_time(session, event_id, "evaluation.completed"):
                return None
            existing = session.get(EvaluationRecord, event.evaluation_id)
            if existing is not None:
                return EvaluationView.model_validate(existing)
            if candidate.prompt_name is not None:
                # A prompt version was judged, on these weights: that is no evidence about the adapter, so it is
                # audited against the prompt and never counted by the adapter's promotion gate.
                self._audit(session, "service:evaluator", "evaluation.attach", "prompt", f"{candidate.prompt_name}:v{candidate.prompt_version}", after={"evaluation_id": event.evaluation_id, "passed": event.passed and event.status == "completed", "gate_policy": event.gate_policy, "model_name": candidate.model_name, "adapter_version": candidate.adapter_version})
                return None
            if candidate.adapter_version is not None:
                self._adapter(session, candidate.model_name, candidate.adapter_version)
            row = EvaluationRecord(evaluation_id=event.evaluation_id, model_name=candidate.model_name, adapter_version=candidate.adapter_version, passed=event.passed and event.status == "completed", status=event.status, gate_policy=event.gate_policy, golden_name=event.golden.name, golden_version=event.golden.version, reasons=list(event.reasons), metrics=[metric.model_dump() for metric in event.metrics], report_uri=event.report_uri)
            session.add(row)
            target = f"{candidate.model_name}:v{candidate.adapter_version}" if candidate.adapter_version else candidate.model_name
            self._audit(session, "service:evaluator", "evaluation.attach", "adapter", target, after={"evaluation_id": event.evaluation_id, "passed": row.passed, "gate_policy": event.gate_policy})
        return EvaluationView.model_validate(row)

    # ---------------------------------------------------------------------------- approvals

    def approve(self, approver: str, approver_role: Role, *, object_type: str, name: str, version: int, target: str = PRODUCTION_LABEL, comment: str | None = None) -> ApprovalView:
        """Record `approver`'s yes to promoting an adapter version (object_type adapter) or a prompt
        version (prompt) to production; a promotion by another principal uses it up."""
        object_id = f"{name}:v{version}"
        if Role.approver not in GRANTS[Role(approver_role)]:
            raise Forbidden(f"{approver} has role {Role(approver_role).value}; approving needs approver or admin", code="insufficient_role")
        with self._change(approver, "approval.grant", object_type, object_id) as session:
            if target != PRODUCTION_LABEL:
                raise Invalid(f"only promotions to {PRODUCTION_LABEL} need approval; {target!r} does not", param="target", code="approval_not_needed")
            if object_type == "adapter":
                self._adapter(session, name, version)
            else:
                self._prompt(session, name, version)
            row = Approval(object_type=object_type, object_id=object_id, target=target, approved_by=approver, approved_role=Role(approver_role).value, comment=comment)
            session.add(row)
            session.flush()
            self._audit(session, approver, "approval.grant", object_type, object_id, after={"target": target, "approval_id": row.id}, detail=comment)
        return ApprovalView.model_validate(row)

    def list_approvals(self, *, object_type: str, name: str, version: int) -> list[ApprovalView]:
        """Approvals of one adapter or prompt version, oldest first, used or not."""
        with self.store.reading() as session:
            rows = session.scalars(select(Approval).where(Approval.object_type == object_type, Approval.object_id == f"{name}:v{version}").order_by(Approval.id))  # type: ignore[arg-type]
            return [ApprovalView.model_validate(row) for row in rows]

    @staticmethod
    def _use_approval(session: Session, requester: str, object_type: str, object_id: str, target: str, how_to_approve: str) -> Approval:
        """Take the oldest unused approval of this promotion by someone other than the requester, or refuse (403)."""
        unused = list(session.scalars(select(Approval).where(Approval.object_type == object_type, Approval.object_id == object_id, Approval.target == target, Approval.used_at.is_(None)).order_by(Approval.id)))  # type: ignore[union-attr,arg-type]
        approval = next((row for row in unused if row.approved_by != requester), None)
        if approval is None:
            if unused:
                raise Forbidden(f"{object_id} to {target} was approved only by {requester}, who is requesting it: another principal with the approver role must approve ({how_to_approve})", code="self_approval")
            raise Forbidden(f"{object_id} to {target} needs an approval by another principal with the approver role: ask one to approve it first ({how_to_approve})", code="approval_required")
        approval.used_by, approval.used_at = requester, utcnow()
        session.add(approval)
        return approval

    # ------------------------------------------------------------------------------- stages

    def transition(self, actor: str, *, model_name: str, version: int, to_stage: Stage, reason: str | None = None, canary_percent: float | None = None, replaces: int | None = None) -> AdapterVersionView:
        """Move an adapter version to a stage, enforcing the gate, the approval and one production version per model.

        Entering production (from staging or archived) uses up an approval by another principal
        (`approve`); a canary already in production becomes the full version under the approval
        that admitted it.

        Becoming the full production version when another one holds it needs `replaces` naming
        that version (which is archived): a compare-and-swap, so of two concurrent promotions
        exactly one wins and the other gets a 409.
        """
        object_id = f"{model_name}:v{version}"
        with self._change(actor, f"adapter.stage.{to_stage.value}", "adapter", object_id) as session:
            model = self._model(session, model_name)
            adapter = self._adapter(session, model_name, version)
            current = Stage(adapter.stage)
            if to_stage not in TRANSITIONS[current] or (to_stage == current and canary_percent == adapter.canary_percent):
                raise Conflict(f"{object_id} is {current.value}; it cannot move to {to_stage.value} (allowed: {', '.join(sorted(s.value for s in TRANSITIONS[current] if s != current)) or 'none'})", param="to_stage", code="illegal_transition")
            if canary_percent is not None and to_stage != Stage.production:
                raise Invalid("canary_percent applies to production only", param="canary_percent")
            if canary_percent is not None and not 0 < canary_percent < 100:
                raise Invalid("canary_percent must be between 0 and 100 (exclusive)", param="canary_percent")
            events: list[StageChanged] = []
            replaced: int | None = None
            approver: str | None = None
            approval_id: int | None = None
            if to_stage == Stage.production:
                passing = session.scalar(select(EvaluationRecord).where(EvaluationRecord.model_name == model_name, EvaluationRecord.adapter_version == version, EvaluationRecord.passed.is_(True)).order_by(EvaluationRecord.created_at.desc()))  # type: ignore[attr-defined]
                if passing is None:
                    raise Conflict(f"{object_id} has no passing evaluation; run one (evaluation.requested) before promoting", param="version", code="evaluation_required")
                holder = session.scalar(select(AdapterVersion).where(AdapterVersion.model_name == model_name, AdapterVersion.stage == Stage.production.value, AdapterVersion.canary_percent.is_(None), AdapterVersion.version != version))  # type: ignore[union-attr]
                if canary_percent is None:
                    if holder is not None and replaces != holder.version:
                        raise Conflict(f"{model_name}:v{holder.version} is in production; pass replaces={holder.version} to replace it, or declare a canary with canary_percent", param="replaces", code="production_occupied")
                    if holder is None and replaces is not None:
                        raise Conflict(f"replaces={replaces} but no other version of {model_name} is in production", param="replaces", code="production_changed")
                    if holder is not None:
                        holder.stage = Stage.archived.value
                        session.add(holder)
                        session.flush()
                        replaced = holder.version
                else:
                    other_canary = session.scalar(select(AdapterVersion).where(AdapterVersion.model_name == model_name, AdapterVersion.stage == Stage.production.value, AdapterVersion.canary_percent.is_not(None), AdapterVersion.version != version))  # type: ignore[union-attr]
                    if other_canary is not None:
                        raise Conflict(f"{model_name}:v{other_canary.version} is already the canary; promote or archive it first", param="canary_percent", code="canary_occupied")
                    if holder is None:
                        raise Conflict(f"a canary needs a production version to split traffic with; {model_name} has none", param="canary_percent", code="no_production")
                how = f"flywheel registry approve {model_name} {version}, or POST /registry/v1/adapters/{model_name}/versions/{version}/approvals"
                if current == Stage.production:
                    admitted = session.scalar(select(Approval).where(Approval.object_type == "adapter", Approval.object_id == object_id, Approval.target == PRODUCTION_LABEL, Approval.used_at.is_not(None)).order_by(Approval.id.desc()))  # type: ignore[union-attr,attr-defined,arg-type]
                    if admitted is not None:
                        approver, approval_id = admitted.approved_by, admitted.id
                else:
                    approval = self._use_approval(session, actor, "adapter", object_id, PRODUCTION_LABEL, how)
                    approver, approval_id = approval.approved_by, approval.id
            before = {"stage": current.value, "canary_percent": adapter.canary_percent}
            adapter.stage = to_stage.value
            adapter.canary_percent = canary_percent
            session.add(adapter)
            # The compare-and-swap: a concurrent stage change of this model committed first makes this update miss.
            claimed = session.execute(update(BaseModelRecord).where(BaseModelRecord.id == model.id, BaseModelRecord.stage_revision == model.stage_revision).values(stage_revision=model.stage_revision + 1))  # type: ignore[arg-type]
            if claimed.rowcount != 1:
                raise Conflict(f"the stages of {model_name} changed concurrently; reload and retry", code="concurrent_change")
            events.append(StageChanged(model_name=model_name, adapter_version=version, from_stage=current, to_stage=to_stage, actor=actor, reason=reason, canary_percent=canary_percent, approver=approver, replaces_version=replaced))
            if replaced is not None:
                # After the promotion, so a follower (serving) switches production from the old version to
                # the new one in one step; the other order leaves production empty, the base model
                # answering, while the new adapter loads.
                events.append(StageChanged(model_name=model_name, adapter_version=replaced, from_stage=Stage.production, to_stage=Stage.archived, actor=actor, reason=f"replaced by v{version}", approver=approver))
            self._audit(session, actor, f"adapter.stage.{to_stage.value}", "adapter", object_id, before=before, after={"stage": to_stage.value, "canary_percent": canary_percent, "approver": approver, "approval_id": approval_id, "replaces": replaces}, detail=reason)
            for changed in events:
                stage_event(session, changed, correlation_id=adapter.correlation_id)
        return AdapterVersionView.model_validate(adapter)

    # ------------------------------------------------------------------------------ prompts

    def publish_prompt(self, actor: str, *, name: str, template: str, model_name: str | None = None, labels: list[str] | None = None) -> PromptVersionView:
        """Store the next immutable version of a prompt template and point the given labels at it."""
        with self._change(actor, "prompt.publish", "prompt", name) as session:
            if PRODUCTION_LABEL in (labels or []):
                raise Forbidden(
                    f"a new version cannot go straight to {PRODUCTION_LABEL}: publish it without that label, have another principal with the approver role approve it "
                    f"(POST /registry/v1/prompts/{name}/versions/<version>/approvals), then move the label (PUT /registry/v1/prompts/{name}/labels/{PRODUCTION_LABEL})",
                    param="labels", code="approval_required",
                )
            try:
                variables = template_variables(template)
            except TemplateSyntax as error:
                raise Invalid(f"template does not parse: line {error.lineno}: {error.message}", param="template", code="template_syntax") from None
            version = (session.scalar(select(func.max(PromptVersion.version)).where(PromptVersion.name == name)) or 0) + 1
            row = PromptVersion(name=name, version=version, template=template, variables=variables, model_name=model_name, created_by=actor)
            session.add(row)
            for label in labels or []:
                self._point_label(session, actor, name, label, version)
            self._audit(session, actor, "prompt.publish", "prompt", f"{name}:v{version}", after={"variables": variables, "labels": labels or []})
            traffic = self._label_traffic(session, name, version)
            stage_event(session, PromptPublished(prompt_name=name, version=version, model_name=model_name, template=template, variables=variables, labels=list(labels or []), label_traffic=traffic))
        return self._prompt_view(row, list(labels or []), traffic)

    def set_prompt_label(self, actor: str, *, name: str, label: str, version: int, traffic_percent: float | None = None) -> PromptVersionView:
        """Point a label at a version: publishing to a stage, or a rollback. With `traffic_percent`, the
        label also declares an A/B split: that share of production-label traffic gets its version."""
        with self._change(actor, "prompt.label", "prompt", f"{name}@{label}") as session:
            if label == PRODUCTION_LABEL and traffic_percent:
                raise Invalid(
                    f"the {PRODUCTION_LABEL} label gets the traffic no split takes; declare the share on the candidate's label, e.g. PUT /prompts/{name}/labels/candidate",
                    param="traffic_percent", code="invalid_split",
                )
            row = self._prompt(session, name, version)
            approval: Approval | None = None
            current = session.get(PromptLabel, (name, label))
            if label == PRODUCTION_LABEL and (current is None or current.version != version):
                how = f"flywheel registry approve-prompt {name} {version}, or POST /registry/v1/prompts/{name}/versions/{version}/approvals"
                approval = self._use_approval(session, actor, "prompt", f"{name}:v{version}", PRODUCTION_LABEL, how)
            self._point_label(session, actor, name, label, version, traffic_percent, approval)
            labels = list(session.scalars(select(PromptLabel.label).where(PromptLabel.name == name, PromptLabel.version == version)))
            traffic = self._label_traffic(session, name, version)
            stage_event(session, PromptPublished(prompt_name=name, version=version, model_name=row.model_name, template=row.template, variables=list(row.variables), labels=sorted(set(labels) | {label}), label_traffic=traffic))
        return self._prompt_view(row, sorted(set(labels) | {label}), traffic)

    def _point_label(self, session: Session, actor: str, name: str, label: str, version: int, traffic_percent: float | None = None, approval: Approval | None = None) -> None:
        """Move a label; its A/B share moves with it unless `traffic_percent` sets a new one (0 ends it)."""
        existing = session.get(PromptLabel, (name, label))
        before = {"version": existing.version, "traffic_percent": existing.traffic_percent} if existing else None
        share = existing.traffic_percent if existing is not None and traffic_percent is None else (traffic_percent or None)
        if existing is None:
            session.add(PromptLabel(name=name, label=label, version=version, traffic_percent=share, updated_by=actor))
        else:
            existing.version, existing.traffic_percent, existing.updated_by, existing.updated_at = version, share, actor, utcnow()
            session.add(existing)
        after: dict[str, Any] = {"version": version, "traffic_percent": share}
        if approval is not None:
            after |= {"approver": approval.approved_by, "approval_id": approval.id}
        self._audit(session, actor, "prompt.label", "prompt", f"{name}@{label}", before=before, after=after)

    @staticmethod
    def _label_traffic(session: Session, name: str, version: int) -> dict[str, float]:
        session.flush()
        pointers = session.scalars(select(PromptLabel).where(PromptLabel.name == name, PromptLabel.version == version))
        return {pointer.label: pointer.traffic_percent for pointer in pointers if pointer.traffic_percent}

    def get_prompt(self, name: str, *, version: int | None = None, label: str | None = None) -> PromptVersionView:
        """A prompt version by number, by label, or the latest."""
        with self.store.reading() as session:
            if version is None and label is not None:
                pointer = session.get(PromptLabel, (name, label))
                if pointer is None:
                    raise NotFound(f"prompt {name!r} has no label {label!r}", param="label", code="label_not_found")
                version = pointer.version
            if version is None:
                version = session.scalar(select(func.max(PromptVersion.version)).where(PromptVersion.name == name))
                if version is None:
                    raise NotFound(f"no prompt named {name!r}", param="name", code="prompt_not_found")
            row = self._prompt(session, name, version)
            labels = list(session.scalars(select(PromptLabel.label).where(PromptLabel.name == name, PromptLabel.version == version)))
            return self._prompt_view(row, sorted(labels), self._label_traffic(session, name, version))

    def list_prompts(self, *, name: str | None = None, cursor: str | None = None, limit: int = 50) -> Page:
        """Prompt versions, optionally of one name."""
        query = select(PromptVersion)
        if name:
            query = query.where(PromptVersion.name == name)
        with self.store.reading() as session:
            return _page(session, query, PromptVersion, lambda row: self._prompt_view(row, []), cursor, limit)

    def render_prompt(self, name: str, variables: dict[str, Any], *, version: int | None = None, label: str | None = None) -> str:
        """Render a prompt version in the sandbox; a missing variable is an Invalid naming it."""
        prompt = self.get_prompt(name, version=version, label=label)
        try:
            return render_template(prompt.template, variables, needs=prompt.variables)
        except MissingVariable as error:
            detail = f" needs variable(s) {', '.join(error.missing)}" if error.missing else f": {error}"
            raise Invalid(f"prompt {name}:v{prompt.version}{detail}", param="variables", code="missing_variable") from None
        except UnsafeTemplate as error:
            raise Invalid(f"prompt {name}:v{prompt.version} tried an unsafe operation: {error}", param="template", code="unsafe_template") from None

    @staticmethod
    def _prompt(session: Session, name: str, version: int) -> PromptVersion:
        row = session.scalar(select(PromptVersion).where(PromptVersion.name == name, PromptVersion.version == version))
        if row is None:
            raise NotFound(f"no prompt version {name}:v{version}", param="version", code="prompt_not_found")
        return row

    @staticmethod
    def _prompt_view(row: PromptVersion, labels: list[str], traffic: dict[str, float] | None = None) -> PromptVersionView:
        return PromptVersionView(
            name=row.name, version=row.version, template=row.template, variables=list(row.variables), model_name=row.model_name,
            labels=labels, label_traffic=traffic or {}, created_at=row.created_at, created_by=row.created_by,
        )

    # ----------------------------------------------------------------------------- datasets

    def publish_dataset(self, actor: str, *, name: str, split: str, jsonl: bytes, provenance: str = "uploaded", model_name: str | None = None) -> DatasetVersionView:
        """Validate JSONL records (errors by line number), store them by digest, and register the next version."""
        with self._change(actor, "dataset.publish", "dataset", name) as session:
            if split not in ("train", "golden"):
                raise Invalid("split must be train or golden", param="split")
            if provenance not in ("uploaded", "feedback"):
                raise Invalid("provenance must be uploaded or feedback", param="provenance")
            if len(jsonl) > self.max_dataset_bytes:
                raise TooLarge(f"dataset is {len(jsonl)} bytes; the limit is {self.max_dataset_bytes}", param="jsonl", code="dataset_too_large")
            record_format, rows = self._validate_jsonl(jsonl)
            digest = hashlib.sha256(jsonl).hexdigest()
            try:
                ref = self.artifacts.put_bytes(jsonl, kind="jsonl")
            except ArtifactError as error:
                raise Invalid(f"dataset refused: {error}", param="jsonl") from None
            version = (session.scalar(select(func.max(DatasetVersion.version)).where(DatasetVersion.name == name)) or 0) + 1
            row = DatasetVersion(name=name, version=version, split=split, record_format=record_format, row_count=rows, sha256=digest, artifact_uri=ref.uri, provenance=provenance, model_name=model_name, created_by=actor)
            session.add(row)
            self._audit(session, actor, "dataset.publish", "dataset", f"{name}:v{version}", after={"sha256": digest, "rows": rows, "split": split})
            stage_event(session, DatasetPublished(dataset_name=name, version=version, split=split, row_count=rows, sha256=digest, artifact_uri=ref.uri, provenance=provenance, model_name=model_name))
        return DatasetVersionView.model_validate(row)

    @staticmethod
    def _validate_jsonl(jsonl: bytes) -> tuple[str, int]:
        errors: list[str] = []
        formats: set[str] = set()
        rows = 0
        try:
            text = jsonl.decode("utf-8")
        except UnicodeDecodeError as error:
            raise Invalid(f"dataset is not UTF-8 (byte {error.start})", param="jsonl", code="invalid_jsonl") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                errors.append(f"line {number}: not JSON ({error.msg} at column {error.colno})")
                continue
            record_format, problem = validate_record(record)
            if problem:
                errors.append(f"line {number}: {problem}")
                continue
            formats.add(record_format)
            rows += 1
        if len(formats) > 1:
            errors.append("records mix chat and instruction formats; use one per dataset")
        if not errors and rows == 0:
            errors.append("dataset has no records")
        if errors:
            shown = "; ".join(errors[:20]) + (f"; (+{len(errors) - 20} more)" if len(errors) > 20 else "")
            raise Invalid(f"{len(errors)} invalid line(s): {shown}", param="jsonl", code="invalid_jsonl")
        return formats.pop(), rows

    def get_dataset(self, name: str, version: int) -> DatasetVersionView:
        """One dataset version."""
        with self.store.reading() as session:
            return DatasetVersionView.model_validate(self._dataset(session, name, version))

    def list_datasets(self, *, name: str | None = None, cursor: str | None = None, limit: int = 50) -> Page:
        """Dataset versions, optionally of one name."""
        query = select(DatasetVersion)
        if name:
            query = query.where(DatasetVersion.name == name)
        with self.store.reading() as session:
            return _page(session, query, DatasetVersion, DatasetVersionView.model_validate, cursor, limit)

    def dataset_rows(self, name: str, version: int, *, offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """The records of a dataset version, read back from the artifact store with their digest verified."""
        dataset = self.get_dataset(name, version)
        try:
            data = self.artifacts.get_bytes(dataset.artifact_uri, dataset.sha256)
        except ArtifactError as error:
            raise Conflict(f"dataset {name}:v{version} cannot be read: {error}", code="artifact_invalid") from None
        records = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        return records[offset : offset + max(0, min(limit, 10_000))]

    @staticmethod
    def _dataset(session: Session, name: str, version: int) -> DatasetVersion:
        row = session.scalar(select(DatasetVersion).where(DatasetVersion.name == name, DatasetVersion.version == version))
        if row is None:
            raise NotFound(f"no dataset version {name}:v{version}", param="dataset", code="dataset_not_found")
        return row

    # --------------------------------------------------------------------------------- keys

    def create_api_key(self, actor: str, *, principal: str, role: Role, ttl_s: int | None = None) -> tuple[str, ApiKey]:
        """A new API key (returned once, stored hashed under the pepper), expiring after `ttl_s` when given; audited."""
        key, _, _ = generate_key()
        expires_at = utcnow() + timedelta(seconds=ttl_s) if ttl_s else None
        with self._change(actor, "key.create", "key", principal) as session:
            row = add_key(session, key, principal=principal, role=role, created_by=actor, pepper=self.key_pepper, expires_at=expires_at)
            self._audit(session, actor, "key.create", "key", row.key_id, after={"principal": principal, "role": Role(role).value, "expires_at": _iso(expires_at)})
        return key, row

    def rotate_api_key(self, actor: str, key_id: str, *, grace_s: int = 0, ttl_s: int | None = None) -> tuple[str, ApiKey]:
        """A new key for the same principal and role; the old one is revoked now, or expires after `grace_s`."""
        key, _, _ = generate_key()
        now = utcnow()
        with self._change(actor, "key.rotate", "key", key_id) as session:
            old = session.get(ApiKey, key_id)
            if old is None or old.revoked_at is not None or (old.expires_at is not None and _aware(old.expires_at) <= now):
                raise NotFound(f"no active key {key_id}", param="key_id", code="key_not_found")
            expires_at = now + timedelta(seconds=ttl_s) if ttl_s else None
            row = add_key(session, key, principal=old.principal, role=Role(old.role), created_by=actor, pepper=self.key_pepper, expires_at=expires_at, rotated_from=old.key_id)
            if grace_s:
                old_expiry = now + timedelta(seconds=grace_s)
                old.expires_at = min(old_expiry, _aware(old.expires_at)) if old.expires_at else old_expiry
            else:
                old.revoked_at = now
            session.add(old)
            self._audit(session, actor, "key.rotate", "key", key_id, before={"principal": old.principal, "role": old.role}, after={"new_key_id": row.key_id, "old_expires_at": _iso(old.expires_at), "old_revoked": old.revoked_at is not None})
        return key, row

    def list_api_keys(self, *, principal: str | None = None, cursor: str | None = None, limit: int = 100) -> list[ApiKeyView]:
        """Keys (never their secrets), by principal when given, ordered by key id."""
        query = select(ApiKey).order_by(ApiKey.key_id).limit(max(1, min(limit, MAX_LIMIT)))  # type: ignore[arg-type]
        if principal:
            query = query.where(ApiKey.principal == principal)
        if cursor:
            query = query.where(ApiKey.key_id > cursor)
        with self.store.reading() as session:
            return [ApiKeyView.model_validate(row) for row in session.scalars(query)]

    def revoke_api_key(self, actor: str, key_id: str) -> None:
        """Revoke a key by id."""
        with self._change(actor, "key.revoke", "key", key_id) as session:
            row = session.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                raise NotFound(f"no active key {key_id}", param="key_id", code="key_not_found")
            row.revoked_at = utcnow()
            session.add(row)
            self._audit(session, actor, "key.revoke", "key", key_id, before={"principal": row.principal, "role": row.role})

    # -------------------------------------------------------------------------------- audit

    def audit(self, *, object_type: str | None = None, object_id: str | None = None, actor: str | None = None, cursor: str | None = None, limit: int = 100) -> Page:
        """Audit entries, oldest first, by object and/or by actor."""
        query = select(AuditEntry)
        if object_type:
            query = query.where(AuditEntry.object_type == object_type)
        if object_id:
            query = query.where(AuditEntry.object_id == object_id)
        if actor:
            query = query.where(AuditEntry.actor == actor)
        with self.store.reading() as session:
            return _page(session, query, AuditEntry, AuditEntryView.model_validate, cursor, limit)
