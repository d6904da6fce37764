"""`flywheel ops trace`'s tree and the checks on what the trace commands and pages take from a user (the commands
against a real store: tests/integration/test_ops_traces_cli.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.monitor.cli import span_tree
from services.monitor.traces import BadValue, checked_session_id, checked_trace_id, since_moment

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(span_id: str, parent: str | None, name: str, start_us: int, duration_ms: float, **fields: Any) -> dict:
    return {
        "span_id": span_id,
        "parent_span_id": parent,
        "name": name,
        "kind": fields.get("kind", "chain"),
        "service_name": fields.get("service_name"),
        "start_us": start_us,
        "duration_ms": duration_ms,
        "status": fields.get("status", "ok"),
        "error": fields.get("error"),
        "model_name": fields.get("model_name"),
        "prompt_tokens": fields.get("prompt_tokens", 0),
        "completion_tokens": fields.get("completion_tokens", 0),
        "cost_usd": None,
        "inference_id": fields.get("inference_id"),
    }


def test_children_sit_under_their_parent_and_an_orphan_starts_its_own_branch() -> None:
    spans = [
        span("a000000000000001", None, "answer", 1_000_000, 20.0, service_name="app"),
        span("a000000000000002", "a000000000000001", "retrieve", 1_001_000, 2.5, kind="retrieval"),
        span(
            "a000000000000003",
            "a000000000000001",
            "chat",
            1_004_000,
            15.0,
            kind="llm",
            model_name="smollm2",
            prompt_tokens=12,
            completion_tokens=3,
            inference_id="chatcmpl-1",
        ),
        span("a000000000000004", "a000000000000003", "compute", 1_005_000, 10.0, status="error", error="oom\nat x"),
        span("a000000000000005", "a0000000000000ff", "late tool", 1_030_000, 1.0, kind="tool"),
    ]
    assert span_tree(TRACE, spans) == [
        f"trace {TRACE}: 5 spans, 31.0 ms, tokens 12 in / 3 out, 1 in error",
        "answer  [chain]  +0.0 ms  20.0 ms  ok  service app  span a000000000000001",
        "  retrieve  [retrieval]  +1.0 ms  2.5 ms  ok  span a000000000000002",
        "  chat  [llm]  +4.0 ms  15.0 ms  ok  tokens 12/3  model smollm2  inference chatcmpl-1  span a000000000000003",
        "    compute  [chain]  +5.0 ms  10.0 ms  error  span a000000000000004  error: oom?at x",
        "late tool  [tool]  +30.0 ms  1.0 ms  ok  span a000000000000005  (parent a0000000000000ff not stored)",
    ]


def feedback(span_id: str | None, inference_id: str, thumbs: str | None, rating: int | None) -> dict:
    return {"span_id": span_id, "inference_id": inference_id, "thumbs": thumbs, "rating": rating}


def test_feedback_shows_on_the_trace_and_on_each_span_it_is_about() -> None:
    spans = [
        span("a000000000000001", None, "answer", 0, 20.0),
        span("a000000000000002", "a000000000000001", "retrieve", 1_000, 2.0),
        span("a000000000000003", "a000000000000001", "chat", 4_000, 15.0, inference_id="chatcmpl-1"),
    ]
    given = [
        feedback(None, "", "up", None),  # on the trace
        feedback("a000000000000002", "", "down", 2),  # on the retrieval span
        feedback("a000000000000002", "", None, 5),
        feedback(None, "chatcmpl-1", "down", None),  # on the inference the chat span names
    ]
    assert span_tree(TRACE, spans, given) == [
        f"trace {TRACE}: 3 spans, 20.0 ms, tokens 0 in / 0 out, 0 in error, feedback 1 (1 up) on the trace",
        "answer  [chain]  +0.0 ms  20.0 ms  ok  span a000000000000001",
        "  retrieve  [chain]  +1.0 ms  2.0 ms  ok  span a000000000000002  feedback 2 (1 down, rating 3.5)",
        "  chat  [chain]  +4.0 ms  15.0 ms  ok  inference chatcmpl-1  span a000000000000003  feedback 1 (1 down)",
    ]


def test_a_cycle_of_parents_is_printed_once_and_not_followed_round() -> None:
    spans = [
        span("b000000000000001", "b000000000000002", "one", 0, 1.0),
        span("b000000000000002", "b000000000000001", "two\x1b[2J", 500, 1.0),
    ]
    assert span_tree(TRACE, spans)[1:] == [
        "one  [chain]  +0.0 ms  1.0 ms  ok  span b000000000000001",
        "  two?[2J  [chain]  +0.5 ms  1.0 ms  ok  span b000000000000002",
    ]


@pytest.mark.parametrize(
    "hostile",
    ["", "4BF92F3577B34DA6A3CE929D0E0E4736", "4bf92f35", "4bf92f3577b34da6a3ce929d0e0e4736'; DROP", "0" * 32],
)
def test_a_malformed_trace_id_is_refused_before_any_query(hostile: str) -> None:
    with pytest.raises(BadValue):
        checked_trace_id(hostile)
    assert checked_trace_id(TRACE) == TRACE


@pytest.mark.parametrize("hostile", ["a b", "x" * 129, "conv'1", ""])
def test_a_malformed_session_id_is_refused(hostile: str) -> None:
    with pytest.raises(BadValue):
        checked_session_id(hostile)
    assert checked_session_id("conv-1.a:b/c") == "conv-1.a:b/c"


def test_since_takes_a_duration_or_a_time() -> None:
    now = datetime(2026, 1, 2, 12, tzinfo=UTC)
    assert since_moment("30m", now) == now - timedelta(minutes=30)
    assert since_moment("7d", now) == now - timedelta(days=7)
    assert since_moment("2026-01-01T08:00", now) == datetime(2026, 1, 1, 8, tzinfo=UTC)
    for wrong in ("yesterday", "10 weeks", "999999d"):
        with pytest.raises(BadValue):
            since_moment(wrong, now)
