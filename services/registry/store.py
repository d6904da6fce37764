"""The registry database: the only module that opens connections, and the queries the sub-domains
(base_models, adapters, approvals, prompts, guard_policies, rubrics, datasets, keys) run in the sessions it opens. SQLite by
default, PostgreSQL by URL.

Migrations: numbered modules in `migrations/` (m0001_initial ...), each an `upgrade(op)` written
with alembic's `Operations`, recorded in `schema_migration`. Alembic's operations give portable DDL
for both databases (SQLite's batch mode included) without an alembic.ini or a script directory to
ship; its environment machinery would buy nothing for a schema owned by one service. A test checks
that the migrated schema equals models.py (alembic's compare_metadata), so a model change without a
migration fails CI.
"""

from __future__ import annotations

import base64
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Engine, func, insert, select, text, update
from sqlmodel import Session

from contracts.events import DatasetRef, Stage
from services.registry import migrations
from services.registry.errors import Invalid, NotFound
from services.registry.models import (
    AdapterVersion,
    Approval,
    AuditEntry,
    BaseModelRecord,
    DatasetVersion,
    EvaluationRecord,
    GuardPolicyActive,
    GuardPolicyVersion,
    PromptLabel,
    PromptVersion,
    RubricVersion,
    SchemaMigration,
    utcnow,
)
from services.runtime.auth import ApiKey, create_database_engine

MAX_LIMIT = 500

# Any constant: PostgreSQL's advisory lock keeps two starting registries from migrating at once.
_MIGRATION_LOCK = 0x466C7977


def _migrations() -> list[tuple[int, str, object]]:
    found = []
    for info in pkgutil.iter_modules(migrations.__path__):
        if info.name.startswith("m") and info.name[1:5].isdigit():
            module = importlib.import_module(f"{migrations.__name__}.{info.name}")
            found.append((int(info.name[1:5]), info.name, module.upgrade))
    return sorted(found, key=lambda item: item[0])


class RegistryStore:
    """Connections to the registry database, transactions, and schema migrations."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_database_engine(url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> list[str]:
        """Apply pending migrations in one transaction; returns the names applied."""
        applied_now: list[str] = []
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            SchemaMigration.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]
            done = set(conn.scalars(select(SchemaMigration.version)))  # type: ignore[call-overload]
            for version, name, upgrade in _migrations():
                if version in done:
                    continue
                upgrade(Operations(MigrationContext.configure(conn)))  # type: ignore[operator]
                conn.execute(insert(SchemaMigration).values(version=version, name=name, applied_at=utcnow()))
                applied_now.append(name)
        return applied_now

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits at the end of the block, or rolls back on any error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads."""
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()


# ------------------------------------------------------------------------------------- paging


@dataclass
class Page:
    items: list[Any]
    next_cursor: str | None


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
        raise Invalid(
            "cursor is not one this registry issued; pass the next_cursor of a previous page", param="cursor"
        ) from None


def page(session: Session, query: Any, model: Any, view: Callable[[Any], Any], cursor: str | None, limit: int) -> Page:
    """One page of `query`'s rows by id, as `view`s, with the cursor of the next page when there is one."""
    limit = max(1, min(limit, MAX_LIMIT))
    rows = list(session.scalars(query.where(model.id > _decode_cursor(cursor)).order_by(model.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(items=[view(row) for row in rows], next_cursor=_encode_cursor(rows[-1].id) if more else None)


# ----------------------------------------------------------------------- models and adapters


def model_named(session: Session, name: str) -> BaseModelRecord:
    """The base model `name`, or NotFound."""
    row = session.scalar(select(BaseModelRecord).where(BaseModelRecord.name == name))
    if row is None:
        raise NotFound(f"no model named {name!r}", param="model_name", code="model_not_found")
    return row


def model_exists(session: Session, name: str) -> bool:
    """Whether a base model is registered as `name`."""
    return session.scalar(select(BaseModelRecord).where(BaseModelRecord.name == name)) is not None


def models_query() -> Any:
    """Every base model."""
    return select(BaseModelRecord)


def adapter_version(session: Session, model_name: str, version: int) -> AdapterVersion:
    """An adapter version, or NotFound."""
    row = session.scalar(
        select(AdapterVersion).where(AdapterVersion.model_name == model_name, AdapterVersion.version == version)
    )
    if row is None:
        raise NotFound(f"no adapter version {model_name}:v{version}", param="version", code="adapter_not_found")
    return row


def adapter_of_job(session: Session, training_job_id: str | None) -> AdapterVersion | None:
    """The adapter version a training job registered, if any."""
    return session.scalar(select(AdapterVersion).where(AdapterVersion.training_job_id == training_job_id))


def next_adapter_version(session: Session, model_name: str) -> int:
    """The number the next adapter version of a model gets."""
    return (
        session.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.model_name == model_name)) or 0
    ) + 1


def adapters_query(model_name: str | None, stage: Stage | None, dataset: DatasetRef | None) -> Any:
    """Adapter versions, filtered by model, stage or the dataset version they were trained on."""
    query = select(AdapterVersion)
    if model_name:
        query = query.where(AdapterVersion.model_name == model_name)
    if stage:
        query = query.where(AdapterVersion.stage == stage.value)
    if dataset:
        query = query.where(
            AdapterVersion.dataset_name == dataset.name, AdapterVersion.dataset_version == dataset.version
        )
    return query


def evaluations_of(session: Session, model_name: str, version: int) -> list[EvaluationRecord]:
    """The evaluations of an adapter version, oldest first."""
    return list(
        session.scalars(
            select(EvaluationRecord)
            .where(EvaluationRecord.model_name == model_name, EvaluationRecord.adapter_version == version)
            .order_by(EvaluationRecord.created_at)
        )
    )  # type: ignore[arg-type]


def latest_passing_evaluation(session: Session, model_name: str, version: int) -> EvaluationRecord | None:
    """The newest passing evaluation of an adapter version."""
    return session.scalar(
        select(EvaluationRecord)
        .where(
            EvaluationRecord.model_name == model_name,
            EvaluationRecord.adapter_version == version,
            EvaluationRecord.passed.is_(True),
        )
        .order_by(EvaluationRecord.created_at.desc())
    )  # type: ignore[attr-defined]


def production_holder(session: Session, model_name: str, other_than: int) -> AdapterVersion | None:
    """The full (not canary) production version of a model, other than `other_than`."""
    return session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.model_name == model_name,
            AdapterVersion.stage == Stage.production.value,
            AdapterVersion.canary_percent.is_(None),
            AdapterVersion.version != other_than,
        )
    )  # type: ignore[union-attr]


