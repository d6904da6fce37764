"""The monitor's retraining on real components: degraded traffic through Kafka and the feedback sink into
embedded ClickHouse; the registry's real door served by uvicorn on a real port, which is not listening
when the alert opens; training.requested on real Kafka.

What it shows: a retraining the registry could not take is asked again on later ticks while its alert
stays open (not lost, not asked twice), and it asks for production's recipe: the production adapter's
training data and hyperparameters (its lineage) plus the corrections, weighted as declared."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts.events import SpanLogged, TrainingRequested
from infra.processes import free_port, port_is_free
from services.monitor.rules import parse_rules
from services.monitor.retraining import RetrainingPolicy
from services.monitor.service import Monitor
from services.monitor.store import MonitorStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.settings import FlywheelSettings
from services.runtime.registry_client import RegistryClient
from services.runtime.spans import RetrainingTrace
from tests.integration.registry_support import CHAT
from tests.integration.test_monitor import RULES, traffic
from tests.monitor_support import (
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
