"""The runtime's consumers driven in memory by FastStream's TestKafkaBroker: the narrow handler tests the
issue asks for (capability tests keep the real broker, tests/integration and tests/faults).

What TestKafkaBroker exercises of the manual-ack subscribers, and what it cannot:
- it runs the real subscriber functions (decode, event-id dedupe, retries, dead letters to `<topic>.dlq`,
  batch splitting); `message.ack()` is called and returns, but there is no consumer group and no
  offset, so commit-after-the-side-effect, redelivery after a crash and the rebalance listener of the
  batch subscriber are not exercised here (tests/faults does, on the real broker);
- every publish is delivered at once, inside the publish call, to every subscriber of the topic; a batch
  is what one `publish_batch` call sends (aiokafka's fetch decides it on the real broker);
- it hands a batch subscriber a list of records where aiokafka hands a tuple, which the batch consumer
  accepts since this test (before, it took the list for one record and failed on every batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faststream.kafka import KafkaBroker, KafkaMessage, TestKafkaBroker

from contracts.envelope import Envelope, wrap
from contracts.events import InferenceLogged
from contracts.topics import dlq_for, topic_for
from services.runtime.consumer import DeadLetters, RetryLater, SqliteProcessedEvents, subscribe, subscribe_batch

pytestmark = pytest.mark.unit

TOPIC = topic_for(InferenceLogged)


def inference(inference_id: str) -> Envelope[InferenceLogged]:
    return wrap(InferenceLogged(inference_id=inference_id, model_name="m"), producer="test")


def encoded(envelope: Envelope[Any]) -> bytes:
    return envelope.model_dump_json().encode()


class DeadLetterInbox:
    """Subscribes to `<topic>.dlq` on the broker under test and keeps what arrives."""

    def __init__(self, broker: KafkaBroker, topic: str = TOPIC) -> None:
        self.letters: list[tuple[bytes, dict[str, Any]]] = []

        @broker.subscriber(dlq_for(topic), group_id="dlq-reader")
        async def receive(message: KafkaMessage) -> None:
            self.letters.append((message.body, dict(message.headers)))

    def headers(self, name: str) -> list[Any]:
        return [headers.get(name) for _, headers in self.letters]


@pytest.fixture
def processed(tmp_path: Path) -> Iterator[SqliteProcessedEvents]:
    store = SqliteProcessedEvents(tmp_path / "processed-events.db")
    yield store
    store.close()


async def test_a_redelivered_event_is_handled_once_and_remembered_for_its_group(
    processed: SqliteProcessedEvents,
) -> None:
    broker = KafkaBroker()
    handled: list[str] = []

    async def handle(envelope: Envelope[InferenceLogged]) -> None:
        handled.append(envelope.payload.inference_id)

    subscribe(
        broker, InferenceLogged, handle, group="g", processed=processed, dead_letters=DeadLetters(broker), backoff_s=0
    )
    first, second = inference("a"), inference("b")
    async with TestKafkaBroker(broker) as test_broker:
        for envelope in (first, second, first):  # the third is a redelivery of the first
            await test_broker.publish(encoded(envelope), TOPIC)

    assert handled == ["a", "b"]
    assert processed.seen("g", str(first.event_id)) and processed.seen("g", str(second.event_id))
    assert not processed.seen("another-group", str(first.event_id))


async def test_an_undecodable_record_and_a_handler_that_keeps_failing_are_dead_lettered_with_the_reason(
    processed: SqliteProcessedEvents,
) -> None:
    broker = KafkaBroker()
    inbox = DeadLetterInbox(broker)
    attempts: list[str] = []

    async def handle(envelope: Envelope[InferenceLogged]) -> None:
        attempts.append(envelope.payload.inference_id)
        if envelope.payload.inference_id == "poison":
            raise ValueError("cannot store this one")

    subscribe(
        broker,
        InferenceLogged,
        handle,
        group="g",
        processed=processed,
        dead_letters=DeadLetters(broker),
        max_retries=2,
        backoff_s=0,
    )
    poison, fine = inference("poison"), inference("fine")
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish(b"{not an envelope", TOPIC)
        await test_broker.publish(encoded(poison), TOPIC)
        await test_broker.publish(encoded(fine), TOPIC)

    assert attempts == ["poison"] * 3 + ["fine"]  # the first try and max_retries=2 more, then it moves on
    assert len(inbox.letters) == 2
    undecodable, failing = inbox.letters
    assert undecodable[0] == b"{not an envelope"
    assert undecodable[1]["x-flywheel-error"].startswith("invalid event: message:")
    assert undecodable[1]["x-flywheel-attempts"] == "0"
    assert failing[1]["x-flywheel-error"] == "ValueError: cannot store this one"
    assert failing[1]["x-flywheel-attempts"] == "3"
    assert failing[1]["x-flywheel-original-topic"] == TOPIC
    assert failing[1]["x-flywheel-consumer-group"] == "g"
    # A dead-lettered event is not remembered as processed: replayed from the DLQ, it is handled again.
    assert not processed.seen("g", str(poison.event_id))
    assert processed.seen("g", str(fine.event_id))


async def test_a_batch_that_keeps_failing_is_split_until_the_record_at_fault_is_dead_lettered_alone() -> None:
    broker = KafkaBroker()
    inbox = DeadLetterInbox(broker)
    stored: list[str] = []
    batches: list[list[str]] = []

    async def store(envelopes: list[Envelope[InferenceLogged]]) -> None:
        ids = [envelope.payload.inference_id for envelope in envelopes]
        batches.append(ids)
        if "poison" in ids:
            raise ValueError("a record the store refuses")
        stored.extend(ids)

    subscribe_batch(
        broker, InferenceLogged, store, group="sink", dead_letters=DeadLetters(broker), max_retries=1, backoff_s=0
    )
    ids = ["a", "b", "poison", "c"]
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish_batch(*(encoded(inference(inference_id)) for inference_id in ids), topic=TOPIC)

    assert batches[:2] == [ids, ids]  # the whole batch: tried, retried once
    assert sorted(stored) == ["a", "b", "c"]
    assert inbox.headers("x-flywheel-error") == ["ValueError: a record the store refuses"]
    assert [Envelope[InferenceLogged].model_validate_json(body).payload.inference_id for body, _ in inbox.letters] == [
        "poison"
    ]


async def test_a_batch_whose_store_is_unavailable_is_retried_until_it_answers_never_dead_lettered() -> None:
    broker = KafkaBroker()
    inbox = DeadLetterInbox(broker)
    calls: list[int] = []

    async def store(envelopes: list[Envelope[InferenceLogged]]) -> None:
        calls.append(len(envelopes))
        if len(calls) <= 4:  # more outages than max_retries: RetryLater does not count as a failure
            raise RetryLater("ClickHouse unavailable")

    subscribe_batch(
        broker, InferenceLogged, store, group="sink", dead_letters=DeadLetters(broker), max_retries=1, backoff_s=0
    )
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish_batch(encoded(inference("a")), encoded(inference("b")), topic=TOPIC)

    assert calls == [2] * 5
    assert inbox.letters == []