def production_canary(session: Session, model_name: str, other_than: int) -> AdapterVersion | None:
    """The canary in production of a model, other than `other_than`."""
    return session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.model_name == model_name,
            AdapterVersion.stage == Stage.production.value,
            AdapterVersion.canary_percent.is_not(None),
            AdapterVersion.version != other_than,
        )
    )  # type: ignore[union-attr]


def claim_stage_revision(session: Session, model: BaseModelRecord) -> bool:
    """The compare-and-swap of a model's stages: False when another stage change committed since `model` was read."""
    claimed = session.execute(
        update(BaseModelRecord)
        .where(BaseModelRecord.id == model.id, BaseModelRecord.stage_revision == model.stage_revision)
        .values(stage_revision=model.stage_revision + 1)
    )  # type: ignore[arg-type]
    return bool(claimed.rowcount == 1)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------- approvals


def unused_approvals(session: Session, object_type: str, object_id: str, target: str) -> list[Approval]:
    """Approvals of a promotion not used yet, oldest first."""
    return list(
        session.scalars(
            select(Approval)
            .where(
                Approval.object_type == object_type,
                Approval.object_id == object_id,
                Approval.target == target,
                Approval.used_at.is_(None),
            )
            .order_by(Approval.id)
        )
    )  # type: ignore[union-attr,arg-type]


def last_used_approval(session: Session, object_type: str, object_id: str, target: str) -> Approval | None:
    """The approval that admitted the last promotion of this object to `target`."""
    return session.scalar(
        select(Approval)
        .where(
            Approval.object_type == object_type,
            Approval.object_id == object_id,
            Approval.target == target,
            Approval.used_at.is_not(None),
        )
        .order_by(Approval.id.desc())
    )  # type: ignore[union-attr,attr-defined,arg-type]


def approvals_of(session: Session, object_type: str, object_id: str) -> list[Approval]:
    """Every approval of an object, oldest first, used or not."""
    return list(
        session.scalars(
            select(Approval)
            .where(Approval.object_type == object_type, Approval.object_id == object_id)
            .order_by(Approval.id)
        )
    )  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ prompts


def prompt_version(session: Session, name: str, version: int) -> PromptVersion:
    """A prompt version, or NotFound."""
    row = session.scalar(select(PromptVersion).where(PromptVersion.name == name, PromptVersion.version == version))
    if row is None:
        raise NotFound(f"no prompt version {name}:v{version}", param="version", code="prompt_not_found")
    return row


def latest_prompt_version(session: Session, name: str) -> int | None:
    """The newest version number of a prompt, None when there is none."""
    return session.scalar(select(func.max(PromptVersion.version)).where(PromptVersion.name == name))


def labels_of(session: Session, name: str, version: int) -> list[str]:
    """The labels pointing at a prompt version."""
    return list(
        session.scalars(select(PromptLabel.label).where(PromptLabel.name == name, PromptLabel.version == version))
    )


def label_traffic(session: Session, name: str, version: int) -> dict[str, float]:
    """The A/B shares of the labels pointing at a prompt version (labels without a share left out)."""
    session.flush()
    pointers = session.scalars(select(PromptLabel).where(PromptLabel.name == name, PromptLabel.version == version))
    return {pointer.label: pointer.traffic_percent for pointer in pointers if pointer.traffic_percent}


def prompts_query(name: str | None) -> Any:
    """Prompt versions, optionally of one name."""
    query = select(PromptVersion)
    return query.where(PromptVersion.name == name) if name else query


