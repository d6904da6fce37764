"""The feedback sink on the real broker and embedded ClickHouse: every event stored once, also when
redelivered or republished, feedback joining its inference whenever that lands, poison to the DLQ."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from contracts.envelope import wrap
from contracts.events import FeedbackReceived, InferenceLogged, Thumbs
from contracts.topics import dlq_for, topic_for
from services.feedback.handlers import BATCH_HANDLERS
from services.runtime.privacy import Redactor
from services.feedback.service import Sink
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.broker import EventBus, create_broker
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.consumer import DeadLetters
from services.runtime.service import subscribe_batches
from services.runtime.settings import FlywheelSettings
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.support import eventually as shared_eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SINK_SETTINGS = FeedbackSettings(batch_max_records=500, batch_max_wait_ms=100, batch_min_bytes=1)


# ClickHouse polls are heavier than Kafka ones: a longer wait, polled less often.
eventually = partial(shared_eventually, timeout_s=90.0, interval_s=0.1)


@pytest.fixture
def clickhouse(chdb_target: ClickHouseTarget) -> ClickHouseStore:
    store = chdb_target.open()
    store.migrate()
    return store


@asynccontextmanager
async def running_sink(
    settings: FlywheelSettings, clickhouse: ClickHouseStore, *, group: str = "feedback"
) -> AsyncIterator[EventBus]:
    """A started broker with the sink subscribed as `group`; yields a bus to publish on."""
    broker = create_broker(settings, client_id=f"sink-{group}")
    sink = Sink(FeedbackStore(lambda: clickhouse), Redactor())
    subscribe_batches(
        broker,
        BATCH_HANDLERS,
        sink,
        group=group,
        dead_letters=DeadLetters(broker),
        topic_prefix=settings.topic_prefix,
        max_retries=1,
        **SINK_SETTINGS.batch_options(),
    )
    async with broker:
        await broker.start()
        yield EventBus(broker, producer="test", topic_prefix=settings.topic_prefix)


def counts(clickhouse: ClickHouseStore, table: str) -> tuple[int, int]:
    row = clickhouse.query(f"SELECT count() AS rows, uniqExact(event_id) AS events FROM {table}")[0]
    return int(row["rows"]), int(row["events"])


def inference(i: int, **fields) -> InferenceLogged:
    return InferenceLogged(
        inference_id=f"inf-{i}",
        model_name="smollm2",
        prompt_tokens=10,
        completion_tokens=5,
        latency_total_ms=float(i),
        **fields,
    )


async def test_every_event_is_stored_once_and_publishing_again_adds_nothing(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:
    # Odd calls carry the model's confidence (values exact in Float32), even ones none, as a cache replay.
    confident = {"mean_token_logprob": -0.5, "min_token_logprob": -1.25}
    inferences = [wrap(inference(i, **(confident if i % 2 else {})), producer="serving") for i in range(400)]
    feedback = [
        wrap(
            FeedbackReceived(inference_id=f"inf-{i}", thumbs=Thumbs.down if i % 2 else Thumbs.up, rating=1 + i % 5),
            producer="feedback",
        )
        for i in range(0, 400, 8)
    ]
    async with running_sink(settings, clickhouse) as bus:
        await asyncio.gather(*(bus.publish_envelope(envelope) for envelope in inferences + feedback))
        await eventually(
            lambda: counts(clickhouse, "inference_log")[0] >= 400 and counts(clickhouse, "feedback")[0] >= 50,
            what="every event stored",
        )
        # The same envelopes again, as an app retrying its publish would send them.
        await asyncio.gather(*(bus.publish_envelope(envelope) for envelope in inferences[:100] + feedback[:10]))
        marker = await bus.publish(inference(10_000))
        await eventually(
            lambda: (
                clickhouse.query(
                    "SELECT count() AS n FROM inference_log WHERE toString(event_id) = {marker:String}",
                    {"marker": str(marker.event_id)},
                )[0]["n"]
                == 1
            ),
            what="the marker behind the copies",
        )
    assert counts(clickhouse, "inference_log") == (401, 401)
    assert counts(clickhouse, "feedback") == (50, 50)
    stored = clickhouse.query(
        "SELECT inference_id, mean_token_logprob, min_token_logprob FROM inference_log"
        " WHERE inference_id IN ('inf-1', 'inf-2') ORDER BY inference_id"
    )
    assert [(row["inference_id"], row["mean_token_logprob"], row["min_token_logprob"]) for row in stored] == [
        ("inf-1", -0.5, -1.25),
        ("inf-2", None, None),
    ]


async def test_a_successor_reading_stored_but_uncommitted_events_stores_none_again(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:
    envelopes = [wrap(inference(i), producer="serving") for i in range(300)]
    async with running_sink(settings, clickhouse, group="feedback") as bus:
        await asyncio.gather(*(bus.publish_envelope(envelope) for envelope in envelopes[:200]))
        await eventually(lambda: counts(clickhouse, "inference_log")[0] >= 200, what="the first 200 stored")
    # A group with no committed offset reads everything from the start: exactly what a sink restarted
    # after storing a batch but before committing it sees, for every batch at once.
    async with running_sink(settings, clickhouse, group="feedback-successor") as bus:
        await asyncio.gather(*(bus.publish_envelope(envelope) for envelope in envelopes[200:]))
        await eventually(lambda: counts(clickhouse, "inference_log")[0] >= 300, what="the last 100 stored")
        await asyncio.sleep(1.0)
    # And the original group, restarted, resumes from its commits.
    async with running_sink(settings, clickhouse, group="feedback"):
        await asyncio.sleep(3.0)
    assert counts(clickhouse, "inference_log") == (300, 300)


async def test_feedback_before_its_inference_is_kept_and_joins_when_the_inference_lands(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:
    inference_id = f"late-{uuid.uuid4().hex[:8]}"
    async with running_sink(settings, clickhouse) as bus:
        early = await bus.publish(
            FeedbackReceived(inference_id=inference_id, thumbs=Thumbs.down, comment="wrong, mail me at ann@example.org")
        )
        await eventually(lambda: counts(clickhouse, "feedback")[0] == 1, what="the early feedback stored")
        waiting = clickhouse.query("SELECT feedback_id FROM feedback_awaiting_inference")
        assert waiting == [{"feedback_id": early.payload.feedback_id}]
        joined = clickhouse.query("SELECT inference_stored, comment FROM feedback_with_inference")
        assert joined == [{"inference_stored": 0, "comment": "wrong, mail me at [EMAIL]"}]

        await bus.publish(
            InferenceLogged(inference_id=inference_id, model_name="smollm2", adapter_version=2, output_text="answer")
        )
        await eventually(lambda: counts(clickhouse, "inference_log")[0] == 1, what="the inference stored")
    assert clickhouse.query("SELECT feedback_id FROM feedback_awaiting_inference") == []
    assert clickhouse.query("SELECT inference_stored, adapter_version, output_text FROM feedback_with_inference") == [
        {"inference_stored": 1, "adapter_version": 2, "output_text": "answer"}
    ]
    metrics = clickhouse.query(
        "SELECT requests, feedback_coverage, thumbs_down_rate FROM inference_metrics(bucket_s = 3600)"
    )
    assert metrics == [{"requests": 1, "feedback_coverage": 1.0, "thumbs_down_rate": 1.0}]


async def test_malformed_events_go_to_the_dlq_and_the_valid_ones_around_them_are_stored(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore, kafka_bootstrap: str
) -> None:
    topic = topic_for(InferenceLogged, topics)
    valid = [wrap(inference(i), producer="serving") for i in range(3)]
    wrong_type = wrap(FeedbackReceived(inference_id="x", thumbs=Thumbs.up), producer="test").model_dump_json().encode()
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await raw.start()
    try:
        await raw.send_and_wait(topic, valid[0].model_dump_json().encode(), key=b"k")
        await raw.send_and_wait(topic, b"{not json", key=b"k")
        await raw.send_and_wait(topic, wrong_type, key=b"k")
        await raw.send_and_wait(topic, b'{"event_type": "inference.logged"}', key=b"k")
        for envelope in valid[1:]:
            await raw.send_and_wait(topic, envelope.model_dump_json().encode(), key=b"k")
    finally:
        await raw.stop()
    async with running_sink(settings, clickhouse):
        await eventually(lambda: counts(clickhouse, "inference_log")[0] == 3, what="the three valid events")
    assert counts(clickhouse, "inference_log") == (3, 3)

    consumer = AIOKafkaConsumer(
        dlq_for(topic), bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        dead = [record async for record in _take(consumer, 3)]
    finally:
        await consumer.stop()
    assert [record.value for record in dead] == [b"{not json", wrong_type, b'{"event_type": "inference.logged"}']
    reasons = [dict((name, value.decode()) for name, value in record.headers)["x-flywheel-error"] for record in dead]
    assert reasons[0].startswith("invalid event: message: Invalid JSON")
    assert all(reason.startswith("invalid event:") for reason in reasons)


async def _take(consumer: AIOKafkaConsumer, n: int) -> AsyncIterator:
    for _ in range(n):
        yield await asyncio.wait_for(consumer.getone(), 30)


async def test_personal_data_is_scrubbed_before_storage(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:
    async with running_sink(settings, clickhouse) as bus:
        await bus.publish(
            InferenceLogged(
                inference_id="pii-1",
                model_name="smollm2",
                input_messages=[{"role": "user", "content": "I am bob@acme.io, card 4242 4242 4242 4242"}],
                input_text="I am bob@acme.io, card 4242 4242 4242 4242",
                output_text="I will call you at +1 415 555 0100 from 10.0.0.7",
            )
        )
        await bus.publish(
            FeedbackReceived(
                inference_id="pii-1", correction="Reply to bob@acme.io instead", comment="my IP is 2001:db8::1"
            )
        )
        await eventually(
            lambda: counts(clickhouse, "inference_log")[0] == 1 and counts(clickhouse, "feedback")[0] == 1,
            what="both stored",
        )
    row = clickhouse.query("SELECT input_messages, input_text, output_text FROM inference_log")[0]
    assert row == {
        "input_messages": '[{"role": "user", "content": "I am [EMAIL], card [CARD]"}]',
        "input_text": "I am [EMAIL], card [CARD]",
        "output_text": "I will call you at [PHONE] from [IPV4]",
    }
    assert clickhouse.query("SELECT comment, correction FROM feedback") == [
        {"comment": "my IP is [IPV6]", "correction": "Reply to [EMAIL] instead"}
    ]
