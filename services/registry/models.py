"""The registry's tables (SQLModel). The views its door returns are contracts (contracts/http.py).

Versions are immutable rows: nothing but `stage`/`canary_percent` of an adapter version, the
`version` a prompt label points at and the active `version` of a guard policy ever changes after insert.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from contracts.events import Stage

# Imported so that ApiKey's table is part of the metadata the migrations create.
from services.runtime.auth import ApiKey  # noqa: F401


def utcnow() -> datetime:
    return datetime.now(UTC)


def _when() -> Any:
    return Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class BaseModelRecord(SQLModel, table=True):
    __tablename__ = "base_model"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, unique=True)
    source: str = Field(max_length=1000)
    architecture: str = Field(max_length=200)
    parameter_count: int
    license: str | None = Field(default=None, max_length=200)
    artifact_uri: str = Field(max_length=2000)
    artifact_sha256: str = Field(max_length=64)
    chat_template: str | None = Field(default=None, sa_column=Column(Text))
    details: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Bumped by every stage change of the model's adapters: a compare-and-swap on it makes
    # concurrent promotions serialise, and the loser learns it lost (409) instead of overwriting.
    stage_revision: int = 0
    created_at: datetime = _when()
    created_by: str = Field(max_length=256)


class AdapterVersion(SQLModel, table=True):
    __tablename__ = "adapter_version"
    __table_args__ = (
        UniqueConstraint("model_name", "version", name="uq_adapter_version"),
        # The database itself refuses a second full production version of a model.
        Index(
            "uq_adapter_one_production",
            "model_name",
            unique=True,
            sqlite_where=text("stage = 'production' AND canary_percent IS NULL"),
            postgresql_where=text("stage = 'production' AND canary_percent IS NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(max_length=200, foreign_key="base_model.name", index=True)
    version: int
    stage: str = Field(default=Stage.none.value, max_length=16)
    canary_percent: float | None = None
    artifact_uri: str = Field(max_length=2000)
    artifact_sha256: str = Field(max_length=64)
    # Unique: a redelivered training.completed finds its adapter instead of making a second one.
    training_job_id: str | None = Field(default=None, max_length=200, unique=True)
    dataset_name: str | None = Field(default=None, max_length=200, index=True)
    dataset_version: int | None = None
    # sft_then_dpo: the DPO stage's pairs; dataset_* above is the SFT stage's, what the next SFT retraining learns.
    preference_dataset_name: str | None = Field(default=None, max_length=200)
    preference_dataset_version: int | None = None
    hyperparameters: dict | None = Field(default=None, sa_column=Column(JSON))
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    correlation_id: str | None = Field(default=None, max_length=200)
    created_at: datetime = _when()
    created_by: str = Field(max_length=256)


class EvaluationRecord(SQLModel, table=True):
    __tablename__ = "evaluation"

    evaluation_id: str = Field(primary_key=True, max_length=200)
    model_name: str = Field(max_length=200, index=True)
    adapter_version: int | None = None
    passed: bool
    status: str = Field(max_length=32)
    gate_policy: str = Field(max_length=200)
    golden_name: str = Field(max_length=200)
    golden_version: int
    reasons: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    metrics: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    report_uri: str | None = Field(default=None, max_length=2000)
    created_at: datetime = _when()


class PromptVersion(SQLModel, table=True):
    __tablename__ = "prompt_version"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_prompt_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, index=True)
    version: int
    template: str = Field(sa_column=Column(Text, nullable=False))
    variables: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    model_name: str | None = Field(default=None, max_length=200)
    created_at: datetime = _when()
    created_by: str = Field(max_length=256)


class PromptLabel(SQLModel, table=True):
    __tablename__ = "prompt_label"

    name: str = Field(primary_key=True, max_length=200)
    label: str = Field(primary_key=True, max_length=100)
    version: int
    traffic_percent: float | None = None  # an A/B share of the production label's traffic, sticky per user
    updated_at: datetime = _when()
    updated_by: str = Field(max_length=256)


class GuardPolicyVersion(SQLModel, table=True):
    """An immutable version of a guard policy: what a gateway does inline with a model's traffic, the whole
    model's or, by attached_to, one route's ("route:<route>") or one prompt's ("prompt:<name>")."""

    __tablename__ = "guard_policy_version"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_guard_policy_version"),
        # Every version of a name guards the attachment of its first (guard_policies.py refuses another), so
        # one first version per attachment is the database's own refusal of a second policy name for it.
        Index(
            "uq_guard_policy_one_per_attachment",
            "model_name",
            "attached_to",
            unique=True,
            sqlite_where=text("version = 1"),
            postgresql_where=text("version = 1"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, index=True)
    version: int
    model_name: str = Field(max_length=200)
    attached_to: str = Field(max_length=220)  # "" (the whole model), "route:<route>" or "prompt:<name>"
    spec: dict = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = _when()
    created_by: str = Field(max_length=256)


class GuardPolicyActive(SQLModel, table=True):
    """Which version of a guard policy the gateway applies; moving it back is a rollback."""

    __tablename__ = "guard_policy_active"

    name: str = Field(primary_key=True, max_length=200)
    version: int
    updated_at: datetime = _when()
    updated_by: str = Field(max_length=256)


class RubricVersion(SQLModel, table=True):
    """An immutable version of a review rubric: what reviewers are asked, and the dimensions they score on."""

    __tablename__ = "rubric_version"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_rubric_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, index=True)
    version: int
    instructions: str = Field(sa_column=Column(Text, nullable=False))
    dimensions: list = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = _when()
    created_by: str = Field(max_length=256)


