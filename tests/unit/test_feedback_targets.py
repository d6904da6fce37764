"""The one-target rule of feedback (contracts/events.py): an inference, a span, a trace or a session, exactly
one, on the event and on the feedback door's request alike, and the Kafka key each target gets."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from contracts.envelope import wrap
from contracts.events import FeedbackReceived, FeedbackReviewed, FeedbackTarget, Thumbs
from contracts.http import FeedbackCreate
from contracts.publisher import encode
from services.feedback.models import UnreviewedFeedback, feedback_rows
from services.feedback.service import feedback_event
from services.runtime.privacy import Redactor

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TARGETS = "give inference_id (an inference), trace_id with span_id (a span), trace_id alone (a trace) or session_id (a session)"

ACCEPTED = [
    ({"inference_id": "chatcmpl-1"}, FeedbackTarget.inference, "chatcmpl-1"),
    ({"trace_id": TRACE, "span_id": SPAN}, FeedbackTarget.span, TRACE),
    ({"trace_id": TRACE}, FeedbackTarget.trace, TRACE),
    ({"session_id": "conv-7"}, FeedbackTarget.session, "conv-7"),
]

REFUSED = [
    ({}, f"feedback names no target: {TARGETS}"),
    (
        {"inference_id": "chatcmpl-1", "trace_id": TRACE},
        "feedback names 2 targets, an inference (inference_id) and a trace (trace_id); give exactly one: ",
    ),
    (
        {"trace_id": TRACE, "span_id": SPAN, "session_id": "conv-7"},
        "feedback names 2 targets, a span (trace_id and span_id) and a session (session_id); give exactly one: ",
    ),
    (
        {"inference_id": "chatcmpl-1", "trace_id": TRACE, "session_id": "conv-7"},
        "feedback names 3 targets, an inference (inference_id), a trace (trace_id) and a session (session_id)",
    ),
    ({"span_id": SPAN}, f"span_id {SPAN} needs its trace_id: a span is named by trace_id and span_id together"),
]

MALFORMED = [
    ({"trace_id": TRACE.upper()}, "trace_id", "String should match pattern '^[0-9a-f]{32}$'"),
    ({"trace_id": TRACE, "span_id": "00f067aa"}, "span_id", "String should match pattern '^[0-9a-f]{16}$'"),
    ({"trace_id": "0" * 32}, "trace_id", "an all-zero trace or span id is invalid (W3C trace context)"),
    ({"trace_id": TRACE, "span_id": "0" * 16}, "span_id", "an all-zero trace or span id is invalid"),
    ({"session_id": "conv 7"}, "session_id", "String should match pattern"),
]


@pytest.mark.parametrize(("targets", "target", "key"), ACCEPTED, ids=lambda value: str(value)[:20])
@pytest.mark.parametrize("event", [FeedbackReceived, FeedbackReviewed, UnreviewedFeedback])
def test_each_target_alone_is_accepted_and_keys_the_record(
    event: type[FeedbackReceived], targets: dict[str, Any], target: FeedbackTarget, key: str
) -> None:
    feedback = event(thumbs=Thumbs.down, **targets)
    assert feedback.target is target
    assert feedback.partition_key() == key
    record_key, _, _ = encode(wrap(feedback, producer="test"))
    assert record_key == key.encode()


def test_feedback_on_an_inference_keeps_the_key_it_always_had() -> None:
    # Before targets, the key was the inference_id field; records of one inference stay on one partition.
    assert FeedbackReceived(inference_id="app:req/42", rating=3).partition_key() == "app:req/42"


@pytest.mark.parametrize(("targets", "message"), REFUSED)
def test_the_event_refuses_no_target_several_and_a_span_without_its_trace(
    targets: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        FeedbackReceived(thumbs=Thumbs.up, **targets)
    [error] = refused.value.errors()
    assert error["msg"].startswith(f"Value error, {message}"), error["msg"]


@pytest.mark.parametrize(("targets", "message"), REFUSED)
def test_the_request_applies_the_same_rule_in_the_rules_own_words(targets: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        FeedbackCreate(thumbs=Thumbs.up, **targets)
    [error] = refused.value.errors()
    assert error["loc"] == () and error["msg"].startswith(f"Value error, {message}"), error


@pytest.mark.parametrize(("targets", "field", "message"), MALFORMED)
@pytest.mark.parametrize("model", [FeedbackCreate, FeedbackReceived])
def test_malformed_ids_are_refused_on_their_field(
    model: type[FeedbackCreate] | type[FeedbackReceived], targets: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        model(thumbs=Thumbs.up, **targets)
    [error] = refused.value.errors()
    assert error["loc"] == (field,) and message in error["msg"], error


@pytest.mark.parametrize(("targets", "target", "key"), ACCEPTED, ids=lambda value: str(value)[:20])
def test_the_door_publishes_the_target_it_was_given(targets: dict[str, Any], target: FeedbackTarget, key: str) -> None:
    event = feedback_event(FeedbackCreate(thumbs=Thumbs.down, **targets))
    assert event.target is target and event.partition_key() == key
    assert {name: getattr(event, name) for name in targets} == targets
    reviewed = feedback_event(FeedbackCreate(thumbs=Thumbs.down, source="reviewer", **targets))
    assert isinstance(reviewed, FeedbackReviewed) and reviewed.target is target


def test_a_row_names_its_target_and_an_empty_inference_id_when_it_is_not_an_inference() -> None:
    rows = feedback_rows(
        [
            wrap(FeedbackReceived(inference_id="chatcmpl-1", thumbs=Thumbs.up), producer="test"),
            wrap(FeedbackReceived(trace_id=TRACE, span_id=SPAN, thumbs=Thumbs.down), producer="test"),
            wrap(FeedbackReceived(session_id="conv-7", rating=4), producer="test"),
        ],
        Redactor(),
    ).to_pydict()
    assert [
        (rows["inference_id"][i], rows["trace_id"][i], rows["span_id"][i], rows["session_id"][i]) for i in range(3)
    ] == [("chatcmpl-1", None, None, None), ("", TRACE, SPAN, None), ("", None, None, "conv-7")]


@pytest.mark.parametrize("choice", [{"preferred_over": "chatcmpl-2"}, {"tied_with": "chatcmpl-2"}])
def test_the_sink_refuses_a_pairwise_choice_on_feedback_received_and_stores_it_from_a_review(
    choice: dict[str, str],
) -> None:
    with pytest.raises(ValidationError, match="or a pairwise choice"):
        UnreviewedFeedback(inference_id="chatcmpl-1", **choice)
    review = FeedbackReviewed(inference_id="chatcmpl-1", actor="alice", queue="versus", item_id="item-1", **choice)
    rows = feedback_rows([wrap(review, producer="feedback")], Redactor()).to_pydict()
    assert (rows["preferred_over"][0], rows["tied_with"][0]) == (
        choice.get("preferred_over"),
        choice.get("tied_with"),
    )
