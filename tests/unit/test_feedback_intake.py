"""Feedback intake rules: what is refused, with which message, before anything is published."""

from __future__ import annotations

import pytest

from contracts.events import Thumbs
from contracts.http import FeedbackCreate
from services.feedback.service import InvalidFeedback, feedback_event

pytestmark = pytest.mark.unit


def test_valid_feedback_becomes_an_event_with_its_own_id() -> None:
    event = feedback_event(FeedbackCreate(inference_id="chatcmpl-1", thumbs=Thumbs.down, tags=[" wrong-fact "]))
    assert event.inference_id == "chatcmpl-1" and event.tags == ["wrong-fact"] and event.feedback_id


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"inference_id": "has space", "thumbs": "up"}, "inference_id", "malformed"),
        ({"inference_id": "-leading-dash", "thumbs": "up"}, "inference_id", "malformed"),
        ({"inference_id": "chatcmpl-1"}, "body", "empty feedback"),
        ({"inference_id": "chatcmpl-1", "tags": ["  "]}, "tags", "1 to 64 characters"),
        ({"inference_id": "chatcmpl-1", "tags": ["x" * 65]}, "tags", "1 to 64 characters"),
    ],
)
def test_refused(fields: dict, param: str, message: str) -> None:
    with pytest.raises(InvalidFeedback, match=message) as refused:
        feedback_event(FeedbackCreate(**fields))
    assert refused.value.param == param
