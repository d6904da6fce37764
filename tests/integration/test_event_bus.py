"""Events through the real Kafka broker: typed round trips, dead letters, idempotence, commit order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faststream.kafka import KafkaBroker

from contracts.envelope import Envelope, wrap
from contracts.events import EVENTS, FeedbackReceived, InferenceLogged
from contracts.publisher import EventPublisher, KafkaSecurity
from contracts.topics import dlq_for, topic_for
from services.runtime.broker import EventBus, create_broker
from services.runtime.consumer import DeadLetters, SqliteProcessedEvents, subscribe
from services.runtime.settings import FlywheelSettings
from contracts.examples import example_events
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def consumer_broker(
    settings: FlywheelSettings, group: str, handlers: dict, store: Path, *, group_per_event: bool = False
) -> KafkaBroker:
    broker = create_broker(settings, client_id=group)
    processed = SqliteProcessedEvents(store)
    for event, handler in handlers.items():
        # Seventeen consumers joining one group one after another rebalance it seventeen times.
        subscriber_group = f"{group}.{event.event_type}" if group_per_event else group
        subscribe(
            broker,
            event,
            handler,
            group=subscriber_group,
            processed=processed,
            dead_letters=DeadLetters(broker),
            topic_prefix=settings.topic_prefix,
            max_retries=settings.consumer_max_retries,
            backoff_s=0.01,
        )
    return broker


async def read_all(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0, security: KafkaSecurity | None = None
) -> list:
    """Records of `topic` from its beginning, until `expected` arrived or `timeout_s` passed."""
    options = security.client_options() if security is not None else {}
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        enable_auto_commit=False,
        **options,
    )
    await consumer.start()
    records: list = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(records) < expected and asyncio.get_running_loop().time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def collector(into: list) -> Callable[[Envelope], Awaitable[None]]:
    async def handle(envelope: Envelope) -> None:
        into.append(envelope)

    return handle


async def test_every_contract_event_round_trips_through_kafka(
    settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    received: dict[str, list[Envelope]] = {event.event_type: [] for event in EVENTS}
    broker = consumer_broker(
        settings,
        "roundtrip",
        {event: collector(received[event.event_type]) for event in EVENTS},
        tmp_path / "processed.db",
        group_per_event=True,
    )
    sent = []
    async with broker:
        await broker.start()
        bus = EventBus(broker, producer="test", topic_prefix=topics)
        for event, payload in example_events().items():
            sent.append(await bus.publish(payload, correlation_id=f"corr-{event.event_type}"))
        await eventually(lambda: all(received.values()), what="one event of every type")
    for envelope in sent:
        got = received[envelope.event_type]
        assert got == [envelope], f"{envelope.event_type}: sent {envelope!r}, got {got!r}"
        assert type(got[0].payload) is type(envelope.payload)


async def test_the_app_publisher_delivers_inference_and_feedback(
    settings: FlywheelSettings, topics: str, kafka_bootstrap: str
) -> None:
    async with EventPublisher(kafka_bootstrap, producer="support-bot", topic_prefix=topics) as publisher:
        inference = await publisher.publish(example_events()[InferenceLogged], correlation_id="req-1")
        feedback = await publisher.publish(example_events()[FeedbackReceived], correlation_id="req-1")
    for envelope in (inference, feedback):
        records = await read_all(kafka_bootstrap, topic_for(envelope.payload, topics), 1)
        assert len(records) == 1
        assert records[0].key == envelope.payload.partition_key().encode()
        assert Envelope[type(envelope.payload)].model_validate_json(records[0].value) == envelope


async def test_poison_messages_go_to_the_dlq_with_the_reason_and_the_consumer_goes_on(
    settings: FlywheelSettings, topics: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    handled: list[str] = []

    async def handle(envelope: Envelope[InferenceLogged]) -> None:
        if envelope.payload.inference_id == "always-fails":
            raise RuntimeError("downstream refused the row")
        handled.append(envelope.payload.inference_id)

    topic = topic_for(InferenceLogged, topics)
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await raw.start()
    try:
        # Everything on one key, so one partition, so the order below is the consumption order.
        await raw.send_and_wait(topic, b"{not json", key=b"k")
        wrong = wrap(example_events()[FeedbackReceived], producer="test").model_dump_json().encode()
        await raw.send_and_wait(topic, wrong, key=b"k")
        failing = wrap(InferenceLogged(inference_id="always-fails", model_name="m"), producer="test")
        await raw.send_and_wait(topic, failing.model_dump_json().encode(), key=b"k")
        valid = wrap(InferenceLogged(inference_id="valid-after-poison", model_name="m"), producer="test")
        await raw.send_and_wait(topic, valid.model_dump_json().encode(), key=b"k")
    finally:
        await raw.stop()

    broker = consumer_broker(settings, "sink-test", {InferenceLogged: handle}, tmp_path / "processed.db")
    async with broker:
        await broker.start()
        await eventually(lambda: handled == ["valid-after-poison"], what="the valid message after three poison ones")

    dead = await read_all(kafka_bootstrap, dlq_for(topic), 3)
    assert len(dead) == 3
    reasons = [dict((name, value.decode()) for name, value in record.headers) for record in dead]
    # A dead letter keeps no raw personal data: the end user's actor id is redacted, the rest is byte for byte what was sent.
    assert [record.value for record in dead] == [
        b"{not json",
        wrong.replace(b'"actor":"user-7"', b'"actor":"[USER]"'),
        failing.model_dump_json().encode(),
    ]
    assert reasons[0]["x-flywheel-error"].startswith("invalid event: message: Invalid JSON")
    assert "event_type" in reasons[1]["x-flywheel-error"] or "payload" in reasons[1]["x-flywheel-error"]
    assert reasons[2]["x-flywheel-error"] == "RuntimeError: downstream refused the row"
    assert reasons[2]["x-flywheel-attempts"] == str(settings.consumer_max_retries + 1)
    assert all(
        reason["x-flywheel-original-topic"] == topic and reason["x-flywheel-consumer-group"] == "sink-test"
        for reason in reasons
    )


async def test_a_redelivered_event_is_handled_once(settings: FlywheelSettings, topics: str, tmp_path: Path) -> None:
    handled: list[str] = []
    store = tmp_path / "processed.db"
    envelope = wrap(InferenceLogged(inference_id=str(uuid.uuid4()), model_name="m"), producer="test")
    broker = consumer_broker(settings, "dedupe", {InferenceLogged: collector(handled)}, store)
    async with broker:
        await broker.start()
        bus = EventBus(broker, producer="test", topic_prefix=topics)
        await bus.publish_envelope(envelope)
        await bus.publish_envelope(envelope)
        marker = await bus.publish(InferenceLogged(inference_id=envelope.payload.inference_id, model_name="m"))
        await eventually(lambda: len(handled) == 2, what="the first copy and the marker")
        await asyncio.sleep(1.0)
    assert [item.event_id for item in handled] == [envelope.event_id, marker.event_id]


async def test_offsets_are_committed_only_after_the_handler_finishes(
    settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    started = asyncio.Event()

    async def never_finishes(envelope: Envelope) -> None:
        started.set()
        await asyncio.sleep(3600)

    envelope = wrap(InferenceLogged(inference_id="in-flight", model_name="m"), producer="test")
    broker = consumer_broker(settings, "commit-order", {InferenceLogged: never_finishes}, tmp_path / "first.db")
    async with broker:
        await broker.start()
        await EventBus(broker, producer="test", topic_prefix=topics).publish_envelope(envelope)
        await asyncio.wait_for(started.wait(), 60)
    # The first consumer died mid-handler: a successor in the same group must get the event again.
    handled: list[Envelope] = []
    successor = consumer_broker(settings, "commit-order", {InferenceLogged: collector(handled)}, tmp_path / "second.db")
    async with successor:
        await successor.start()
        await eventually(lambda: len(handled) == 1, what="redelivery to the successor")
    assert handled[0].event_id == envelope.event_id
