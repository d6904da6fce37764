"""The monitor's retraining on real components: degraded traffic through Kafka and the feedback sink into
embedded ClickHouse; the registry's real door served by uvicorn on a real port, which is not listening
when the alert opens; training.requested on real Kafka.

What it shows: a retraining the registry could not take is asked again on later ticks while its alert
stays open (not lost, not asked twice), and it asks for production's recipe: the production adapter's
training data and hyperparameters (its lineage) plus the corrections, weighted as declared."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts.events import DatasetRef, Hyperparameters, SpanLogged, Stage, TrainingRequested
from contracts.http import Role
from infra.processes import free_port, port_is_free
from services.monitor.rules import parse_rules
from services.monitor.retraining import RetrainingPolicy
from services.monitor.service import Monitor
from services.monitor.store import MonitorStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.settings import FlywheelSettings
from services.runtime.registry_client import RegistryClient
from services.runtime.spans import RetrainingTrace
from tests.integration.registry_support import CHAT, evaluation, training_completed
from tests.integration.test_monitor import RULES, traffic
from tests.monitor_support import (
    MODEL,
    RegistryDoorFixture,
    clickhouse,  # noqa: F401 - a fixture
    monitor_store,  # noqa: F401 - a fixture
    published_and_stored,
    read_topic,
    running_sink,
    seed_two_versions,
)

from tests.support import served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CORRECTION_REPEATS = 3


@pytest.fixture
def registry_door(tmp_path: Path) -> Iterator[RegistryDoorFixture]:
    fixture = RegistryDoorFixture(tmp_path)
    yield fixture
    fixture.store.close()


@asynccontextmanager
async def listening(door: RegistryDoorFixture, port: int) -> AsyncIterator[None]:
    """The registry's door served on `port` by uvicorn, as a process serves it."""
    async with served(door.app, port=port, lifespan="off"):
        yield
    assert port_is_free(port)


