"""The monitor as `flywheel run monitor` builds it (services/monitor/app.create_app under build_process,
settings from the environment; only the embedded store's location is the test session's): its stage.changed handler consumes the registry's events from real
Kafka, its own tick loop judges the canary and raises alerts on Kafka, and its door answers."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import httpx
import pytest

from contracts.envelope import wrap
from contracts.events import AlertRaised, Stage
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.monitor.app import create_app
from services.monitor.settings import MonitorSettings
from services.registry.outbox import OutboxRelay
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.console import Section
from services.runtime.privacy import Redactor
from services.runtime.service import Runtime, Service, build_process
from services.runtime.settings import FlywheelSettings
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.monitor_support import MODEL, RegistryDoorFixture, arm_traffic, eventually, read_topic, seed_two_versions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

RULES = """
rules:
  - name: thumbs-down
    version: 4
    metric: thumbs_down_rate
    threshold: 0.05
    window_s: 600
    min_samples: 10
canary:
  version: 2
  min_inferences: 100
  min_feedback: 100
  max_thumbs_down_increase: 0.15
  max_error_rate_increase: 0.05
  max_latency_p95_ratio: 1.3
  max_mean_rating_drop: 0.5
  hallucination_sample: 0
  bootstrap_resamples: 500
"""


async def test_the_built_monitor_consumes_stage_changed_ticks_on_its_own_and_its_door_answers(
    settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget, tmp_path: Path
) -> None:
    # The registry's database where the process's authenticator looks for keys (FLYWHEEL_HOME/registry).
    door = RegistryDoorFixture(settings.home / "registry")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    monitor_settings = MonitorSettings(
        rules_path=rules, tick_s=0.5, registry_url="http://registry", api_key=door.operator_key
    )
    seed_two_versions(door, tmp_path)

    clickhouse: ClickHouseStore = chdb_target.open()

    def monitor(runtime: Runtime) -> Service:
        # chDB allows one data directory per process: the session's, with a database of this test's own.
        runtime.clickhouse = lambda: clickhouse
        clickhouse.migrate()
        return create_app(
            runtime,
            monitor_settings,
            registry_transport=door.transport,
            open_readonly=partial(chdb_target.open, readonly=True),
        )

    app, runtime = build_process(settings, [monitor], title="flywheel-monitor")
    try:
        async with app.router.lifespan_context(app):
            relay = OutboxRelay(door.store, runtime.bus("registry"), interval_s=0.1)
            await relay.start()
            try:
                door.registry.adapters.transition(
                    "alice", model_name=MODEL, version=2, to_stage=Stage.production, canary_percent=20
                )
                watched = settings.home / "monitor" / "canaries.json"
                await eventually(
                    lambda: watched.exists() and '"version": 2' in watched.read_text(),
                    what="the app's handler watching the canary from stage.changed",
                )

                # Embedded mode: the sink shares the monitor's process and its chDB handle.
                sink = Sink(FeedbackStore(runtime.clickhouse), Redactor())
                for version in (1, 2):
                    inferences, feedback = arm_traffic(
                        version, down_every=10, error_every=None, latency_ms=300, hallucinating=False
                    )
                    await asyncio.to_thread(
                        sink.store_inferences, [wrap(event, producer="test") for event in inferences]
                    )
                    await asyncio.to_thread(sink.store_feedback, [wrap(event, producer="test") for event in feedback])

                async def promoted() -> bool:
                    async with door.client() as client:
                        return (await client.get(f"/registry/v1/adapters/{MODEL}/versions/2")).json()[
                            "canary_percent"
                        ] is None

                for _ in range(300):
                    if await promoted():
                        break
                    await asyncio.sleep(0.2)
                assert await promoted(), "the monitor's own tick loop promoted the healthy canary"
                await eventually(
                    lambda: not watched.exists() or '"version": 2' not in watched.read_text(), what="watch ended"
                )
            finally:
                await relay.stop()

            raised = await read_topic(settings, AlertRaised, expect=1, wait_s=30)
            assert {(r["payload"]["rule_name"], r["payload"]["adapter_version"]) for r in raised} == {
                ("thumbs-down", 1),
                ("thumbs-down", 2),
            }

            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://monitor") as client:
                bearer = {"Authorization": f"Bearer {door.operator_key}"}
                alerts = await client.get("/monitor/v1/alerts", headers=bearer)
                assert alerts.status_code == 200 and {a["rule_name"] for a in alerts.json()} == {"thumbs-down"}
                assert (await client.get("/monitor/v1/alerts")).status_code == 401
                summary = (
                    await client.get("/monitor/v1/metrics/summary", params={"hours": 1, "bucket_s": 60}, headers=bearer)
                ).json()
                assert summary["evaluations"] and {e["rule_name"] for e in summary["evaluations"]} == {"thumbs-down"}
                assert (await client.get("/monitor/console")).headers["location"] == (
                    "/console/login?next=%2Fmonitor%2Fconsole"
                ), "the monitor's page is a section of the process's console: its sign-in is the console's"
                assert Section("monitor", "Monitor", "/monitor/console") in runtime.console.sections
                assert (await client.get("/readyz")).status_code == 200
                metrics = (await client.get("/metrics")).text
                assert 'flywheel_monitor_canary_decisions_total{action="promote"}' in metrics
        async with door.client() as client:
            audit = (
                await client.get("/registry/v1/audit", params={"actor": "service:monitor", "object_type": "adapter"})
            ).json()["items"]
        assert [(entry["action"], entry["object_id"]) for entry in audit] == [
            ("adapter.stage.production", f"{MODEL}:v2")
        ]
        assert audit[0]["detail"].startswith("monitor canary policy v2: promote;")
    finally:
        door.store.close()
