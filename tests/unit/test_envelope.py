from __future__ import annotations

import pytest
from pydantic import ValidationError

from contracts.envelope import Envelope, wrap
from contracts.events import EVENTS, DatasetRef, FeedbackReceived, Hyperparameters, InferenceLogged
from contracts.topics import all_topics, dlq_for, topic_for
from contracts.examples import example_events

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: event.event_type)
def test_every_event_round_trips_through_json(event) -> None:
    payload = example_events()[event]
    envelope = wrap(payload, producer="test", correlation_id="corr-1")
    decoded = Envelope[event].model_validate_json(envelope.model_dump_json())
    assert decoded == envelope
    assert decoded.event_type == event.event_type
    assert decoded.payload.partition_key() == str(getattr(payload, event.key_field))


def test_envelope_refuses_a_payload_of_another_type() -> None:
    feedback = wrap(example_events()[FeedbackReceived], producer="test")
    with pytest.raises(ValidationError):
        Envelope[InferenceLogged].model_validate_json(feedback.model_dump_json())


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    envelope = wrap(example_events()[InferenceLogged], producer="test")
    data = envelope.model_dump(mode="json")
    data["payload"]["added_in_a_later_minor_version"] = 1
    data["added_to_the_envelope_later"] = "x"
    assert Envelope[InferenceLogged].model_validate(data) == envelope


def test_topics_and_dead_letter_topics() -> None:
    topics = all_topics("t1.")
    assert topic_for(InferenceLogged, "t1.") == "t1.inference.logged"
    assert topics["t1.inference.logged"] == 6
    assert topics[dlq_for("t1.inference.logged")] == 1
    assert len(topics) == 2 * len(EVENTS)
    with pytest.raises(KeyError, match="unknown event type"):
        topic_for("inference.logges")


def test_hyperparameters_out_of_range_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match="rank"):
        Hyperparameters(rank=0)
    with pytest.raises(ValidationError, match="learning_rate"):
        Hyperparameters(learning_rate=-1)


def test_a_dataset_version_beyond_what_the_databases_store_is_refused() -> None:
    # Found by schemathesis at full size: the trainer's door answered 500 when SQLite overflowed.
    assert DatasetRef(name="support", version=2**63 - 1).version == 2**63 - 1
    with pytest.raises(ValidationError, match="version"):
        DatasetRef(name="support", version=2**63)
