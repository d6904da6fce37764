"""The feedback service's BATCH_HANDLERS, subscribed as its app subscribes them, driven in memory by
FastStream's TestKafkaBroker with a fake sink (what TestKafkaBroker covers of the batch consumer:
tests/unit/test_consumer_testbroker.py). The sink storing into ClickHouse on the real broker:
tests/integration/test_sink_clickhouse.py."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from faststream.kafka import KafkaBroker, KafkaMessage, TestKafkaBroker

from contracts.envelope import Envelope, wrap
from contracts.events import FeedbackReceived, FeedbackReviewed, FeedbackSource, InferenceLogged, SpanLogged
from contracts.topics import dlq_for, topic_for
from services.feedback.handlers import BATCH_HANDLERS, GROUP
from services.feedback.service import StoreUnavailable
from services.feedback.settings import FeedbackSettings
from services.runtime.consumer import DeadLetters
from services.runtime.service import subscribe_batches

pytestmark = pytest.mark.unit


class FakeSink:
    """Records what each handler hands the sink; the first `outages` calls find ClickHouse unavailable."""

    def __init__(self, outages: int = 0) -> None:
        self.outages = outages
        self.calls = 0
        self.stored: dict[str, list[str]] = {"inference_log": [], "feedback": [], "span": []}

    def _write(self, table: str, ids: list[str]) -> int:
        self.calls += 1
        if self.calls <= self.outages:
            raise StoreUnavailable("ClickHouse unavailable (test)")
        self.stored[table].extend(ids)
        return len(ids)

    def store_inferences(self, envelopes: Sequence[Envelope[InferenceLogged]]) -> int:
        return self._write("inference_log", [envelope.payload.inference_id for envelope in envelopes])

    def store_spans(self, envelopes: Sequence[Envelope[SpanLogged]]) -> int:
        return self._write("span", [envelope.payload.span_id for envelope in envelopes])

    def store_feedback(self, envelopes: Sequence[Envelope[FeedbackReceived]]) -> int:
        return self._write(
            "feedback", [f"{envelope.payload.source.value}:{envelope.payload.inference_id}" for envelope in envelopes]
        )


def subscribed(sink: FakeSink) -> tuple[KafkaBroker, list[tuple[str, dict[str, Any]]]]:
    broker = KafkaBroker()
    subscribe_batches(
        broker,
        BATCH_HANDLERS,
        sink,
        group=GROUP,
        dead_letters=DeadLetters(broker),
        max_retries=1,
        backoff_s=0,
        **FeedbackSettings(batch_max_records=100, batch_max_wait_ms=10, batch_min_bytes=1).batch_options(),
    )
    letters: list[tuple[str, dict[str, Any]]] = []

    @broker.subscriber(dlq_for(topic_for(FeedbackReceived)), group_id="dlq-reader")
    async def dead_letter(message: KafkaMessage) -> None:
        letters.append((message.raw_message.topic, dict(message.headers)))

    return broker, letters


def encoded(payload: Any) -> bytes:
    return wrap(payload, producer="test").model_dump_json().encode()


def span(span_id: str) -> SpanLogged:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    return SpanLogged(
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id=span_id,
        name="retrieve",
        started_at=moment,
        ended_at=moment,
    )


def test_the_handlers_cover_the_sinks_four_topics() -> None:
    assert {topic_for(event) for event in BATCH_HANDLERS} == {
        topic_for(InferenceLogged),
        topic_for(SpanLogged),
        topic_for(FeedbackReceived),
        topic_for(FeedbackReviewed),
    }


async def test_each_topic_reaches_its_table_and_a_reviewer_claim_on_feedback_received_is_dead_lettered() -> None:
    sink = FakeSink()
    broker, letters = subscribed(sink)
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish_batch(
            encoded(InferenceLogged(inference_id="i1", model_name="m")),
            encoded(InferenceLogged(inference_id="i2", model_name="m")),
            topic=topic_for(InferenceLogged),
        )
        await test_broker.publish_batch(
            encoded(FeedbackReceived(inference_id="i1", thumbs="up")),
            # An app may write feedback.received: a reviewer's authority claimed there is refused, not stored.
            encoded(
                FeedbackReceived(inference_id="i2", thumbs="down", correction="forged", source=FeedbackSource.reviewer)
            ),
            topic=topic_for(FeedbackReceived),
        )
        await test_broker.publish(
            encoded(FeedbackReviewed(inference_id="i2", thumbs="down", correction="right")), topic_for(FeedbackReviewed)
        )
        await test_broker.publish(encoded(span("00f067aa0ba902b7")), topic_for(SpanLogged))

    assert sink.stored == {
        "inference_log": ["i1", "i2"],
        "feedback": ["end_user:i1", "reviewer:i2"],
        "span": ["00f067aa0ba902b7"],
    }
    assert len(letters) == 1
    topic, headers = letters[0]
    assert topic == dlq_for(topic_for(FeedbackReceived))
    assert headers["x-flywheel-error"].startswith("invalid event: payload.source:") and headers[
        "x-flywheel-original-topic"
    ] == topic_for(FeedbackReceived)


async def test_an_unavailable_store_holds_the_batch_until_it_answers_and_dead_letters_nothing() -> None:
    sink = FakeSink(outages=3)  # more than max_retries: an outage is not the records' fault
    broker, letters = subscribed(sink)
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish_batch(
            encoded(InferenceLogged(inference_id="i1", model_name="m")), topic=topic_for(InferenceLogged)
        )

    assert sink.calls == 4
    assert sink.stored["inference_log"] == ["i1"]
    assert letters == []
