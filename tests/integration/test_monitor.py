"""The monitor on real components: events through Kafka and the feedback sink into embedded ClickHouse,
rules over windows, alerts raised once, a feedback dataset through the registry's real door,
training.requested on real Kafka; the read-only query door. The console in a browser: test_monitor_console.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from contracts.envelope import wrap
from contracts.events import (
    AlertRaised,
    FeedbackReceived,
    FeedbackReviewed,
    InferenceLogged,
    InferenceStatus,
    Thumbs,
    TrainingRequested,
)
from contracts.http import Role
from services.runtime.privacy import Redactor
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.monitor.api import create_router as monitor_router
from services.monitor.rules import RuleError, parse_rules
from services.monitor.retraining import RetrainingPolicy
from services.monitor.service import Monitor
from services.monitor.store import MonitorStore
from services.registry.store import RegistryStore
from services.runtime.auth import Authenticator, KeyStore
from services.runtime.broker import EventBus
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.console import Console
from services.runtime.http import DoorError, error_response
from services.runtime.settings import FlywheelSettings
from services.runtime.registry_client import RegistryClient
from tests.monitor_support import (
    RegistryDoorFixture,
    clickhouse,  # noqa: F401 - a fixture
    eventually,
    monitor_store,  # noqa: F401 - a fixture
    published_and_stored,
    read_topic,
    running_sink,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = "smollm2"
RULES = [
    {
        "name": "thumbs-down",
        "version": 1,
        "metric": "thumbs_down_rate",
        "threshold": 0.3,
        "severity": "warning",
        "window_s": 600,
        "min_samples": 10,
        "cooldown_s": 3600,
    },
    {
        "name": "rating",
        "version": 2,
        "metric": "mean_rating",
        "comparator": "<",
        "threshold": 3.0,
        "window_s": 600,
        "min_samples": 10,
    },
    {
        "name": "latency-slo",
        "version": 1,
        "metric": "latency_p95_ms",
        "threshold": 2000,
        "severity": "critical",
        "window_s": 600,
        "min_samples": 10,
    },
    {"name": "errors", "version": 1, "metric": "error_rate", "threshold": 0.05, "window_s": 600, "min_samples": 10},
    {
        "name": "unsafe",
        "version": 1,
        "metric": "unsafe_rate",
        "threshold": 0.2,
        "window_s": 600,
        "min_samples": 10,
        "quality": False,
    },
]


@pytest.fixture
def registry_door(tmp_path: Path) -> Iterator[RegistryDoorFixture]:
    fixture = RegistryDoorFixture(tmp_path)
    yield fixture
    fixture.store.close()


def traffic(count: int, *, degraded: bool, adapter: int = 1) -> tuple[list[InferenceLogged], list[FeedbackReceived]]:
    inferences, feedback = [], []
    for i in range(count):
        inference_id = f"inf-{uuid.uuid4().hex[:10]}"
        question = f"How long is the warranty on product {i % 12}? Contact me at user{i}@example.com"
        answer = "The warranty is 2 years." if not degraded else "I think it is 7 weeks, maybe."
        inferences.append(
            InferenceLogged(
                inference_id=inference_id,
                model_name=MODEL,
                adapter_version=adapter,
                input_text=question,
                output_text=answer,
                prompt_tokens=20 + i % 5,
                completion_tokens=8,
                latency_total_ms=300.0 + i % 50,
                status=InferenceStatus.ok,
            )
        )
        if degraded:
            # Half the users correct the answer; the same correction for the same question twice is one record.
            correction = f"Product {i % 12} has a 2-year warranty." if i % 2 == 0 else None
            # Reviewers' feedback, as the feedback door publishes it: the sink dead-letters a reviewer claim on feedback.received.
            feedback.append(
                FeedbackReviewed(inference_id=inference_id, thumbs=Thumbs.down, rating=1 + i % 2, correction=correction)
            )
        else:
            feedback.append(
                FeedbackReceived(
                    inference_id=inference_id, thumbs=Thumbs.up if i % 10 else Thumbs.down, rating=4 + i % 2
                )
            )
    return inferences, feedback


def monitor_for(
    monitor_store: MonitorStore,
    bus: EventBus,
    registry: RegistryDoorFixture | None,
    tmp_path: Path,
    rules: list[dict] = RULES,
) -> Monitor:
    door = registry.door() if registry else RegistryClient("http://unused", None)
    return Monitor(
        monitor_store,
        parse_rules(rules, monitor_store.check_rule),
        bus.publish_envelope,
        door,
        policy=RetrainingPolicy(min_corrections=5, cooldown_s=3600),
        state_dir=tmp_path / "monitor",
    )


async def test_degraded_quality_raises_each_alert_once_builds_a_feedback_dataset_and_requests_training(
    settings: FlywheelSettings,
    topics: str,
    clickhouse: ClickHouseStore,
    monitor_store: MonitorStore,
    registry_door: RegistryDoorFixture,
    tmp_path: Path,
) -> None:
    inferences, feedback = traffic(40, degraded=True)
    async with running_sink(settings, clickhouse) as bus:
        await published_and_stored(bus, clickhouse, inferences, feedback)
        monitor = monitor_for(monitor_store, bus, registry_door, tmp_path)
        now = datetime.now(UTC) + timedelta(seconds=1)
        reports = [await monitor.tick(now + timedelta(seconds=30 * tick)) for tick in range(4)]

    opened = [alert for report in reports for alert in report.opened]
    assert sorted(alert.rule_name for alert in opened) == ["rating", "thumbs-down"], [
        e.reason or e.value for r in reports for e in r.evaluations
    ]
    assert all(not r.opened for r in reports[1:]), "a firing rule opens its alert once, not once per tick"
    thumbs = next(alert for alert in opened if alert.rule_name == "thumbs-down")
    assert thumbs.value == 1.0 and thumbs.adapter_version == 1 and thumbs.threshold == 0.3

    stored = monitor_store.alerts("open")
    assert {row["rule_name"] for row in stored} == {"rating", "thumbs-down"}
    raised = await read_topic(settings, AlertRaised, expect=2)
    assert sorted(record["payload"]["rule_name"] for record in raised) == ["rating", "thumbs-down"]

    # One retraining, from the first quality alert; the second is inside the model's cooldown.
    requested = [request for report in reports for request in report.retraining]
    assert len(requested) == 1
    on_kafka = await read_topic(settings, TrainingRequested, expect=1)
    assert len(on_kafka) == 1
    payload = on_kafka[0]["payload"]
    assert payload["model_name"] == MODEL and payload["requested_by"] == "service:monitor"
    assert payload["reason"].startswith("alert ") and on_kafka[0]["correlation_id"] in {a.alert_id for a in opened}
    async with httpx.AsyncClient(
        transport=registry_door.transport,
        base_url="http://registry",
        headers={"Authorization": f"Bearer {registry_door.operator_key}"},
    ) as client:
        version = (
            await client.get(
                f"/registry/v1/datasets/{payload['dataset']['name']}/versions/{payload['dataset']['version']}"
            )
        ).json()
        rows = (
            await client.get(
                f"/registry/v1/datasets/{payload['dataset']['name']}/versions/{payload['dataset']['version']}/rows"
            )
        ).json()
    assert version["provenance"] == "feedback" and version["model_name"] == MODEL
    # 20 corrections over 12 distinct questions whose correction is the same per question: deduplicated.
    assert version["row_count"] == len(rows) == 6
    user_turns = [row["messages"][0]["content"] for row in rows]
    assert all("[EMAIL]" in text and "@example.com" not in text for text in user_turns), (
        "prompts come redacted by the sink"
    )
    assert all(
        row["messages"][-1]["role"] == "assistant" and "2-year warranty" in row["messages"][-1]["content"]
        for row in rows
    )


async def test_healthy_traffic_fires_nothing(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    inferences, feedback = traffic(40, degraded=False)
    async with running_sink(settings, clickhouse) as bus:
        await asyncio.gather(*(bus.publish(event) for event in inferences + feedback))
        await eventually(
            lambda: (
                clickhouse.query("SELECT count() AS n FROM feedback_with_inference WHERE inference_stored")[0]["n"]
                >= 40
            ),
            what="sink stored traffic",
        )
        monitor = monitor_for(monitor_store, bus, None, tmp_path)
        reports = [await monitor.tick(datetime.now(UTC) + timedelta(seconds=1 + 30 * tick)) for tick in range(3)]
    evaluations = [e for report in reports for e in report.evaluations]
    assert evaluations and all(e.value is not None and not e.firing for e in evaluations)
    assert not any(report.opened or report.retraining for report in reports)
    assert monitor_store.alerts() == []
    assert await read_topic(settings, AlertRaised, expect=0, wait_s=2) == []


def test_a_rule_with_a_bad_query_or_unknown_metric_is_rejected_with_the_reason(monitor_store: MonitorStore) -> None:
    with pytest.raises(RuleError, match=r"rule slow: metric: .*unknown metric 'latency_p42'"):
        parse_rules([{"name": "slow", "version": 1, "metric": "latency_p42", "threshold": 1}], monitor_store.check_rule)
    with pytest.raises(RuleError, match=r"rule tokens: query does not run: .*no_such_column"):
        parse_rules(
            [{"name": "tokens", "version": 1, "metric": "sql", "query": "avg(no_such_column)", "threshold": 1}],
            monitor_store.check_rule,
        )
    with pytest.raises(RuleError, match=r"rule drift: .*set baseline_window_s"):
        parse_rules(
            [{"name": "drift", "version": 1, "metric": "prompt_tokens_psi", "threshold": 0.2}], monitor_store.check_rule
        )
    assert parse_rules(
        [{"name": "tokens", "version": 1, "metric": "sql", "query": "avg(completion_tokens)", "threshold": 100}],
        monitor_store.check_rule,
    )


async def test_an_empty_or_thin_window_is_no_data_never_an_alert(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    published: list = []

    async def publish(envelope) -> None:  # noqa: ANN001
        published.append(envelope)

    monitor = Monitor(
        monitor_store,
        parse_rules(RULES, monitor_store.check_rule),
        publish,
        RegistryClient("http://unused", None),
        policy=RetrainingPolicy(),
        state_dir=tmp_path,
    )
    empty = await monitor.tick()
    assert empty.evaluations == [] and empty.opened == [] and published == []
    # Three terrible inferences: below min_samples, so "no data" with the reason, not a 100% thumbs-down alert.
    inferences, feedback = traffic(3, degraded=True)
    sink = Sink(FeedbackStore(lambda: clickhouse), Redactor())
    sink.store_inferences([wrap(event, producer="test") for event in inferences])
    sink.store_feedback([wrap(event, producer="test") for event in feedback])
    thin = await monitor.tick(datetime.now(UTC) + timedelta(seconds=1))
    assert thin.evaluations and all(e.no_data and not e.firing for e in thin.evaluations)
    assert any("no data: 3 samples < 10" in e.reason for e in thin.evaluations)
    assert thin.opened == [] and published == []


def _authenticated_monitor_app(tmp_path: Path, monitor: Monitor) -> tuple[FastAPI, str]:
    store = RegistryStore(f"sqlite:///{tmp_path / 'keys.db'}")
    store.migrate()
    auth = Authenticator(KeyStore(store.engine))
    key, _ = auth.keys.create(principal="ops", role=Role.operator, created_by="test")
    app = FastAPI()

    @app.exception_handler(DoorError)
    async def _door_error(_request, error: DoorError):  # noqa: ANN202
        return error_response(error.status, error.detail)

    app.include_router(monitor_router(monitor, auth, console=Console(auth), console_hours=1))
    return app, key


async def test_query_door_reads_and_the_engine_refuses_writes(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    sink = Sink(FeedbackStore(lambda: clickhouse), Redactor())
    sink.store_inferences([wrap(event, producer="test") for event in traffic(5, degraded=False)[0]])
    monitor = Monitor(
        monitor_store,
        [],
        lambda envelope: asyncio.sleep(0),
        RegistryClient("http://unused", None),
        policy=RetrainingPolicy(),
        state_dir=tmp_path,
    )
    app, key = _authenticated_monitor_app(tmp_path, monitor)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://monitor", headers={"Authorization": f"Bearer {key}"}
    ) as client:
        ok = await client.post(
            "/monitor/v1/query", json={"sql": "SELECT model_name, count() AS n FROM inference_log GROUP BY model_name"}
        )
        assert ok.status_code == 200 and ok.json()["rows"] == [[MODEL, 5]]
        refused = await client.post(
            "/monitor/v1/query",
            json={
                "sql": "INSERT INTO model_price (model_name, usd_per_1k_input_tokens, usd_per_1k_output_tokens) VALUES ('x', 1, 1)"
            },
        )
        assert refused.status_code == 403, refused.text
        assert "READONLY" in refused.json()["error"]["code"] or "readonly" in refused.json()["error"]["message"].lower()
        sneaky = await client.post("/monitor/v1/query", json={"sql": "SELECT 1 SETTINGS readonly = 0"})
        assert sneaky.status_code in (400, 403)
        # Found by schemathesis at full size: a `%` the client-side binding trips on was a 500.
        unbindable = await client.post("/monitor/v1/query", json={"sql": ";\u00bf%h", "parameters": {"": {}}})
        assert unbindable.status_code == 400 and "cannot be bound" in unbindable.json()["error"]["message"], (
            unbindable.text
        )
    assert clickhouse.query("SELECT count() AS n FROM model_price")[0]["n"] == 0
