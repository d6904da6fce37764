"""The records `flywheel ops dataset-from-spans` builds from spans and their feedback, and the checks on its
selectors (the command against a real store and registry: tests/integration/test_ops_dataset_from_spans.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from contracts.events import SpanKind
from services.monitor.span_datasets import (
    MAX_SPANS,
    FeedbackChoice,
    SpanChoice,
    build_records,
    feedback_on,
    feedback_query,
    input_messages,
    output_text,
    spans_query,
)
from services.monitor.traces import BadValue
from services.registry.datasets import validate_jsonl

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"


def span(span_id: str = "a000000000000003", **fields: Any) -> dict[str, Any]:
    return {
        "trace_id": TRACE,
        "span_id": span_id,
        "session_id": "conv-9",
        "inference_id": "chatcmpl-a",
        "name": "chat smollm2",
        "kind": "llm",
        "service_name": "rag-app",
        "model_name": "smollm2",
        "truncated": False,
        "input_text": "What is the refund window?",
        "output_text": "Ninety days.",
        **fields,
    }


def feedback(feedback_id: str, **fields: Any) -> dict[str, Any]:
    row = {
        "feedback_id": feedback_id,
        "inference_id": "",
        "trace_id": None,
        "span_id": None,
        "session_id": None,
        "thumbs": None,
        "rating": None,
        "correction": None,
        "source": "end_user",
    }
    return {**row, **fields}


def test_plain_input_is_one_user_message_and_the_output_the_answer() -> None:
    [record] = build_records([span()], []).records
    assert record["messages"] == [
        {"role": "user", "content": "What is the refund window?"},
        {"role": "assistant", "content": "Ninety days."},
    ]
    assert record["provenance"] == {
        "trace_id": TRACE,
        "span_id": "a000000000000003",
        "session_id": "conv-9",
        "inference_id": "chatcmpl-a",
        "span_name": "chat smollm2",
        "model_name": "smollm2",
        "assistant": "output",
        "feedback": [],
    }


def test_input_that_is_a_json_message_list_is_the_conversation() -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Refund window?"},
        {"role": "assistant", "content": "30 days."},
        {"role": "user", "content": "And for sale items?"},
    ]
    [record] = build_records([span(input_text=json.dumps(conversation))], []).records
    assert record["messages"] == [*conversation, {"role": "assistant", "content": "Ninety days."}]
    # OpenInference records the whole request (input.value): its `messages` are the conversation.
    assert input_messages(json.dumps({"model": "smollm2", "messages": conversation})) == conversation
    # The GenAI conventions' gen_ai.input.messages keep the text in parts.
    assert input_messages(json.dumps([{"role": "user", "parts": [{"type": "text", "content": "Hi"}]}])) == [
        {"role": "user", "content": "Hi"}
    ]


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2, 3]",
        json.dumps([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}]),
        json.dumps([{"role": "user", "content": [{"type": "image_url"}]}]),
        json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
        "{not json",
        "[]",
    ],
)
def test_input_that_is_not_a_whole_conversation_ending_with_the_user_is_kept_as_text(text: str) -> None:
    assert input_messages(text) == [{"role": "user", "content": text}]


def test_output_as_a_response_or_message_list_gives_the_assistants_text() -> None:
    assert output_text(json.dumps({"choices": [{"message": {"role": "assistant", "content": "Ninety."}}]})) == "Ninety."
    assert output_text(json.dumps([{"role": "assistant", "content": "Ninety."}])) == "Ninety."
    assert output_text('{"answer": 90}') == '{"answer": 90}'


def test_a_reviewers_correction_of_the_span_or_its_inference_is_the_answer_the_newest_winning() -> None:
    rows = [
        feedback("f1", inference_id="chatcmpl-a", thumbs="down", correction="Thirty days.", source="reviewer"),
        feedback("f2", trace_id=TRACE, span_id="a000000000000003", correction=" Thirty days. ", source="reviewer"),
        feedback("f3", trace_id=TRACE, span_id="a000000000000003", correction="Thirty days, receipt needed."),
    ]
    [record] = build_records([span()], rows).records
    # f3 is newest but an end user's: only a reviewer's correction is taught (as retraining takes them).
    assert record["messages"][-1] == {"role": "assistant", "content": "Thirty days."}
    assert record["provenance"]["assistant"] == "correction"
    assert [(f["feedback_id"], f["target"], f["corrected"]) for f in record["provenance"]["feedback"]] == [
        ("f1", "inference", True),
        ("f2", "span", True),
        ("f3", "span", True),
    ]


def test_a_correction_of_the_trace_or_session_does_not_replace_one_calls_answer() -> None:
    rows = [
        feedback("f1", trace_id=TRACE, correction="A better pipeline answer.", source="reviewer"),
        feedback("f2", session_id="conv-9", correction="A better conversation.", source="reviewer"),
    ]
    [record] = build_records([span()], rows).records
    assert record["messages"][-1]["content"] == "Ninety days."
    assert [(f["feedback_id"], f["target"]) for f in record["provenance"]["feedback"]] == [
        ("f1", "trace"),
        ("f2", "session"),
    ]


def test_feedback_is_matched_to_its_own_span_trace_inference_and_session_only() -> None:
    rows = [
        feedback("on-trace", trace_id=TRACE, thumbs="down"),
        feedback("on-sibling", trace_id=TRACE, span_id="a000000000000002", thumbs="down"),
        feedback("on-other-trace", trace_id=OTHER_TRACE, thumbs="down"),
        feedback("on-other-inference", inference_id="chatcmpl-b", thumbs="down"),
        feedback("on-other-session", session_id="conv-1", thumbs="down"),
        feedback("on-session", session_id="conv-9", thumbs="up", rating=4),
    ]
    found = feedback_on(span(), rows)
    assert [(row["feedback_id"], row["target"]) for row in found] == [("on-trace", "trace"), ("on-session", "session")]
    # A span with no session is about no session's feedback.
    assert [row["feedback_id"] for row in feedback_on(span(session_id=None), rows)] == ["on-trace"]


def test_one_record_per_span_and_spans_that_teach_nothing_are_counted_not_kept() -> None:
    spans = [
        span("a000000000000003"),
        span("a000000000000003", output_text="a second row of the same span"),
        span("a000000000000005", truncated=True),
        span("a000000000000006", output_text=""),
        span("a000000000000007", input_text="  "),
    ]
    built = build_records(spans, [])
    assert [r["provenance"]["span_id"] for r in built.records] == ["a000000000000003"]
    assert (built.truncated, built.empty) == (1, 2)
    # A span without an output still gives a record when a reviewer answered it.
    corrected = feedback("f1", inference_id="chatcmpl-a", correction="Thirty days.", source="reviewer")
    assert len(build_records([span(output_text="")], [corrected]).records) == 1


def test_records_are_what_the_registry_accepts_provenance_and_all() -> None:
    built = build_records([span(), span("a000000000000004", input_text='[{"role": "user", "content": "Hi"}]')], [])
    assert validate_jsonl(built.jsonl().encode()) == ("chat", 2)


def test_the_span_query_binds_every_value_and_bounds_its_limit() -> None:
    chosen = SpanChoice(1_700_000_000_000, SpanKind.llm, "chat*", "rag-app", FeedbackChoice.thumbs_down)
    sql, parameters = spans_query(chosen, 50)
    assert parameters == {"kind": "llm", "since_ms": 1_700_000_000_000, "name": "chat", "service": "rag-app"}
    assert "FROM span FINAL" in sql and sql.endswith("LIMIT 50")
    assert "startsWith(name, {name:String})" in sql and "rag-app" not in sql and "chat" not in sql.split("FROM")[1]
    assert sql.count("thumbs = 'down'") == 4, "span, inference, trace and session"

    exact, exact_parameters = spans_query(SpanChoice(0, name="chat smollm2"), 1)
    assert "name = {name:String}" in exact and exact_parameters["name"] == "chat smollm2"
    corrected, _ = spans_query(SpanChoice(0, feedback=FeedbackChoice.corrected), 1)
    assert corrected.count("source = 'reviewer'") == 2, "a correction is of the span or its inference"
    assert "feedback" not in spans_query(SpanChoice(0), 1)[0]

    for limit in (0, MAX_SPANS + 1):
        with pytest.raises(BadValue):
            spans_query(SpanChoice(0), limit)
    for name in ("*", "", "a*b*", "x" * 257):
        with pytest.raises(BadValue):
            spans_query(SpanChoice(0, name=name), 1)
    with pytest.raises(BadValue):
        spans_query(SpanChoice(0, service=""), 1)


def test_the_feedback_query_binds_the_spans_ids() -> None:
    _, parameters = feedback_query([span(), span("a000000000000004", inference_id=None, session_id=None)])
    assert parameters == {"trace_ids": [TRACE], "inference_ids": ["chatcmpl-a"], "session_ids": ["conv-9"]}


def test_a_version_is_a_feedback_dataset_only_when_every_answer_is_a_correction() -> None:
    fix = feedback("f1", inference_id="chatcmpl-a", correction="Thirty days.", source="reviewer")
    assert build_records([span()], [fix]).all_corrections
    assert not build_records([span(), span("a000000000000004", inference_id="chatcmpl-b")], [fix]).all_corrections
    assert not build_records([], []).all_corrections
