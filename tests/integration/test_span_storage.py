"""Spans on the real broker, stored by the real sink in embedded ClickHouse: every span once (also when
delivered twice), scrubbed as inference text is, and the trace and session views reconstructing the
pipelines exactly. The numbers below are worked out by hand from the spans each test publishes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contracts.envelope import Envelope, wrap
from contracts.events import FeedbackReceived, InferenceLogged, SpanKind, SpanLogged, SpanStatus, Thumbs
from contracts.topics import topic_for
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.settings import FlywheelSettings
from tests.faults.support import group_lag
from tests.integration.test_sink_clickhouse import (
    clickhouse,  # noqa: F401
    counts,
    eventually,
    running_sink,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TURN_1 = "4bf92f3577b34da6a3ce929d0e0e4736"
TURN_2 = "0af7651916cd43dd8448eb211c80319c"
TURN_3 = "5b8efff798038103d269b633813fc60c"
BATCH_JOB = "a3ce929d0e0e47364bf92f3577b34da6"
SESSION = "conv-7"


def span(
    trace_id: str,
    span_id: str,
    parent: str | None,
    name: str,
    kind: SpanKind,
    start: datetime,
    duration_ms: int,
    **fields: Any,
) -> Envelope[SpanLogged]:
    return wrap(
        SpanLogged(
            trace_id=trace_id,
            span_id=span_id,
            parent_span_id=parent,
            name=name,
            kind=kind,
            started_at=start,
            ended_at=start + timedelta(milliseconds=duration_ms),
            **fields,
        ),
        producer="otlp-intake",
    )


def ms(n: int) -> timedelta:
    return timedelta(milliseconds=n)


def pipelines() -> dict[str, Envelope[SpanLogged]]:
    """Three turns of one conversation with a RAG app, and a batch job outside any session."""
    app = {"session_id": SESSION, "service_name": "rag-app"}
    turn_2 = T0 + timedelta(seconds=60)
    turn_3 = T0 + timedelta(seconds=120)
    job = T0 + timedelta(seconds=10)
    return {
        # Turn 1: 1000 ms; retrieval, an LLM call through the gateway, the gateway's Triton call under it.
        "r1": span(TURN_1, "1000000000000001", None, "turn", SpanKind.chain, T0, 1000, **app),
        "s1a": span(
            TURN_1,
            "1000000000000002",
            "1000000000000001",
            "retrieve",
            SpanKind.retrieval,
            T0 + ms(10),
            50,
            input_text="orders of ann@example.org",
            output_text="order 17, shipped",
            attributes={"retrieval.query": "mail ann@example.org", "user_id": "u-42", "top_k": "3"},
            **app,
        ),
        "s1b": span(
            TURN_1,
            "1000000000000003",
            "1000000000000001",
            "chat smollm2",
            SpanKind.llm,
            T0 + ms(100),
            800,
            model_name="smollm2",
            inference_id="chatcmpl-t1",
            prompt_tokens=100,
            completion_tokens=20,
            cost_usd=0.002,
            **app,
        ),
        "s1c": span(
            TURN_1,
            "1000000000000004",
            "1000000000000003",
            "triton infer",
            SpanKind.unknown,
            T0 + ms(150),
            700,
            service_name="flywheel-serving",
            session_id=SESSION,
        ),
        # Turn 2: 2500 ms; a tool call fails, the LLM answers anyway.
        "r2": span(TURN_2, "2000000000000001", None, "turn", SpanKind.chain, turn_2, 2500, **app),
        "s2a": span(
            TURN_2,
            "2000000000000002",
            "2000000000000001",
            "lookup_order",
            SpanKind.tool,
            turn_2 + ms(10),
            500,
            status=SpanStatus.error,
            error="timeout after 500 ms",
            **app,
        ),
        "s2b": span(
            TURN_2,
            "2000000000000003",
            "2000000000000001",
            "chat smollm2",
            SpanKind.llm,
            turn_2 + ms(600),
            1800,
            inference_id="chatcmpl-t2",
            prompt_tokens=150,
            completion_tokens=40,
            cost_usd=0.003,
            **app,
        ),
        # Turn 3: 800 ms; the app reports no cost, and its LLM span names no inference (the gateway's log does).
        "r3": span(TURN_3, "3000000000000001", None, "turn", SpanKind.chain, turn_3, 800, **app),
        "s3a": span(
            TURN_3,
            "3000000000000002",
            "3000000000000001",
            "chat smollm2",
            SpanKind.llm,
            turn_3 + ms(50),
            700,
            prompt_tokens=80,
            completion_tokens=10,
            **app,
        ),
        # A batch job: 300 ms, no session.
        "r4": span(BATCH_JOB, "4000000000000001", None, "embed-docs", SpanKind.chain, job, 300, service_name="indexer"),
        "s4a": span(
            BATCH_JOB,
            "4000000000000002",
            "4000000000000001",
            "embed",
            SpanKind.embedding,
            job,
            300,
            prompt_tokens=500,
            service_name="indexer",
        ),
    }


async def _no_lag(settings: FlywheelSettings, topics: list[str]) -> bool:
    """Whether the sink has committed every record of `topics`: all of them are handled, stored or not."""
    return await group_lag(settings.kafka_bootstrap or "", "feedback", topics) == 0


async def test_spans_are_stored_once_scrubbed_and_summarised_per_trace_and_session(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:
    spans = pipelines()
    topic_names = [topic_for(event, topics) for event in (SpanLogged, InferenceLogged, FeedbackReceived)]
    async with running_sink(settings, clickhouse) as bus:
        # s2b twice in one go (one batch, most likely), then again later (a batch of its own).
        for envelope in [*spans.values(), spans["s2b"]]:
            await bus.publish_envelope(envelope)
        await bus.publish(
            InferenceLogged(
                inference_id="chatcmpl-t3",
                model_name="smollm2",
                trace_id=TURN_3,
                span_id="3000000000000003",
                session_id=SESSION,
            )
        )
        for inference_id, thumbs, rating in (
            ("chatcmpl-t1", Thumbs.up, 5),
            ("chatcmpl-t2", Thumbs.down, 2),
            ("chatcmpl-t3", Thumbs.down, None),
            ("chatcmpl-elsewhere", Thumbs.down, 1),
        ):
            await bus.publish(FeedbackReceived(inference_id=inference_id, thumbs=thumbs, rating=rating))
        await eventually(lambda: counts(clickhouse, "span")[0] >= 11, what="the 11 spans stored")
        await eventually(lambda: _no_lag(settings, topic_names), what="the sink to commit everything")
        await bus.publish_envelope(spans["s2b"])
        # An OTLP exporter retrying a request: the same span in a new event, which collapses under FINAL.
        await bus.publish(spans["s3a"].payload)
        await eventually(lambda: counts(clickhouse, "span")[0] >= 12, what="the re-sent span stored")
        await eventually(lambda: _no_lag(settings, topic_names), what="the sink to commit the copies")

    # Each event once: 11 spans and one re-sent span, not 14 rows.
    assert counts(clickhouse, "span") == (12, 12)
    assert clickhouse.query("SELECT count() AS spans FROM span FINAL") == [{"spans": 11}]

    retrieve = clickhouse.query(
        "SELECT trace_id, parent_span_id, session_id, name, kind, service_name, duration_ms, status, input_text, "
        "output_text, attributes FROM span FINAL WHERE span_id = '1000000000000002'"
    )
    assert len(retrieve) == 1
    attributes = dict(retrieve[0].pop("attributes"))  # an Arrow map reads back as (key, value) pairs
    assert retrieve[0] == {
        "trace_id": TURN_1,
        "parent_span_id": "1000000000000001",
        "session_id": SESSION,
        "name": "retrieve",
        "kind": "retrieval",
        "service_name": "rag-app",
        "duration_ms": 50.0,
        "status": "unset",
        "input_text": "orders of [EMAIL]",
        "output_text": "order 17, shipped",
    }
    # Attribute values scrubbed as inference metadata is: text by detector, identities whole.
    assert attributes["retrieval.query"] == "mail [EMAIL]" and attributes["top_k"] == "3"
    assert attributes["user_id"].startswith("[USER:") and "u-42" not in attributes["user_id"]
    assert clickhouse.query("SELECT status, error FROM span FINAL WHERE span_id = '2000000000000002'") == [
        {"status": "error", "error": "timeout after 500 ms"}
    ]
    assert clickhouse.query("SELECT trace_id, span_id, session_id FROM inference_log") == [
        {"trace_id": TURN_3, "span_id": "3000000000000003", "session_id": SESSION}
    ]

    traces = clickhouse.query(
        "SELECT trace_id, root_name, service_name, session_id, started_at, duration_ms, root_spans, span_count, "
        "llm_span_count, prompt_tokens, completion_tokens, cost_usd, error_spans, errored, feedback_count, "
        "thumbs_up, thumbs_down, mean_rating FROM trace_summary ORDER BY started_at"
    )
    for row in traces:
        row["cost_usd"] = None if row["cost_usd"] is None else round(row["cost_usd"], 9)
    common = {"root_spans": 1, "root_name": "turn", "service_name": "rag-app", "session_id": SESSION}
    assert traces == [
        {
            **common,
            "trace_id": TURN_1,
            "started_at": T0,
            "duration_ms": 1000.0,
            "span_count": 4,
            "llm_span_count": 1,
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "cost_usd": 0.002,
            "error_spans": 0,
            "errored": 0,
            "feedback_count": 1,
            "thumbs_up": 1,
            "thumbs_down": 0,
            "mean_rating": 5.0,
        },
        {
            "trace_id": BATCH_JOB,
            "root_name": "embed-docs",
            "service_name": "indexer",
            "session_id": None,
            "started_at": T0 + timedelta(seconds=10),
            "duration_ms": 300.0,
            "root_spans": 1,
            "span_count": 2,
            "llm_span_count": 0,
            "prompt_tokens": 500,
            "completion_tokens": 0,
            "cost_usd": None,
            "error_spans": 0,
            "errored": 0,
            "feedback_count": 0,
            "thumbs_up": 0,
            "thumbs_down": 0,
            "mean_rating": None,
        },
        {
            **common,
            "trace_id": TURN_2,
            "started_at": T0 + timedelta(seconds=60),
            "duration_ms": 2500.0,
            "span_count": 3,
            "llm_span_count": 1,
            "prompt_tokens": 150,
            "completion_tokens": 40,
            "cost_usd": 0.003,
            "error_spans": 1,
            "errored": 1,
            "feedback_count": 1,
            "thumbs_up": 0,
            "thumbs_down": 1,
            "mean_rating": 2.0,
        },
        {
            **common,
            "trace_id": TURN_3,
            "started_at": T0 + timedelta(seconds=120),
            "duration_ms": 800.0,
            "span_count": 2,
            "llm_span_count": 1,
            "prompt_tokens": 80,
            "completion_tokens": 10,
            "cost_usd": None,
            "error_spans": 0,
            "errored": 0,
            # Through the gateway's inference log: the span itself names no inference.
            "feedback_count": 1,
            "thumbs_up": 0,
            "thumbs_down": 1,
            "mean_rating": None,
        },
    ]

    sessions = clickhouse.query("SELECT * FROM session_summary")
    sessions[0]["cost_usd"] = round(sessions[0]["cost_usd"], 9)
    assert sessions == [
        {
            "session_id": SESSION,
            "traces": 3,
            "turns": 3,
            "services": ["rag-app"],
            "first_at": T0,
            "last_at": T0 + timedelta(seconds=120, milliseconds=800),
            "duration_ms": 120_800.0,
            "span_count": 9,
            "prompt_tokens": 330,
            "completion_tokens": 70,
            "cost_usd": 0.005,
            "error_spans": 1,
            "errored_traces": 1,
            "feedback_count": 3,
            "thumbs_down": 2,
            # None given on the session as a whole (tests/integration/test_feedback_targets.py gives some).
            "session_feedback": 0,
            "session_thumbs_up": 0,
            "session_thumbs_down": 0,
            "session_mean_rating": None,
        }
    ]


async def test_a_trace_whose_root_is_not_stored_yet_is_summarised_from_its_earliest_span(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:
    spans = pipelines()
    async with running_sink(settings, clickhouse) as bus:
        # The children of turn 2 arrive; its root span has not been exported yet.
        for key in ("s2a", "s2b"):
            await bus.publish_envelope(spans[key])
        await eventually(lambda: counts(clickhouse, "span")[0] == 2, what="the two children stored")
        partial = clickhouse.query("SELECT root_name, root_spans, span_count, duration_ms FROM trace_summary")
        assert partial == [{"root_name": "lookup_order", "root_spans": 0, "span_count": 2, "duration_ms": 2390.0}]
        assert clickhouse.query("SELECT traces, turns FROM session_summary") == [{"traces": 1, "turns": 0}]

        await bus.publish_envelope(spans["r2"])
        await eventually(lambda: counts(clickhouse, "span")[0] == 3, what="the root stored")
    assert clickhouse.query("SELECT root_name, root_spans, span_count, duration_ms FROM trace_summary") == [
        {"root_name": "turn", "root_spans": 1, "span_count": 3, "duration_ms": 2500.0}
    ]
