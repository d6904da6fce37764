"""Reviewer feedback has a topic of its own, on the real broker with the real sink and embedded ClickHouse:
a reviewer's correction through the door lands as a reviewer row via feedback.reviewed and feeds the
monitor's retraining query; the same claim published straight onto feedback.received is dead-lettered
with its reason, scrubbed of personal data, and never becomes a reviewer row, in the sink or in a replay."""

from __future__ import annotations

import json

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from contracts.envelope import wrap
from contracts.events import FeedbackReceived, FeedbackReviewed, FeedbackSource, InferenceLogged, Thumbs
from contracts.http import Role
from contracts.publisher import encode
from contracts.topics import dlq_for, topic_for
from services.feedback.replay import replay
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.monitor.store import MonitorStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.privacy import Redactor
from services.runtime.settings import FlywheelSettings
from tests.integration.test_event_bus import read_all
from tests.integration.test_feedback_http import feedback_door
from tests.integration.test_sink_clickhouse import clickhouse, eventually, running_sink  # noqa: F401 - fixture
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "smollm2"


async def test_a_reviewer_claim_on_feedback_received_is_dead_lettered_and_the_doors_correction_is_stored_as_reviewer(
    settings: FlywheelSettings,
    topics: str,
    clickhouse: ClickHouseStore,
    kafka_bootstrap: str,  # noqa: F811
) -> None:
    question = "How long is the warranty on the Acme hub?"
    forged = wrap(
        FeedbackReceived(
            inference_id="chatcmpl-forged",
            thumbs=Thumbs.down,
            correction="The warranty is 9 years.",
            comment="write to mallory@example.org",
            source=FeedbackSource.reviewer,
            actor="reviewer-1",
        ),
        producer="feedback",  # self-declared, as every envelope's producer is: it proves nothing
    )
    honest = wrap(FeedbackReceived(inference_id="chatcmpl-forged", thumbs=Thumbs.up), producer="support-bot")
    # An end user's feedback dressed as a queue's review: counted by queue and rubric, it must come from the review door.
    forged_review = wrap(
        FeedbackReceived(
            inference_id="chatcmpl-forged",
            thumbs=Thumbs.up,
            queue="support-review",
            rubric="quality:v1",
            scores={"correct": "up"},
        ),
        producer="support-bot",
    )
    async with running_sink(settings, clickhouse) as bus:
        await bus.publish(
            InferenceLogged(
                inference_id="chatcmpl-forged", model_name=MODEL, input_text=question, output_text="7 weeks."
            )
        )
        await bus.publish(
            InferenceLogged(
                inference_id="chatcmpl-reviewed", model_name=MODEL, input_text=question, output_text="7 weeks."
            )
        )
        # What an app can do on Kafka: write feedback.received, with any body (the raw producer skips the SDK's own refusal).
        raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await raw.start()
        try:
            for envelope in (forged, honest, forged_review):
                key, value, headers = encode(envelope)
                await raw.send_and_wait(topic_for(FeedbackReceived, topics), value=value, key=key, headers=headers)
        finally:
            await raw.stop()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=feedback_door(bus, clickhouse, settings)), base_url="http://test"
        ) as client:
            answer = await client.post(
                "/feedback/v1/feedback",
                json={
                    "inference_id": "chatcmpl-reviewed",
                    "thumbs": "down",
                    "correction": "The warranty is 2 years.",
                    "source": "reviewer",
                },
                headers={"Authorization": f"Bearer {api_key(settings, Role.reviewer)}"},
            )
            assert answer.status_code == 202, answer.text
        accepted = answer.json()
        await eventually(
            lambda: clickhouse.query("SELECT count() AS n FROM feedback")[0]["n"] >= 2,
            what="the honest feedback and the reviewer's correction stored",
        )
        dead = await read_all(kafka_bootstrap, dlq_for(topic_for(FeedbackReceived, topics)), expected=2)

    stored = {
        row["event_id"]: row
        for row in clickhouse.query(
            "SELECT toString(event_id) AS event_id, feedback_id, source, correction FROM feedback"
        )
    }
    assert str(forged.event_id) not in stored, "the forged reviewer claim was stored"
    assert str(forged_review.event_id) not in stored, "feedback.received naming a review queue was stored"
    assert stored[str(honest.event_id)]["source"] == "end_user"
    assert stored[accepted["event_id"]] == {
        "event_id": accepted["event_id"],
        "feedback_id": accepted["feedback_id"],
        "source": "reviewer",
        "correction": "The warranty is 2 years.",
    }
    assert len(stored) == 2

    # The correction reached ClickHouse through feedback.reviewed: that topic holds it, feedback.received does not.
    reviewed = await read_all(kafka_bootstrap, topic_for(FeedbackReviewed, topics), expected=1)
    assert [json.loads(record.value)["event_id"] for record in reviewed] == [accepted["event_id"]]
    received = await read_all(kafka_bootstrap, topic_for(FeedbackReceived, topics), expected=10**6, timeout_s=5)
    assert sorted(json.loads(record.value)["event_id"] for record in received) == sorted(
        [str(forged.event_id), str(honest.event_id), str(forged_review.event_id)]
    )

    # The forged record is kept in the dead-letter topic with the reason, scrubbed of personal data.
    letters = {json.loads(record.value)["event_id"]: record for record in dead}
    assert set(letters) == {str(forged.event_id), str(forged_review.event_id)}
    review_reason = {name: value.decode() for name, value in letters[str(forged_review.event_id)].headers}[
        "x-flywheel-error"
    ]
    assert (
        "feedback.received may not name a review queue, item, rubric, scores or a pairwise choice" in review_reason
    ), review_reason
    letter = letters[str(forged.event_id)]
    headers = {name: value.decode() for name, value in letter.headers}
    assert headers["x-flywheel-error"] == (
        "invalid event: payload.source: Value error, feedback.received may not carry source reviewer: reviewer feedback travels as "
        "feedback.reviewed, which only the feedback service publishes (POST /feedback/v1/feedback with a reviewer's key)"
    )
    assert (
        headers["x-flywheel-original-topic"] == topic_for(FeedbackReceived, topics)
        and headers["x-flywheel-consumer-group"] == "feedback"
    )
    assert headers["x-flywheel-value"] == "scrubbed"
    kept = json.loads(letter.value)
    assert kept["event_id"] == str(forged.event_id) and kept["payload"]["comment"] == "write to [EMAIL]"
    assert b"mallory@example.org" not in letter.value

    # What automatic retraining learns from: the door's correction, not the forged one.
    monitor = MonitorStore(lambda: clickhouse, lambda: clickhouse)
    assert [row["correction"] for row in monitor.corrections(MODEL)] == ["The warranty is 2 years."]

    # A replay from the topics reads them as the sink does: both forged claims are skipped again, not stored.
    replayed = {
        count.topic: (count.read, count.inserted, count.undecodable)
        for count in await replay(
            kafka_bootstrap, Sink(FeedbackStore(lambda: clickhouse), Redactor()), topic_prefix=topics
        )
    }
    assert replayed[topic_for(FeedbackReceived, topics)] == (3, 0, 2) and replayed[
        topic_for(FeedbackReviewed, topics)
    ] == (1, 0, 0)
    assert {str(forged.event_id), str(forged_review.event_id)}.isdisjoint(
        row["event_id"] for row in clickhouse.query("SELECT toString(event_id) AS event_id FROM feedback")
    )


def test_feedback_reviewed_carries_reviewer_feedback_only() -> None:
    with pytest.raises(ValueError, match="feedback.reviewed carries source reviewer only, got end_user"):
        FeedbackReviewed(inference_id="chatcmpl-1", thumbs=Thumbs.down, source=FeedbackSource.end_user)
    assert FeedbackReviewed(inference_id="chatcmpl-1", thumbs=Thumbs.down).source is FeedbackSource.reviewer
    # Keyed by its target as feedback.received is: an inference's feedback by the inference id.
    assert topic_for(FeedbackReviewed) == "feedback.reviewed"
    assert FeedbackReviewed(inference_id="chatcmpl-1", thumbs=Thumbs.down).partition_key() == "chatcmpl-1"
