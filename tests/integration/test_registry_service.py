"""The registry's rules on real SQLite and real PostgreSQL: versions, lineage, gated stages, concurrency,
outbox atomicity, prompts, datasets and the audit log."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel

from contracts.events import DatasetRef, Hyperparameters, Stage
from services.registry import adapters as adapters_module
from services.registry.models import AdapterVersion, OutboxEvent
from services.registry.errors import Conflict, Forbidden, Invalid, NotFound, TooLarge
from services.registry.service import Registry
from services.runtime.auth import Role
from services.runtime.http import status_of
from tests.integration.registry_support import (
    CHAT,
    database_url,  # noqa: F401 - a fixture
    evaluation,
    jsonl,
    registry,  # noqa: F401 - a fixture
    seed_adapters,
    seed_model,
    training_completed,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def approve(registry: Registry, version: int, *, by: str = "pat", model: str = "smol") -> None:
    """An approval of promoting `model`:v`version` to production, recorded by an approver."""
    registry.approvals.approve(by, Role.approver, object_type="adapter", name=model, version=version)


def outbox(registry: Registry) -> list[OutboxEvent]:
    with registry.store.reading() as session:
        return list(session.scalars(select(OutboxEvent).order_by(OutboxEvent.id)))


def refused(registry: Registry) -> list:
    return [entry for entry in registry.changes.entries(limit=500).items if entry.outcome == "refused"]


def test_migrated_schema_matches_the_models(registry: Registry) -> None:
    with registry.store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == [], f"models.py and the migrations disagree; add a migration: {diff}"
    assert registry.store.migrate() == []  # idempotent


def test_adapter_versions_are_numbered_per_model_with_lineage_both_ways(registry: Registry, tmp_path: Path) -> None:
    seed_adapters(registry, tmp_path, count=2)
    v1, v2 = registry.adapters.list_adapters(model_name="smol").items
    assert (v1.version, v2.version) == (1, 2) and v1.stage == Stage.none
    assert v1.dataset_name == "support" and v1.hyperparameters["rank"] == 4 and v1.metrics == {"final_loss": 0.5}
    lineage = registry.adapters.lineage("smol", 1)
    assert lineage.training_job_id == "job-0" and lineage.dataset.sha256 and lineage.evaluations[0].passed
    # From the dataset back to every adapter trained on it.
    assert [
        a.version for a in registry.adapters.list_adapters(dataset=DatasetRef(name="support", version=1)).items
    ] == [1, 2]
    with pytest.raises(NotFound, match="no adapter version smol:v9"):
        registry.adapters.get_adapter("smol", 9)


def test_an_sft_then_dpo_adapter_records_its_sft_dataset_as_its_dataset_and_its_preference_dataset_beside_it(
    registry: Registry, tmp_path: Path
) -> None:
    seed_adapters(registry, tmp_path, count=0)
    pair = {"prompt": [{"role": "user", "content": "Warranty?"}], "chosen": "Two years.", "rejected": "Seven weeks."}
    registry.datasets.publish_dataset("alice", name="support-preferences", split="train", jsonl=jsonl([pair]))
    pairs = DatasetRef(name="support-preferences", version=1)
    event = training_completed(
        registry, tmp_path, job_id="job-staged", hyperparameters=Hyperparameters(rank=4, method="sft_then_dpo")
    ).model_copy(update={"preference_dataset": pairs})
    adapter = registry.adapters.register_trained_adapter(event, event_id=str(uuid.uuid4()), correlation_id=None)
    assert (adapter.dataset_name, adapter.dataset_version) == ("support", 1)
    assert (adapter.preference_dataset_name, adapter.preference_dataset_version) == ("support-preferences", 1)
    assert registry.adapters.lineage("smol", adapter.version).dataset.name == "support"
    [registered] = [row for row in outbox(registry) if row.event_type == "adapter.registered"]
    assert json.loads(registered.envelope)["payload"]["preference_dataset"] == pairs.model_dump()


def test_redelivered_training_completed_registers_one_version(registry: Registry, tmp_path: Path) -> None:
    seed_adapters(registry, tmp_path, count=0)
    event = training_completed(registry, tmp_path, job_id="job-x")
    event_id = str(uuid.uuid4())
    first = registry.adapters.register_trained_adapter(event, event_id=event_id, correlation_id=None)
    again = registry.adapters.register_trained_adapter(event, event_id=event_id, correlation_id=None)
    # The same job reported under a new event id (a trainer that re-sent) is the same adapter too.
    resent = registry.adapters.register_trained_adapter(event, event_id=str(uuid.uuid4()), correlation_id=None)
    assert first.version == again.version == resent.version == 1
    assert len(registry.adapters.list_adapters().items) == 1
    assert [row.event_type for row in outbox(registry)].count("adapter.registered") == 1


def test_tampered_adapter_artifact_is_refused_and_audited(registry: Registry, tmp_path: Path) -> None:
    seed_adapters(registry, tmp_path, count=0)
    event = training_completed(registry, tmp_path, job_id="job-t")
    with pytest.raises(Invalid, match="tampered or corrupt|expected"):
        registry.adapters.register_adapter(
            "bob", model_name="smol", artifact_uri=event.artifact_uri, artifact_sha256="0" * 64, training_job_id="job-t"
        )
    assert registry.adapters.list_adapters().items == []
    assert refused(registry)[-1].actor == "bob"


def test_a_passing_prompt_evaluation_on_an_adapter_is_no_gate_evidence_for_that_adapter(
    registry: Registry, tmp_path: Path
) -> None:
    seed_adapters(registry, tmp_path, count=1, evaluated=False)
    prompt_run = evaluation("smol", 1, passed=True)
    prompt_run = prompt_run.model_copy(
        update={"candidate": prompt_run.candidate.model_copy(update={"prompt_name": "support", "prompt_version": 2})}
    )
    assert registry.adapters.attach_evaluation(prompt_run) is None
    registry.adapters.transition("olga", model_name="smol", version=1, to_stage=Stage.staging)
    approve(registry, 1)
    with pytest.raises(Conflict, match="no passing evaluation"):
        registry.adapters.transition("olga", model_name="smol", version=1, to_stage=Stage.production)
    audited = registry.changes.entries(object_type="prompt", object_id="support:v2").items
    assert [(entry.action, entry.after["evaluation_id"], entry.after["passed"]) for entry in audited] == [
        ("evaluation.attach", prompt_run.evaluation_id, True)
    ]


def test_promotion_needs_a_passing_evaluation_of_that_version_and_an_approval(
    registry: Registry, tmp_path: Path
) -> None:
    seed_adapters(registry, tmp_path, count=2, evaluated=False)
    registry.adapters.attach_evaluation(evaluation("smol", 2, passed=True))  # passing, but of v2
    registry.adapters.attach_evaluation(evaluation("smol", 1, passed=False))
    registry.adapters.transition("olga", model_name="smol", version=1, to_stage=Stage.staging)
    approve(registry, 1)
    events_before = len(outbox(registry))
    with pytest.raises(Conflict, match="no passing evaluation") as error:
        registry.adapters.transition("olga", model_name="smol", version=1, to_stage=Stage.production)
    assert status_of(error.value) == 409 and error.value.code == "evaluation_required"
    with pytest.raises(Conflict, match="cannot move to production"):
        registry.adapters.transition(
            "olga", model_name="smol", version=2, to_stage=Stage.production
        )  # v2 is still `none`
    assert (
        registry.adapters.get_adapter("smol", 1).stage == Stage.staging
        and registry.adapters.get_adapter("smol", 2).stage == Stage.none
    )
    assert len(outbox(registry)) == events_before
    registry.adapters.transition("olga", model_name="smol", version=2, to_stage=Stage.staging)
    with pytest.raises(Forbidden, match="needs an approval by another principal with the approver role") as missing:
        registry.adapters.transition("olga", model_name="smol", version=2, to_stage=Stage.production)
    assert status_of(missing.value) == 403 and missing.value.code == "approval_required"
    # Rule refusals are audited; the missing approval is a refusal of who is asking, and writes nothing.
    assert [entry.actor for entry in refused(registry)] == ["olga", "olga"]
    approve(registry, 2)
    promoted = registry.adapters.transition(
        "olga", model_name="smol", version=2, to_stage=Stage.production, reason="beats base"
    )
    assert promoted.stage == Stage.production
    audit = registry.changes.entries(object_type="adapter", object_id="smol:v2").items
    assert (
        audit[-1].actor == "olga"
        and audit[-1].after["approver"] == "pat"
        and audit[-1].before == {"stage": "staging", "canary_percent": None}
    )
    assert [row.event_type for row in outbox(registry)][-1] == "stage.changed"


def test_one_production_version_unless_canary_and_replacement_archives(registry: Registry, tmp_path: Path) -> None:
    seed_adapters(registry, tmp_path, count=3)
    for version in (1, 2, 3):
        registry.adapters.transition("olga", model_name="smol", version=version, to_stage=Stage.staging)
    for version in (1, 2, 3):
        approve(registry, version)
    registry.adapters.transition("olga", model_name="smol", version=1, to_stage=Stage.production)
    with pytest.raises(Conflict, match="pass replaces=1"):
        registry.adapters.transition("olga", model_name="smol", version=2, to_stage=Stage.production)
    canary = registry.adapters.transition(
        "olga", model_name="smol", version=2, to_stage=Stage.production, canary_percent=10
    )
    assert canary.canary_percent == 10
    with pytest.raises(Conflict, match="already the canary"):
        registry.adapters.transition("olga", model_name="smol", version=3, to_stage=Stage.production, canary_percent=5)
    # The canary becomes the full version under the approval that admitted it to production.
    full = registry.adapters.transition("olga", model_name="smol", version=2, to_stage=Stage.production, replaces=1)
    assert full.canary_percent is None and registry.adapters.get_adapter("smol", 1).stage == Stage.archived
    promoted, archived = (
        json.loads(row.envelope)["payload"] for row in outbox(registry)[-2:]
    )  # promotion first: production never empty
    assert (archived["adapter_version"], archived["to_stage"], archived["approver"], archived["replaces_version"]) == (
        1,
        "archived",
        "pat",
        None,
    )
    assert (promoted["adapter_version"], promoted["to_stage"], promoted["approver"], promoted["replaces_version"]) == (
        2,
        "production",
        "pat",
        1,
    )
    # Rollback is one call: the archived version comes back and replaces the current one.
    approve(registry, 1)  # a rollback is a promotion too: the archived version needs a new approval
    registry.adapters.transition(
        "olga", model_name="smol", version=1, to_stage=Stage.production, replaces=2, reason="rollback"
    )
    assert [a.version for a in registry.adapters.list_adapters(stage=Stage.production).items] == [1]


def test_concurrent_promotions_of_two_versions_exactly_one_wins(registry: Registry, tmp_path: Path) -> None:
    seed_adapters(registry, tmp_path, count=2)
    for version in (1, 2):
        registry.adapters.transition("olga", model_name="smol", version=version, to_stage=Stage.staging)
    barrier = threading.Barrier(2)
    outcomes: dict[int, str] = {}

    def promote(version: int) -> None:
        barrier.wait()
        try:
            registry.adapters.transition(f"op{version}", model_name="smol", version=version, to_stage=Stage.production)
            outcomes[version] = "won"
        except Conflict as error:
            outcomes[version] = error.code

    for _ in range(3):  # the race, several times; reset between rounds
        outcomes.clear()
        for version in (1, 2):
            approve(registry, version)
        threads = [threading.Thread(target=promote, args=(version,)) for version in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(outcomes.values()).count("won") == 1, outcomes
        winner = next(version for version, outcome in outcomes.items() if outcome == "won")
        assert [a.version for a in registry.adapters.list_adapters(stage=Stage.production).items] == [winner]
        registry.adapters.transition("olga", model_name="smol", version=winner, to_stage=Stage.staging)


def test_a_rolled_back_change_emits_no_event(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_adapters(registry, tmp_path, count=1)
    before = len(outbox(registry))

    def stage_then_fail(session, payload, **kwargs):  # noqa: ANN001, ANN003
        original_stage_event(session, payload, **kwargs)
        session.flush()  # the row really reached the database inside the transaction
        raise RuntimeError("crash after the event was written")

    original_stage_event = adapters_module.stage_event
    monkeypatch.setattr(adapters_module, "stage_event", stage_then_fail)
    with pytest.raises(RuntimeError):
        registry.adapters.transition("olga", model_name="smol", version=1, to_stage=Stage.staging)
    assert len(outbox(registry)) == before
    assert registry.adapters.get_adapter("smol", 1).stage == Stage.none
    with registry.store.reading() as session:
        assert (
            session.scalar(select(func.count()).select_from(AdapterVersion).where(AdapterVersion.stage != "none")) == 0
        )


def test_prompt_versions_labels_rollback_and_strict_sandboxed_rendering(registry: Registry) -> None:
    v1 = registry.prompts.publish_prompt("alice", name="support", template="Answer {{ question }} politely.")
    registry.approvals.approve("pat", Role.approver, object_type="prompt", name="support", version=1)
    registry.prompts.set_prompt_label("alice", name="support", label="production", version=1)
    v2 = registry.prompts.publish_prompt("alice", name="support", template="Answer {{ question }} for {{ customer }}.")
    assert (v1.version, v1.variables, v2.version, v2.variables) == (1, ["question"], 2, ["customer", "question"])
    registry.approvals.approve("pat", Role.approver, object_type="prompt", name="support", version=2)
    registry.prompts.set_prompt_label("alice", name="support", label="production", version=2)
    assert registry.prompts.get_prompt("support", label="production").version == 2
    registry.approvals.approve("pat", Role.approver, object_type="prompt", name="support", version=1)
    registry.prompts.set_prompt_label(
        "bob", name="support", label="production", version=1
    )  # rollback = moving the label, approved again
    assert registry.prompts.get_prompt("support", label="production").template == "Answer {{ question }} politely."
    assert (
        registry.prompts.render_prompt("support", {"question": "why?"}, label="production") == "Answer why? politely."
    )
    with pytest.raises(Invalid, match="needs variable\\(s\\) customer"):
        registry.prompts.render_prompt("support", {"question": "why?"}, version=2)
    unsafe = registry.prompts.publish_prompt("alice", name="evil", template="{{ question.__class__.__mro__ }}")
    with pytest.raises(Invalid, match="unsafe|undefined"):
        registry.prompts.render_prompt("evil", {"question": "x"}, version=unsafe.version)
    with pytest.raises(Invalid, match="does not parse: line 1"):
        registry.prompts.publish_prompt("alice", name="broken", template="{% if %}")
    moves = registry.changes.entries(object_type="prompt", object_id="support@production").items
    assert [(entry.actor, entry.after["version"]) for entry in moves] == [("alice", 1), ("alice", 2), ("bob", 1)]


def test_dataset_versions_are_validated_by_line_hashed_and_counted(registry: Registry) -> None:
    first = registry.datasets.publish_dataset("alice", name="support", split="train", jsonl=jsonl(CHAT))
    assert (first.version, first.row_count, first.record_format, first.split) == (1, 2, "chat", "train")
    assert registry.datasets.dataset_rows("support", 1) == CHAT
    bad = (
        jsonl(CHAT)
        + b'{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n{"instruction": "x", "output": ""}\n'
    )
    with pytest.raises(Invalid) as error:
        registry.datasets.publish_dataset("bob", name="support", split="train", jsonl=bad)
    message = str(error.value)
    assert (
        "line 3: the last message must be the assistant's" in message
        and "line 4: not JSON" in message
        and "line 5: output must be a non-empty string" in message
    )
    with pytest.raises(TooLarge):
        Registry(registry.store, registry.artifacts, max_dataset_bytes=10).datasets.publish_dataset(
            "bob", name="support", split="train", jsonl=jsonl(CHAT)
        )
    assert [d.version for d in registry.datasets.list_datasets(name="support").items] == [1]
    assert [entry.detail.split(":")[0] for entry in refused(registry)] == ["422 invalid_jsonl", "413 dataset_too_large"]


def test_duplicate_names_and_unknown_references_change_nothing(registry: Registry, tmp_path: Path) -> None:
    seed_model(registry, tmp_path)
    with pytest.raises(Conflict, match="already registered"):
        seed_model(registry, tmp_path)
    with pytest.raises(NotFound, match="no model named 'nope'"):
        registry.adapters.register_trained_adapter(
            training_completed(registry, tmp_path, job_id="j", model="nope"),
            event_id=str(uuid.uuid4()),
            correlation_id=None,
        )
    with pytest.raises(NotFound, match="no dataset version support:v1"):
        registry.adapters.register_trained_adapter(
            training_completed(registry, tmp_path, job_id="j"), event_id=str(uuid.uuid4()), correlation_id=None
        )
    assert len(registry.models.list_models().items) == 1 and registry.adapters.list_adapters().items == []
    assert len(refused(registry)) == 3


def test_cursor_pagination(registry: Registry) -> None:
    for index in range(5):
        registry.prompts.publish_prompt("alice", name=f"p{index}", template="x")
    first = registry.prompts.list_prompts(limit=2)
    second = registry.prompts.list_prompts(limit=2, cursor=first.next_cursor)
    third = registry.prompts.list_prompts(limit=2, cursor=second.next_cursor)
    assert [p.name for p in first.items + second.items + third.items] == ["p0", "p1", "p2", "p3", "p4"]
    assert third.next_cursor is None
    with pytest.raises(Invalid, match="cursor"):
        registry.prompts.list_prompts(cursor="garbage!")


@pytest.mark.parametrize(
    "statement", ["UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log", "TRUNCATE audit_log"]
)
def test_the_database_refuses_to_rewrite_the_audit_log(registry: Registry, statement: str) -> None:
    if statement.startswith("TRUNCATE") and registry.store.dialect != "postgresql":
        pytest.skip("SQLite has no TRUNCATE (its DELETE is refused above)")
    registry.prompts.publish_prompt("alice", name="p", template="x")
    with pytest.raises(DBAPIError, match="append-only"), registry.store.transaction() as session:
        session.execute(text(statement))
    assert [(entry.actor, entry.action) for entry in registry.changes.entries().items] == [("alice", "prompt.publish")]
