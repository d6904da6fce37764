"""Canary against control on real components: the registry declares a canary and its outbox publishes
stage.changed on real Kafka; the monitor's handler starts watching; live inferences and feedback go
through Kafka and the feedback sink into embedded ClickHouse; the monitor compares the two adapter
versions under a declared policy (MiniLM groundedness for hallucinations included) and promotes or
rolls back through the registry's real door, which records it in the audit log. Each exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts.events import Stage, StageChanged
from services.monitor.canary import CanaryPolicy
from services.monitor.handlers import when_stage_changed_watch_canary
from services.monitor.retraining import RetrainingPolicy
from services.monitor.service import Monitor
from services.monitor.store import MonitorStore
from services.registry.outbox import OutboxRelay
from services.runtime.broker import EventBus
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.consumer import DeadLetters, SqliteProcessedEvents, subscribe
from services.runtime.settings import FlywheelSettings
from tests.monitor_support import (
    MODEL,
    PER_ARM,
    RegistryDoorFixture,
    arm_traffic,
    clickhouse,  # noqa: F401 - a fixture
    eventually,
    monitor_store,  # noqa: F401 - a fixture
    running_sink,
    seed_two_versions,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

# Small enough for a test's traffic, strict enough that the worse canary cannot pass: every
# tolerance is far below the degradation fed below, and far above the noise of 120 equal samples.
POLICY = CanaryPolicy(
    version=3,
    min_inferences=100,
    min_feedback=100,
    max_thumbs_down_increase=0.15,
    max_error_rate_increase=0.05,
    max_latency_p95_ratio=1.3,
    max_mean_rating_drop=0.5,
    max_hallucination_increase=0.2,
    hallucination_sample=40,
    bootstrap_resamples=1000,
)


@pytest.fixture
def registry_door(tmp_path: Path) -> Iterator[RegistryDoorFixture]:
    fixture = RegistryDoorFixture(tmp_path)
    yield fixture
    fixture.store.close()


async def run_canary(
    settings: FlywheelSettings,
    clickhouse: ClickHouseStore,
    monitor_store: MonitorStore,
    door: RegistryDoorFixture,
    tmp_path: Path,
    *,
    canary_is_worse: bool,
):
    """Declare v2 the canary beside v1, feed both arms, tick the monitor three times; the three reports."""
    published: list = []

    async def publish(envelope) -> None:  # noqa: ANN001 - no rules here, nothing is published
        published.append(envelope)

    monitor = Monitor(
        monitor_store,
        [],
        publish,
        door.door(),
        policy=RetrainingPolicy(),
        state_dir=tmp_path / "monitor",
        canary_policy=POLICY,
    )
    processed = SqliteProcessedEvents(tmp_path / "monitor" / "processed-events.db")

    brokers: list = []

    def monitor_handlers(broker) -> None:  # noqa: ANN001
        brokers.append(broker)
        subscribe(
            broker,
            StageChanged,
            lambda envelope: when_stage_changed_watch_canary(envelope, monitor),
            group="monitor",
            processed=processed,
            dead_letters=DeadLetters(broker),
            topic_prefix=settings.topic_prefix,
            max_retries=1,
        )

    seed_two_versions(door, tmp_path)
    try:
        async with running_sink(settings, clickhouse, also=monitor_handlers) as bus:
            relay = OutboxRelay(
                door.store,
                EventBus(brokers[0], producer="registry", topic_prefix=settings.topic_prefix),
                interval_s=0.1,
            )
            await relay.start()
            try:
                door.registry.adapters.transition(
                    "alice",
                    model_name=MODEL,
                    version=2,
                    to_stage=Stage.production,
                    canary_percent=10,
                    reason="canary after the gate",
                )
                await eventually(
                    lambda: monitor.canaries.watched().get(MODEL, {}).get("version") == 2,
                    what="the monitor watching the canary declared on stage.changed",
                )
                control = arm_traffic(1, down_every=10, error_every=None, latency_ms=300, hallucinating=False)
                canary = (
                    arm_traffic(2, down_every=2, error_every=8, latency_ms=900, hallucinating=True)
                    if canary_is_worse
                    else arm_traffic(2, down_every=10, error_every=None, latency_ms=300, hallucinating=False)
                )
                for inferences, feedback in (control, canary):
                    await asyncio.gather(*(bus.publish(event) for event in inferences))
                    await asyncio.gather(*(bus.publish(event) for event in feedback))
                await eventually(
                    lambda: (
                        clickhouse.query("SELECT count() AS n FROM feedback_with_inference WHERE inference_stored")[0][
                            "n"
                        ]
                        >= 2 * PER_ARM
                    ),
                    what="sink stored both arms",
                )
                now = datetime.now(UTC) + timedelta(seconds=1)
                reports = [await monitor.tick(now)]
                # The registry's own stage.changed for the decision ends the watch too; a later tick has nothing to judge.
                await eventually(lambda: MODEL not in monitor.canaries.watched(), what="watch ended")
                reports += [await monitor.tick(now + timedelta(seconds=30 * tick)) for tick in (1, 2)]
            finally:
                await relay.stop()
    finally:
        processed.close()
    return reports


async def monitor_audit(door: RegistryDoorFixture) -> list[dict]:
    async with door.client() as client:
        return (
            await client.get("/registry/v1/audit", params={"actor": "service:monitor", "object_type": "adapter"})
        ).json()["items"]


async def test_a_healthy_canary_is_promoted_once_with_the_audit_record(
    settings: FlywheelSettings,
    topics: str,
    clickhouse: ClickHouseStore,
    monitor_store: MonitorStore,
    registry_door: RegistryDoorFixture,
    tmp_path: Path,
) -> None:
    reports = await run_canary(settings, clickhouse, monitor_store, registry_door, tmp_path, canary_is_worse=False)

    [review] = reports[0].canaries
    print(review.decision.summary())
    assert (review.canary_version, review.control_version, review.applied) == (2, 1, True)
    assert review.decision.action == "promote", review.decision.summary()
    assert {check.verdict for check in review.decision.checks} == {"within"}
    assert [check.metric.split()[0] for check in review.decision.checks] == [
        "thumbs_down_rate",
        "error_rate",
        "mean_rating",
        "latency_p95",
        "hallucination_rate",
        "watch",
    ]
    assert all(not report.canaries for report in reports[1:]), "promoted once, not once per tick"

    async with registry_door.client() as client:
        v1 = (await client.get(f"/registry/v1/adapters/{MODEL}/versions/1")).json()
        v2 = (await client.get(f"/registry/v1/adapters/{MODEL}/versions/2")).json()
    assert (v2["stage"], v2["canary_percent"]) == ("production", None)
    assert v1["stage"] == "archived"
    [entry] = await monitor_audit(registry_door)
    assert entry["action"] == "adapter.stage.production" and entry["object_id"] == f"{MODEL}:v2"
    # The monitor made the canary the full version under the approval that admitted the canary (bob's).
    assert entry["after"]["approver"] == "bob" and entry["after"]["replaces"] == 1
    assert entry["detail"].startswith("monitor canary policy v3: promote;") and "hallucination_rate" in entry["detail"]


async def test_a_worse_canary_is_rolled_back_once_with_the_audit_record(
    settings: FlywheelSettings,
    topics: str,
    clickhouse: ClickHouseStore,
    monitor_store: MonitorStore,
    registry_door: RegistryDoorFixture,
    tmp_path: Path,
) -> None:
    reports = await run_canary(settings, clickhouse, monitor_store, registry_door, tmp_path, canary_is_worse=True)

    [review] = reports[0].canaries
    print(review.decision.summary())
    assert review.decision.action == "rollback" and review.applied, review.decision.summary()
    verdicts = {check.metric.split()[0]: check.verdict for check in review.decision.checks}
    assert verdicts == {
        "thumbs_down_rate": "worse",
        "error_rate": "worse",
        "mean_rating": "worse",
        "latency_p95": "worse",
        "hallucination_rate": "worse",
        "watch": "within",
    }
    hallucination = next(check for check in review.decision.checks if check.metric.startswith("hallucination"))
    assert hallucination.canary == 1.0 and hallucination.control == 0.0, (
        "the watcher scored the sampled answers with MiniLM groundedness"
    )
    assert all(not report.canaries for report in reports[1:]), "rolled back once, not once per tick"

    async with registry_door.client() as client:
        v1 = (await client.get(f"/registry/v1/adapters/{MODEL}/versions/1")).json()
        v2 = (await client.get(f"/registry/v1/adapters/{MODEL}/versions/2")).json()
    assert v2["stage"] == "archived" and v1["stage"] == "production" and v1["canary_percent"] is None
    [entry] = await monitor_audit(registry_door)
    assert entry["action"] == "adapter.stage.archived" and entry["object_id"] == f"{MODEL}:v2"
    assert (
        entry["detail"].startswith("monitor canary policy v3: rollback;")
        and "error_rate (difference): worse" in entry["detail"]
    )
