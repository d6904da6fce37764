"""Rules over spans, end to end: spans published on the real broker and stored by the real sink in chDB,
the monitor's own tick evaluating span rules over them, and alert.raised on the broker. The values
below are worked out by hand from the spans the test publishes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from contracts.events import AlertRaised, AlertState, SpanKind, SpanLogged, SpanStatus
from contracts.topics import topic_for
from services.monitor.retraining import RetrainingPolicy
from services.monitor.rules import parse_rules
from services.monitor.service import Monitor
from services.monitor.store import MonitorStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.registry_client import RegistryClient
from services.runtime.settings import FlywheelSettings
from tests.faults.support import group_lag
from tests.monitor_support import clickhouse, eventually, monitor_store, read_topic, running_sink  # noqa: F401 - clickhouse, monitor_store: fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = "smollm2"
TURNS = 30
TOOL_CALLS = 20

SPAN_RULES: list[dict[str, Any]] = [
    {
        "name": "slow-retrieve",
        "version": 1,
        "metric": "span_latency_p95_ms",
        "spans": {"name": "retrieve"},
        "threshold": 500,
        "severity": "critical",
        "window_s": 900,
        "min_samples": 10,
    },
    {
        "name": "slow-embeddings",
        "version": 1,
        "metric": "span_latency_p95_ms",
        "spans": {"name": "embed.*"},
        "threshold": 500,
        "window_s": 900,
        "min_samples": 10,
    },
    {
        "name": "tool-errors",
        "version": 1,
        "metric": "span_error_rate",
        "spans": {"kind": "tool"},
        "threshold": 0.1,
        "window_s": 900,
        "min_samples": 10,
    },
    {
        "name": "llm-cost",
        "version": 1,
        "metric": "span_cost_usd_sum",
        "spans": {"kind": "llm", "service": "rag-app"},
        "scope": ["model_name"],
        "threshold": 0.05,
        "window_s": 3600,
        "min_samples": 10,
    },
    {
        "name": "guardrail-errors",
        "version": 1,
        "metric": "span_error_rate",
        "spans": {"kind": "guardrail"},
        "threshold": 0.1,
        "window_s": 900,
        "min_samples": 10,
    },
    {
        "name": "elsewhere",
        "version": 1,
        "metric": "span_latency_p99_ms",
        "spans": {"service": "no-such-app"},
        "threshold": 1,
        "window_s": 900,
        "min_samples": 1,
    },
]


def step(trace_id: str, n: int, name: str, kind: SpanKind, ended: datetime, ms: int, **fields: Any) -> SpanLogged:
    return SpanLogged(
        trace_id=trace_id,
        span_id=f"{n:016x}",
        parent_span_id=None if n == 1 else f"{1:016x}",
        name=name,
        kind=kind,
        started_at=ended - timedelta(milliseconds=ms),
        ended_at=ended,
        **fields,
    )


def traffic(now: datetime) -> tuple[list[SpanLogged], list[SpanLogged]]:
    """Thirty RAG turns of the last two minutes, spans outside what the rules select, and the tool calls
    (which an exporter will send twice)."""
    app = {"service_name": "rag-app"}
    spans, tools = [], []
    for i in range(TURNS):
        trace_id, ended = uuid.uuid4().hex, now - timedelta(seconds=5 + 4 * i)
        spans += [
            step(trace_id, 1, "turn", SpanKind.chain, ended, 2000, **app),
            # retrieve: 600..890 ms; its p95 is 875.5 ms (0.95 of the way from the first to the 30th: 870 + 0.55 * 10).
            step(trace_id, 2, "retrieve", SpanKind.retrieval, ended, 600 + 10 * i, **app),
            step(trace_id, 3, "embed.query", SpanKind.embedding, ended, 20 + i, **app),
            step(
                trace_id,
                4,
                "chat smollm2",
                SpanKind.llm,
                ended,
                400,
                model_name=MODEL,
                prompt_tokens=100,
                completion_tokens=20,
                cost_usd=0.002,
                **app,
            ),
        ]
        if i < TOOL_CALLS:
            failed = i % 5 == 0  # 4 of 20
            tools.append(
                step(
                    trace_id,
                    5,
                    "web_search",
                    SpanKind.tool,
                    ended,
                    150,
                    status=SpanStatus.error if failed else SpanStatus.ok,
                    error="HTTP 503" if failed else None,
                    **app,
                )
            )
    for _ in range(3):  # too few to judge
        spans.append(step(uuid.uuid4().hex, 1, "pii-check", SpanKind.guardrail, now, 5, status=SpanStatus.error))
    for _ in range(10):  # failed tool calls that ended two hours ago: outside every window
        spans.append(
            step(
                uuid.uuid4().hex, 1, "web_search", SpanKind.tool, now - timedelta(hours=2), 150, status=SpanStatus.error
            )
        )
    for _ in range(5):  # another service's expensive LLM calls: not what llm-cost selects
        spans.append(
            step(
                uuid.uuid4().hex,
                1,
                "chat",
                SpanKind.llm,
                now,
                900,
                model_name=MODEL,
                cost_usd=1.0,
                service_name="batch-job",
            )
        )
    return spans, tools


async def test_span_rules_alert_on_slow_failing_and_costly_spans_and_not_below_threshold_or_samples(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    spans, tools = traffic(now)
    async with running_sink(settings, clickhouse) as bus:
        for span in [*spans, *tools]:
            await bus.publish(span)
        # An OTLP exporter retrying its request: the same tool spans again under new event ids.
        for span in tools:
            await bus.publish(span)
        distinct = len(spans) + len(tools)
        await eventually(
            lambda: clickhouse.query("SELECT uniqExact(trace_id, span_id) AS n FROM span")[0]["n"] == distinct,
            what="every span stored",
        )

        async def sink_took_everything() -> bool:
            return await group_lag(settings.kafka_bootstrap or "", "feedback", [topic_for(SpanLogged, topics)]) == 0

        await eventually(sink_took_everything, what="the sink to take the re-sent copies too")

        published: list = []

        async def publish(envelope) -> None:  # noqa: ANN001
            published.append(envelope)
            await bus.publish_envelope(envelope)

        monitor = Monitor(
            monitor_store,
            parse_rules(SPAN_RULES, monitor_store.check_rule),
            publish,
            RegistryClient("http://unused", None),
            policy=RetrainingPolicy(),
            state_dir=tmp_path / "monitor",
        )
        first = await monitor.tick(now + timedelta(seconds=1))
        again = await monitor.tick(now + timedelta(seconds=31))
        acknowledged = await monitor.alerts.set_state(
            next(alert.alert_id for alert in first.opened if alert.rule_name == "tool-errors"),
            AlertState.acknowledged,
            "ops",
        )

    by_rule = {evaluation.rule.name: evaluation for evaluation in first.evaluations}
    assert set(by_rule) == {"slow-retrieve", "slow-embeddings", "tool-errors", "llm-cost", "guardrail-errors"}, (
        "a selector no span matches is no scope with traffic, so nothing to evaluate"
    )
    slow = by_rule["slow-retrieve"]
    assert slow.firing and slow.samples == TURNS and slow.value == pytest.approx(875.5)
    # Below the threshold: a value, not an alert.
    embeddings = by_rule["slow-embeddings"]
    assert not embeddings.firing and embeddings.samples == TURNS and embeddings.value == pytest.approx(47.55)
    # 4 of 20: neither the copies an exporter re-sent nor the failures of two hours ago count.
    errors = by_rule["tool-errors"]
    assert errors.firing and errors.samples == TOOL_CALLS and errors.value == pytest.approx(0.2)
    cost = by_rule["llm-cost"]
    assert cost.scope == {"model_name": MODEL} and cost.samples == TURNS and cost.value == pytest.approx(0.06)
    assert cost.firing
    guardrails = by_rule["guardrail-errors"]
    assert guardrails.no_data and not guardrails.firing and guardrails.reason == "no data: 3 samples < 10"

    opened = {alert.rule_name: alert for alert in first.opened}
    assert set(opened) == {"slow-retrieve", "tool-errors", "llm-cost"}
    assert again.opened == [] and again.resolved == [], "a firing rule opens its alert once, not once per tick"
    tool_alert = opened["tool-errors"]
    assert tool_alert.spans is not None and tool_alert.spans.kind is SpanKind.tool and tool_alert.model_name == ""
    assert tool_alert.metric == "span_error_rate" and tool_alert.value == pytest.approx(0.2)
    assert tool_alert.message == "span_error_rate = 0.2 > 0.1 over 20 samples for spans kind=tool"
    assert opened["llm-cost"].model_name == MODEL and opened["llm-cost"].adapter_version is None
    assert opened["llm-cost"].message.endswith("for spans kind=llm service=rag-app model_name=smollm2")
    assert opened["slow-retrieve"].spans is not None and opened["slow-retrieve"].spans.name == "retrieve"

    # The selector is kept with the alert: a later state, rebuilt from the stored row, still carries it.
    assert acknowledged is not None and acknowledged.state == AlertState.acknowledged
    assert acknowledged.spans == tool_alert.spans
    stored = {row["rule_name"]: row for row in monitor_store.alerts()}
    assert stored["tool-errors"]["spans"] == '{"kind":"tool"}' and stored["tool-errors"]["state"] == "acknowledged"

    on_kafka = await read_topic(settings, AlertRaised, expect=4)
    assert len(on_kafka) == len(published) == 4
    payloads = {(record["payload"]["rule_name"], record["payload"]["state"]): record["payload"] for record in on_kafka}
    assert payloads["slow-retrieve", "open"]["spans"] == {"kind": None, "name": "retrieve", "service": None}
    assert payloads["tool-errors", "acknowledged"]["spans"]["kind"] == "tool"
    assert payloads["llm-cost", "open"]["spans"] == {"kind": "llm", "name": None, "service": "rag-app"}

    # Every evaluation is kept, no-data included, as for rules over inferences.
    kept = monitor_store.evaluations(now - timedelta(hours=1))
    assert {row["rule_name"] for row in kept} == set(by_rule)
