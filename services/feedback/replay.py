"""Rebuild inference_log and feedback from the topics: Kafka is the source of truth.

feedback.received is read as the sink reads it (UnreviewedFeedback): a record claiming source reviewer
is not stored, counted as undecodable and its reason logged; reviewer rows come from feedback.reviewed.

A consumer with no group reads every partition from the earliest retained offset (or the first offset
at a timestamp) up to the end it saw when it started, and hands the events to the same sink: events
already stored are skipped by event id, so a replay into an existing store adds only what is missing,
and the feedback group's committed offsets are untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError

from contracts.envelope import Envelope, P
from contracts.events import FeedbackReviewed, InferenceLogged, SpanLogged
from contracts.publisher import PLAINTEXT, KafkaSecurity
from contracts.topics import topic_for
from services.feedback.models import UnreviewedFeedback
from services.feedback.service import Sink

log = logging.getLogger("flywheel.feedback.replay")


@dataclass
class ReplayCount:
    topic: str
    read: int = 0
    inserted: int = 0
    undecodable: int = 0


async def replay(
    bootstrap: str,
    sink: Sink,
    *,
    topic_prefix: str = "",
    from_ms: int | None = None,
    batch: int = 5000,
    security: KafkaSecurity = PLAINTEXT,
) -> list[ReplayCount]:
    """Replay the sink's three topics into ClickHouse; returns what was read and inserted per topic."""
    plan: Sequence[tuple[type, Callable[[Sequence[Envelope]], int]]] = (
        (InferenceLogged, sink.store_inferences),
        (UnreviewedFeedback, sink.store_feedback),
        (FeedbackReviewed, sink.store_feedback),
        (SpanLogged, sink.store_spans),
    )
    return [
        await _replay_topic(bootstrap, event, store, topic_prefix, from_ms, batch, security) for event, store in plan
    ]


async def _replay_topic(
    bootstrap: str,
    event: type[P],
    store: Callable[[Sequence[Envelope[P]]], int],
    prefix: str,
    from_ms: int | None,
    batch: int,
    security: KafkaSecurity,
) -> ReplayCount:
    topic = topic_for(event, prefix)
    count = ReplayCount(topic)
    envelope_type = Envelope[event]  # type: ignore[valid-type]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.client_options())
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [
        TopicPartition(topic, info["partition"])
        for entry in described
        if entry["error_code"] == 0
        for info in entry["partitions"]
    ]
    if not partitions:
        log.warning("topic %s does not exist: nothing to replay from it", topic)
        return count
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **security.client_options(),
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        end = await consumer.end_offsets(partitions)
        if from_ms is None:
            await consumer.seek_to_beginning(*partitions)
        else:
            starts = await consumer.offsets_for_times({tp: from_ms for tp in partitions})
            for tp in partitions:
                consumer.seek(tp, starts[tp].offset if starts.get(tp) else end[tp])
        while any([await consumer.position(tp) < end[tp] for tp in partitions]):
            envelopes = []
            for records in (await consumer.getmany(timeout_ms=1000, max_records=batch)).values():
                for record in records:
                    if record.offset >= end[TopicPartition(record.topic, record.partition)]:
                        continue
                    count.read += 1
                    try:
                        envelopes.append(envelope_type.model_validate_json(record.value or b""))
                    except ValidationError as error:
                        count.undecodable += 1
                        if count.undecodable == 1:  # one line per topic, not one per record
                            log.warning(
                                "%s: skipping records that are not valid %s, first at offset %d: %s",
                                topic,
                                event.event_type,
                                record.offset,
                                error.errors()[0]["msg"],
                            )
            if envelopes:
                count.inserted += await asyncio.to_thread(store, envelopes)
    finally:
        await consumer.stop()
    return count