class DatasetVersion(SQLModel, table=True):
    __tablename__ = "dataset_version"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_dataset_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, index=True)
    version: int
    split: str = Field(max_length=16)
    record_format: str = Field(max_length=16)
    row_count: int
    sha256: str = Field(max_length=64)
    artifact_uri: str = Field(max_length=2000)
    provenance: str = Field(max_length=32)
    model_name: str | None = Field(default=None, max_length=200)
    created_at: datetime = _when()
    created_by: str = Field(max_length=256)


class AuditEntry(SQLModel, table=True):
    """Append-only: the service only inserts, and the database refuses UPDATE and DELETE (migration 0002)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_object", "object_type", "object_id"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _when()
    actor: str = Field(max_length=256, index=True)
    action: str = Field(max_length=100)
    object_type: str = Field(max_length=50)
    object_id: str = Field(max_length=300)
    outcome: str = Field(max_length=16)  # ok or refused
    before: dict | None = Field(default=None, sa_column=Column(JSON))
    after: dict | None = Field(default=None, sa_column=Column(JSON))
    detail: str | None = Field(default=None, sa_column=Column(Text))


class Approval(SQLModel, table=True):
    """An approver's yes to one production promotion (an adapter version, or a prompt version under the
    production label). It admits one promotion by another principal, then records who used it."""

    __tablename__ = "approval"
    __table_args__ = (Index("ix_approval_object", "object_type", "object_id"),)

    id: int | None = Field(default=None, primary_key=True)
    object_type: str = Field(max_length=50)  # adapter or prompt
    object_id: str = Field(max_length=300)  # smol:v2, or greeting:v3
    target: str = Field(max_length=100)  # the stage or label approved: production
    approved_by: str = Field(max_length=256)
    approved_role: str = Field(max_length=16)
    approved_at: datetime = _when()
    comment: str | None = Field(default=None, sa_column=Column(Text))
    used_by: str | None = Field(default=None, max_length=256)
    used_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class OutboxEvent(SQLModel, table=True):
    """An event written in the transaction of the change it announces; the relay publishes it later."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(max_length=36, unique=True)
    event_type: str = Field(max_length=100)
    envelope: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _when()
    sent_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True), index=True)


class ProcessedEvent(SQLModel, table=True):
    """Consumed event ids, recorded in the same transaction as the side effect they caused."""

    __tablename__ = "processed_event"

    event_id: str = Field(primary_key=True, max_length=36)
    event_type: str = Field(max_length=100)
    processed_at: datetime = _when()


class SchemaMigration(SQLModel, table=True):
    __tablename__ = "schema_migration"

    version: int = Field(primary_key=True)
    name: str = Field(max_length=200)
    applied_at: datetime = _when()