async def test_a_retraining_the_registry_could_not_take_is_asked_again_with_productions_recipe(
    settings: FlywheelSettings,
    topics: str,
    clickhouse: ClickHouseStore,
    monitor_store: MonitorStore,
    registry_door: RegistryDoorFixture,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed_two_versions(
        registry_door, tmp_path
    )  # v1 in production, trained on support:v1 (the two CHAT records) with rank 4
    port = free_port()
    policy = RetrainingPolicy(min_corrections=5, cooldown_s=3600, correction_repeats=CORRECTION_REPEATS)
    inferences, feedback = traffic(40, degraded=True)
    caplog.set_level(logging.INFO, logger="flywheel.monitor")
    async with running_sink(settings, clickhouse) as bus:
        await published_and_stored(bus, clickhouse, inferences, feedback)
        now = datetime.now(UTC) + timedelta(seconds=1)
        monitor = Monitor(
            monitor_store,
            parse_rules(RULES, monitor_store.check_rule),
            bus.publish_envelope,
            RegistryClient(f"http://127.0.0.1:{port}", registry_door.operator_key),
            policy=policy,
            state_dir=tmp_path / "monitor",
        )
        # The door is not listening yet, as when a process's monitor ticks before uvicorn serves.
        unreachable = [await monitor.tick(now + timedelta(seconds=30 * tick)) for tick in range(2)]
        async with listening(registry_door, port):
            reachable = [await monitor.tick(now + timedelta(seconds=30 * tick)) for tick in range(2, 4)]

    assert sorted(alert.rule_name for alert in unreachable[0].opened) == ["rating", "thumbs-down"]
    assert [report.retraining for report in unreachable] == [[], []]
    waiting = [record.getMessage() for record in caplog.records if "not requested yet" in record.getMessage()]
    # Logged once per alert and reason, not once per tick: two quality alerts, one line each.
    assert len(waiting) == 2 and all("ConnectError" in line for line in waiting), waiting
    requested = [request for report in reachable for request in report.retraining]
    assert len(requested) == 1 and not reachable[1].retraining, "one retraining answers both open quality alerts, once"
    assert requested[0].job_id.removeprefix("retrain-") in {alert.alert_id for alert in unreachable[0].opened}
    on_kafka = await read_topic(settings, TrainingRequested, expect=1)
    assert [record["payload"]["job_id"] for record in on_kafka] == [requested[0].job_id]
    # The request opens the retraining's trace: its root span, in the trace its correlation id (the alert id) derives.
    [root] = await read_topic(settings, SpanLogged, expect=1)
    trace = RetrainingTrace(on_kafka[0]["correlation_id"])
    assert (root["payload"]["trace_id"], root["payload"]["span_id"], root["payload"]["parent_span_id"]) == (
        trace.trace_id,
        trace.root_span_id,
        None,
    )
    assert (root["producer"], root["correlation_id"]) == ("monitor", on_kafka[0]["correlation_id"])
    assert root["payload"]["attributes"]["flywheel.job_id"] == requested[0].job_id

    request = requested[0]
    assert request.hyperparameters.rank == 4, "production v1's hyperparameters (its lineage), not the defaults"
    assert "support:v1" in request.reason and f"x{CORRECTION_REPEATS}" in request.reason, request.reason
    async with registry_door.client() as client:
        rows = (
            await client.get(f"/registry/v1/datasets/{request.dataset.name}/versions/{request.dataset.version}/rows")
        ).json()
    lines = [json.dumps(row, sort_keys=True) for row in rows]
    learned = {json.dumps(record, sort_keys=True) for record in CHAT}
    corrections = [line for line in lines if line not in learned]
    assert learned <= set(lines), "production's training data is kept"
    # 20 corrections over 6 distinct (question, correction) pairs, each repeated as declared.
    assert len(set(corrections)) == 6 and all(
        corrections.count(line) == CORRECTION_REPEATS for line in set(corrections)
    )
    assert len(rows) == len(CHAT) + 6 * CORRECTION_REPEATS


async def test_a_dpo_retraining_asks_for_the_feedbacks_preference_pairs_going_on_from_production(
    settings: FlywheelSettings,
    topics: str,
    clickhouse: ClickHouseStore,
    monitor_store: MonitorStore,
    registry_door: RegistryDoorFixture,
    tmp_path: Path,
) -> None:
    seed_two_versions(registry_door, tmp_path)  # v1 in production, trained with rank 4
    port = free_port()
    inferences, feedback = traffic(40, degraded=True)
    async with running_sink(settings, clickhouse) as bus:
        await published_and_stored(bus, clickhouse, inferences, feedback)
        monitor = Monitor(
            monitor_store,
            parse_rules(RULES, monitor_store.check_rule),
            bus.publish_envelope,
            RegistryClient(f"http://127.0.0.1:{port}", registry_door.operator_key),
            policy=RetrainingPolicy(min_corrections=5, cooldown_s=3600, method="dpo"),
            state_dir=tmp_path / "monitor",
        )
        async with listening(registry_door, port):
            report = await monitor.tick(datetime.now(UTC) + timedelta(seconds=1))
            [request] = report.retraining
            async with registry_door.client() as client:
                rows = (
                    await client.get(
                        f"/registry/v1/datasets/{request.dataset.name}/versions/{request.dataset.version}/rows"
                    )
                ).json()
                version = (
                    await client.get(f"/registry/v1/datasets/{request.dataset.name}/versions/{request.dataset.version}")
                ).json()

    [on_kafka] = await read_topic(settings, TrainingRequested, expect=1)
    assert on_kafka["payload"]["job_id"] == request.job_id
    # DPO going on from production v1, with its LoRA shape, which the trainer requires of a start adapter.
    assert (request.hyperparameters.method, request.hyperparameters.rank) == ("dpo", 4)
    assert request.start_adapter_version == 1
    assert "6 preference pairs (6 correction)" in request.reason, request.reason
    assert (version["provenance"], version["record_format"]) == ("preferences", "preference")
    # Each of the 6 distinct (question, correction) is chosen over the answer it replaced; nothing else pairs up
    # (every answer is the same text, so thumbs and ratings prefer nothing).
    assert len(rows) == 6
    assert {row["rejected"] for row in rows} == {"I think it is 7 weeks, maybe."}
    assert {row["chosen"] for row in rows} == {f"Product {n} has a 2-year warranty." for n in range(0, 12, 2)}


def promote_an_sft_then_dpo_adapter(door: RegistryDoorFixture, tmp_path: Path) -> int:
    """Production becomes a version trained by sft_then_dpo on support:v1: its lineage's hyperparameters say so."""
    registry = door.registry
    adapter = registry.adapters.register_trained_adapter(
        training_completed(
            registry,
            tmp_path,
            job_id="job-staged",
            seed=3,
            model=MODEL,
            hyperparameters=Hyperparameters(rank=4, method="sft_then_dpo"),
        ),
        event_id=str(uuid.uuid4()),
        correlation_id="corr-staged",
    )
    registry.adapters.attach_evaluation(evaluation(MODEL, adapter.version))
    registry.adapters.transition("alice", model_name=MODEL, version=adapter.version, to_stage=Stage.staging)
    registry.approvals.approve("bob", Role.approver, object_type="adapter", name=MODEL, version=adapter.version)
    registry.adapters.transition(
        "alice", model_name=MODEL, version=adapter.version, to_stage=Stage.production, replaces=1
    )
    return adapter.version


async def test_an_sft_then_dpo_retraining_asks_one_job_for_productions_recipe_and_the_preference_pairs(
    settings: FlywheelSettings,
    topics: str,
    clickhouse: ClickHouseStore,
    monitor_store: MonitorStore,
    registry_door: RegistryDoorFixture,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seed_two_versions(registry_door, tmp_path)
    production = promote_an_sft_then_dpo_adapter(registry_door, tmp_path)
    port = free_port()
    inferences, feedback = traffic(40, degraded=True)
    caplog.set_level(logging.INFO, logger="flywheel.monitor")

    def monitor(bus: object, method: str, min_corrections: int = 5) -> Monitor:
        # Each policy keeps its own state, so each answers the same open alerts once.
        return Monitor(
            monitor_store,
            parse_rules(RULES, monitor_store.check_rule),
            bus.publish_envelope,  # type: ignore[attr-defined]
            RegistryClient(f"http://127.0.0.1:{port}", registry_door.operator_key),
            policy=RetrainingPolicy(min_corrections=min_corrections, cooldown_s=3600, method=method),  # type: ignore[arg-type]
            state_dir=tmp_path / f"monitor-{method}-{min_corrections}",
        )

    async with running_sink(settings, clickhouse) as bus:
        await published_and_stored(bus, clickhouse, inferences, feedback)
        now = datetime.now(UTC) + timedelta(seconds=1)
        async with listening(registry_door, port):
            # 6 distinct corrections and 6 pairs: with 10 of each needed, it waits and says which fell short.
            waiting = await monitor(bus, "sft_then_dpo", min_corrections=10).tick(now)
            [staged] = (await monitor(bus, "sft_then_dpo").tick(now)).retraining
            [sft] = (await monitor(bus, "sft").tick(now)).retraining
            [dpo] = (await monitor(bus, "dpo").tick(now)).retraining
            async with registry_door.client() as client:

                async def rows(ref: DatasetRef) -> list[dict]:
                    path = f"/registry/v1/datasets/{ref.name}/versions/{ref.version}"
                    return (await client.get(f"{path}/rows")).json()

                assert staged.preference_dataset is not None
                sft_rows, pair_rows = await rows(staged.dataset), await rows(staged.preference_dataset)

    assert waiting.retraining == []
    assert any(r.getMessage().endswith("waits: 6 corrections and 6 preference pairs < 10") for r in caplog.records)
    on_kafka = await read_topic(settings, TrainingRequested, expect=3)
    assert [record["payload"]["job_id"] for record in on_kafka] == [staged.job_id, sft.job_id, dpo.job_id]
    assert on_kafka[0]["payload"]["preference_dataset"] == staged.preference_dataset.model_dump()
    # One job, two datasets: production's recipe (support:v1's records plus the corrections) for the SFT stage,
    # the feedback's pairs for the DPO stage; a new adapter with production's LoRA shape.
    assert (staged.hyperparameters.method, staged.hyperparameters.rank) == ("sft_then_dpo", 4)
    assert staged.start_adapter_version is None
    learned = {json.dumps(record, sort_keys=True) for record in CHAT}
    assert learned <= {json.dumps(row, sort_keys=True) for row in sft_rows}
    assert len(sft_rows) == len(CHAT) + 6 and all("messages" in row for row in sft_rows)
    assert len(pair_rows) == 6 and {row["rejected"] for row in pair_rows} == {"I think it is 7 weeks, maybe."}
    assert staged.preference_dataset.name.endswith("-preferences") and not staged.dataset.name.endswith("-preferences")
    assert "then DPO on 6 preference pairs" in staged.reason, staged.reason
    # Production was trained by sft_then_dpo: a plain policy asks for its own method, not production's.
    assert (sft.hyperparameters.method, sft.preference_dataset) == ("sft", None)
    assert (dpo.hyperparameters.method, dpo.start_adapter_version) == ("dpo", production)