# ----------------------------------------------------------------------------- guard policies


def guard_policy_version(session: Session, name: str, version: int) -> GuardPolicyVersion:
    """A guard policy version, or NotFound."""
    row = session.scalar(
        select(GuardPolicyVersion).where(GuardPolicyVersion.name == name, GuardPolicyVersion.version == version)
    )
    if row is None:
        raise NotFound(f"no guard policy version {name}:v{version}", param="version", code="guard_policy_not_found")
    return row


def latest_guard_policy_version(session: Session, name: str) -> int | None:
    """The newest version number of a guard policy, None when there is none."""
    return session.scalar(select(func.max(GuardPolicyVersion.version)).where(GuardPolicyVersion.name == name))


def first_guard_policy_version(session: Session, name: str) -> GuardPolicyVersion | None:
    """The first version of a guard policy (the one that bound it to its model), None when there is none."""
    return session.scalar(
        select(GuardPolicyVersion).where(GuardPolicyVersion.name == name, GuardPolicyVersion.version == 1)
    )


def guard_policy_attached(session: Session, model_name: str, attached_to: str) -> str | None:
    """The name of the guard policy attached there (the whole model: attached_to ""), None when none is."""
    return session.scalar(
        select(GuardPolicyVersion.name).where(
            GuardPolicyVersion.model_name == model_name,
            GuardPolicyVersion.attached_to == attached_to,
            GuardPolicyVersion.version == 1,
        )
    )


def active_guard_policy_versions(session: Session, names: set[str]) -> dict[str, int]:
    """The active version of each of these guard policies that has one."""
    if not names:
        return {}
    pointers = session.scalars(select(GuardPolicyActive).where(GuardPolicyActive.name.in_(names)))  # type: ignore[attr-defined]
    return {pointer.name: pointer.version for pointer in pointers}


def guard_policies_query(name: str | None) -> Any:
    """Guard policy versions, optionally of one name."""
    query = select(GuardPolicyVersion)
    return query.where(GuardPolicyVersion.name == name) if name else query


# ------------------------------------------------------------------------------------ rubrics


def rubric_version(session: Session, name: str, version: int) -> RubricVersion:
    """A rubric version, or NotFound."""
    row = session.scalar(select(RubricVersion).where(RubricVersion.name == name, RubricVersion.version == version))
    if row is None:
        raise NotFound(f"no rubric version {name}:v{version}", param="version", code="rubric_not_found")
    return row


def latest_rubric_version(session: Session, name: str) -> int | None:
    """The newest version number of a rubric, None when there is none."""
    return session.scalar(select(func.max(RubricVersion.version)).where(RubricVersion.name == name))


def latest_rubrics_query() -> Any:
    """The newest version of every rubric."""
    newest = (
        select(RubricVersion.name, func.max(RubricVersion.version).label("version"))
        .group_by(RubricVersion.name)
        .subquery()
    )
    return select(RubricVersion).join(
        newest, (RubricVersion.name == newest.c.name) & (RubricVersion.version == newest.c.version)
    )


def rubric_versions_query(name: str) -> Any:
    """Every version of one rubric."""
    return select(RubricVersion).where(RubricVersion.name == name)


# ----------------------------------------------------------------------------------- datasets


def dataset_version(session: Session, name: str, version: int) -> DatasetVersion:
    """A dataset version, or NotFound."""
    row = session.scalar(select(DatasetVersion).where(DatasetVersion.name == name, DatasetVersion.version == version))
    if row is None:
        raise NotFound(f"no dataset version {name}:v{version}", param="dataset", code="dataset_not_found")
    return row


def next_dataset_version(session: Session, name: str) -> int:
    """The number the next version of a dataset gets."""
    return (session.scalar(select(func.max(DatasetVersion.version)).where(DatasetVersion.name == name)) or 0) + 1


def next_prompt_version(session: Session, name: str) -> int:
    """The number the next version of a prompt gets."""
    return (latest_prompt_version(session, name) or 0) + 1


def datasets_query(name: str | None) -> Any:
    """Dataset versions, optionally of one name."""
    query = select(DatasetVersion)
    return query.where(DatasetVersion.name == name) if name else query


# ------------------------------------------------------------------------------ keys and audit


def keys_query(principal: str | None, after_key_id: str | None, limit: int) -> Any:
    """API keys ordered by key id, by principal when given, after a key id when given."""
    query = select(ApiKey).order_by(ApiKey.key_id).limit(max(1, min(limit, MAX_LIMIT)))  # type: ignore[arg-type]
    if principal:
        query = query.where(ApiKey.principal == principal)
    if after_key_id:
        query = query.where(ApiKey.key_id > after_key_id)
    return query


def audit_query(object_type: str | None, object_id: str | None, actor: str | None) -> Any:
    """Audit entries by object and/or by actor."""
    query = select(AuditEntry)
    if object_type:
        query = query.where(AuditEntry.object_type == object_type)
    if object_id:
        query = query.where(AuditEntry.object_id == object_id)
    if actor:
        query = query.where(AuditEntry.actor == actor)
    return query
