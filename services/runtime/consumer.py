"""The idempotent consumer every service subscribes through.

Per message: decode and validate the envelope (a poison message goes straight to `<topic>.dlq`),
skip it when its `event_id` was already processed by this consumer group, run the handler with
bounded retries and backoff, remember the event id, and only then commit the offset. When the
retries are spent the message goes to the dead-letter topic with the error in the headers and the
consumer moves on: a message that can never succeed must not block its partition. A dead letter keeps
no raw personal data: its value is scrubbed first (byte for byte the original when nothing is found).

FastStream's default Kafka ack policy commits before the handler runs (at-most-once) and has no
Kafka dead-letter support; hence manual acknowledgement here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage, KafkaRouter
from pydantic import ValidationError

from contracts.envelope import Envelope, P
from contracts.topics import dlq_for, topic_for
from services.runtime import failpoints
from services.runtime.metrics import CONSUMER_MESSAGES
from services.runtime.privacy import Redactor, dead_letter_redactor
from services.runtime.sqlite import Migration, SqliteDatabase
from services.runtime.stages import StageClock

log = logging.getLogger("flywheel.consumer")

Handler = Callable[[Envelope[P]], Awaitable[None]]


class ProcessedEvents(Protocol):
    """Durable memory of the event ids a consumer group has fully handled."""

    def seen(self, group: str, event_id: str) -> bool: ...

    def remember(self, group: str, event_id: str) -> None: ...


class SqliteProcessedEvents:
    """Processed event ids in a SQLite file, with a small in-memory cache in front.

    Services whose side effect lands in their own database should instead record the event id in
    the same transaction as the side effect (the registry does); this store serves the others,
    whose handlers are idempotent anyway, and narrows the redelivery window to a crash between the
    side effect and `remember`.
    """

    MIGRATIONS = (
        # The schema as it was before migrations were numbered (IF NOT EXISTS), so an existing file is adopted as it is.
        Migration(
            1,
            "processed_event",
            "CREATE TABLE IF NOT EXISTS processed_event (consumer_group TEXT, event_id TEXT, processed_at TEXT, PRIMARY KEY (consumer_group, event_id))",
        ),
    )

    def __init__(self, path: Path, cache_size: int = 10_000) -> None:
        self._db = SqliteDatabase(path, self.MIGRATIONS)
        self._cache: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._cache_size = cache_size

    def seen(self, group: str, event_id: str) -> bool:
        if (group, event_id) in self._cache:
            return True
        return (
            self._db.row("SELECT 1 FROM processed_event WHERE consumer_group = ? AND event_id = ?", (group, event_id))
            is not None
        )

    def remember(self, group: str, event_id: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO processed_event VALUES (?, ?, ?)", (group, event_id, datetime.now(UTC).isoformat())
        )
        self._cache[(group, event_id)] = None
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def close(self) -> None:
        self._db.close()


class DeadLetters:
    """Publishes poison messages to `<topic>.dlq` with the reason in the headers, scrubbed of personal
    data and secrets: a dead-letter topic is read by people and kept for as long as it takes to look.

    The value is scrubbed as text (JSON string by string); a value that is not UTF-8 cannot be searched,
    so none of it is kept: the dead letter carries only its sha256 and length. Every dead letter has
    `x-flywheel-value-sha256`, `x-flywheel-value-bytes` (of the original) and `x-flywheel-value` (clean,
    scrubbed or withheld), so it can still be matched against the original record in the source topic.
    """

    def __init__(self, broker: KafkaBroker, redactor: Redactor | None = None) -> None:
        self._broker = broker
        self._redactor = redactor or dead_letter_redactor()

    async def send(
        self, message: KafkaMessage, *, group: str, error: BaseException, attempts: int, reason: str | None = None
    ) -> None:
        await self.send_record(message.raw_message, group=group, error=error, attempts=attempts, reason=reason)

    async def send_record(
        self, record: ConsumerRecord, *, group: str, error: BaseException, attempts: int, reason: str | None = None
    ) -> None:
        reason = self._redactor.scrub(reason or f"{type(error).__name__}: {error}") or ""
        original = record.value or b""
        value, treatment = self._redactor.scrub_bytes(original)
        headers = {
            "x-flywheel-error": reason[:4000],
            "x-flywheel-error-type": type(error).__name__,
            "x-flywheel-original-topic": record.topic,
            "x-flywheel-original-partition": str(record.partition),
            "x-flywheel-original-offset": str(record.offset),
            "x-flywheel-consumer-group": group,
            "x-flywheel-attempts": str(attempts),
            "x-flywheel-failed-at": datetime.now(UTC).isoformat(),
            "x-flywheel-value": treatment,
            "x-flywheel-value-sha256": hashlib.sha256(original).hexdigest(),
            "x-flywheel-value-bytes": str(len(original)),
        }
        for name, header in record.headers or ():
            headers.setdefault(
                f"x-flywheel-original-header-{name}", self._redactor.scrub(header.decode(errors="replace")) or ""
            )
        delay = 0.5
        while True:
            try:
                await self._broker.publish(value, dlq_for(record.topic), key=record.key, headers=headers)
                break
            except Exception as publish_error:  # noqa: BLE001 - the offset must not move past an unsaved message
                log.warning(
                    "dead-letter publish to %s failed (%s); retrying in %.1fs",
                    dlq_for(record.topic),
                    publish_error,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        log.warning("dead-lettered %s[%s]@%s: %s", record.topic, record.partition, record.offset, reason)


def subscribe(
    router: KafkaRouter | KafkaBroker,
    event: type[P],
    handler: Handler[P],
    *,
    group: str,
    processed: ProcessedEvents,
    dead_letters: DeadLetters,
    topic_prefix: str = "",
    max_retries: int = 3,
    backoff_s: float = 0.2,
) -> Any:
    """Subscribe `handler` to `event`'s topic as consumer group `group`, idempotently, with a DLQ."""
    topic = topic_for(event, topic_prefix)
    envelope_type = Envelope[event]  # type: ignore[valid-type]

    async def consume(message: KafkaMessage) -> None:
        outcome = await _handle(message)
        # Reached only when the message is settled (handled, duplicate or dead-lettered); a
        # cancellation on shutdown leaves it uncommitted, to be redelivered.
        await message.ack()
        CONSUMER_MESSAGES.labels(group=group, event_type=event.event_type, outcome=outcome).inc()

    async def _handle(message: KafkaMessage) -> str:
        try:
            envelope = envelope_type.model_validate_json(message.body)
        except ValidationError as error:
            await dead_letters.send(message, group=group, error=error, attempts=0, reason=_validation_summary(error))
            return "dead_lettered"
        event_id = str(envelope.event_id)
        if processed.seen(group, event_id):
            return "duplicate"
        failure = await _with_retries(handler, envelope, max_retries, backoff_s)
        if failure is not None:
            await dead_letters.send(message, group=group, error=failure, attempts=max_retries + 1)
            return "dead_lettered"
        processed.remember(group, event_id)
        return "processed"

    consume.__name__ = f"{group}__{event.event_type.replace('.', '_')}"
    return router.subscriber(
        topic,
        group_id=group,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset="earliest",
        title=f"{group}:{topic}",
        description=f"{group} consumes {event.event_type}",
    )(consume)


async def _with_retries(
    handler: Handler[P], envelope: Envelope[P], max_retries: int, backoff_s: float
) -> Exception | None:
    """Run `handler`, retrying failures with exponential backoff; the last error once retries are spent, else None."""
    for attempt in range(1, max_retries + 2):
        try:
            await handler(envelope)
            return None
        except Exception as error:  # noqa: BLE001 - any handler failure is retried; the caller decides what follows
            if attempt > max_retries:
                return error
            log.info(
                "retrying %s after %s (attempt %d of %d)",
                envelope.event_type,
                type(error).__name__,
                attempt,
                max_retries + 1,
            )
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
    return None


def follow(
    router: KafkaRouter | KafkaBroker,
    event: type[P],
    handler: Handler[P],
    *,
    name: str,
    from_start: bool,
    topic_prefix: str = "",
    max_retries: int = 3,
    backoff_s: float = 0.2,
) -> Any:
    """Every instance reads `event`'s topic in full, outside any consumer group: a broadcast.

    For state every replica must hold (serving's routes, built from the registry's events), where a
    consumer group would hand each event to one replica only, and a restarted replica would resume
    after what its memory lost. With `from_start` the topic is replayed from its first record at every
    start (the registry's state topics are kept forever: `retention_ms`); without it only what arrives
    from now on is read (commands such as deployment.requested, which must not be replayed). The
    handler must be idempotent: a replay applies each event again. Nothing is committed and nothing is
    dead-lettered (a dead letter per replay would repeat at every start); a record that cannot be
    decoded, or whose handler keeps failing, is logged and skipped.
    """
    topic = topic_for(event, topic_prefix)
    envelope_type = Envelope[event]  # type: ignore[valid-type]

    async def consume(message: KafkaMessage) -> None:
        try:
            envelope = envelope_type.model_validate_json(message.body)
        except ValidationError as error:
            log.warning("%s skipped an undecodable %s record: %s", name, event.event_type, _validation_summary(error))
            CONSUMER_MESSAGES.labels(group=name, event_type=event.event_type, outcome="skipped").inc()
            return
        failure = await _with_retries(handler, envelope, max_retries, backoff_s)
        if failure is not None:  # a follower has no dead-letter topic: logged and skipped
            log.error(
                "%s skipped %s %s after %d attempts: %s: %s",
                name,
                event.event_type,
                envelope.event_id,
                max_retries + 1,
                type(failure).__name__,
                failure,
            )
            CONSUMER_MESSAGES.labels(group=name, event_type=event.event_type, outcome="skipped").inc()
            return
        CONSUMER_MESSAGES.labels(group=name, event_type=event.event_type, outcome="processed").inc()

    consume.__name__ = f"{name}__follow__{event.event_type.replace('.', '_')}"
    return router.subscriber(
        topic,
        group_id=None,
        ack_policy=AckPolicy.ACK_FIRST,
        auto_offset_reset="earliest" if from_start else "latest",
        title=f"{name}:{topic} (follower)",
        description=f"every {name} instance reads {event.event_type}" + (" from the start" if from_start else ""),
    )(consume)


BatchHandler = Callable[[list[Envelope[P]]], Awaitable[None]]


class RetryLater(Exception):
    """Raised by a batch handler whose downstream store is unavailable: the batch is retried until it
    returns (backoff capped), never dead-lettered, because the records are not at fault."""


def subscribe_batch(
    router: KafkaRouter | KafkaBroker,
    event: type[P],
    handler: BatchHandler[P],
    *,
    group: str,
    dead_letters: DeadLetters,
    topic_prefix: str = "",
    max_retries: int = 3,
    backoff_s: float = 0.2,
    max_backoff_s: float = 30.0,
    max_records: int = 5000,
    max_wait_ms: int = 500,
    fetch_min_bytes: int = 1,
    revoke_wait_s: float = 30.0,
    clock: StageClock | None = None,
) -> Any:
    """Subscribe `handler` to batches of `event` as consumer group `group`, committing after each batch.

    A batch closes at `max_records`, or when the broker has waited `max_wait_ms` for
    `fetch_min_bytes`: Kafka's fetch is the buffer, so nothing consumed is held uncommitted between
    batches and a stop has nothing to flush but the batch in flight. The handler must be idempotent
    by event id: a batch stored but not committed before a crash is delivered again. Undecodable
    records go to the DLQ before the handler sees the batch; a batch that keeps failing is split
    in halves until the records at fault are alone, and those go to the DLQ. `clock` sums the time each
    batch spends decoding and committing; hand the handler's the same one for the whole split.
    """
    topic = topic_for(event, topic_prefix)
    envelope_type = Envelope[event]  # type: ignore[valid-type]
    in_flight = asyncio.Lock()
    failpoints.load()
    clock = clock or StageClock()

    class HoldRebalanceForBatch(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
            # The batch in flight is stored and committed before its partitions move: otherwise the
            # new owner could check for already-stored events before this insert lands, and store them again.
            try:
                await asyncio.wait_for(in_flight.acquire(), revoke_wait_s)
            except TimeoutError:
                log.warning("%s: a batch is still in flight after %.0fs; rebalancing anyway", group, revoke_wait_s)
                return
            in_flight.release()

        async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
            return None

    async def consume(message: KafkaMessage) -> None:
        async with in_flight:
            # aiokafka hands a batch as a tuple of records, FastStream's TestKafkaBroker as a list.
            records = (
                tuple(message.raw_message) if isinstance(message.raw_message, (tuple, list)) else (message.raw_message,)
            )
            pairs: list[tuple[ConsumerRecord, Envelope[P]]] = []
            poison: list[tuple[ConsumerRecord, ValidationError]] = []
            # pydantic-core parses and validates JSON in one pass: decoding apart would cost a second one.
            with clock.stage("decode+validate"):
                for record in records:
                    try:
                        pairs.append((record, envelope_type.model_validate_json(record.value or b"")))
                    except ValidationError as error:
                        poison.append((record, error))
            for record, invalid in poison:
                await dead_letters.send_record(
                    record, group=group, error=invalid, attempts=0, reason=_validation_summary(invalid)
                )
            dead = len(poison)
            if pairs:
                dead += await _settle(pairs, max_retries)
            failpoints.hit("consumer.batch.after_handler")
            try:
                with clock.stage("commit"):
                    await message.ack()
            except CommitFailedError:
                # The group rebalanced under us: the new owner re-reads this batch and the handler's
                # event-id check keeps it from being stored twice.
                log.warning("%s: commit after a batch of %d failed (group rebalanced)", group, len(records))
        CONSUMER_MESSAGES.labels(group=group, event_type=event.event_type, outcome="processed").inc(len(records) - dead)
        if dead:
            CONSUMER_MESSAGES.labels(group=group, event_type=event.event_type, outcome="dead_lettered").inc(dead)

    async def _settle(pairs: list[tuple[ConsumerRecord, Envelope[P]]], retries: int) -> int:
        """Run the handler until the batch is stored; returns how many records were dead-lettered."""
        attempt = 0
        unavailable_delay = backoff_s
        while True:
            try:
                await handler([envelope for _, envelope in pairs])
                return 0
            except RetryLater as error:
                log.warning("%s: %s; retrying a batch of %d in %.1fs", group, error, len(pairs), unavailable_delay)
                await asyncio.sleep(unavailable_delay)
                unavailable_delay = min(unavailable_delay * 2, max_backoff_s)
            except Exception as error:  # noqa: BLE001 - any failure is retried, then narrowed down to its records
                attempt += 1
                if attempt <= retries:
                    log.info(
                        "retrying a batch of %d %s after %s (attempt %d of %d)",
                        len(pairs),
                        event.event_type,
                        type(error).__name__,
                        attempt,
                        retries + 1,
                    )
                    await asyncio.sleep(min(backoff_s * 2 ** (attempt - 1), max_backoff_s))
                    continue
                if len(pairs) == 1:
                    await dead_letters.send_record(pairs[0][0], group=group, error=error, attempts=attempt)
                    return 1
                # Halves are tried once each: the retries above already ruled out a passing glitch.
                middle = len(pairs) // 2
                return await _settle(pairs[:middle], 0) + await _settle(pairs[middle:], 0)

    consume.__name__ = f"{group}__{event.event_type.replace('.', '_')}__batch"
    return router.subscriber(
        topic,
        batch=True,
        max_records=max_records,
        batch_timeout_ms=max_wait_ms,
        fetch_max_wait_ms=max_wait_ms,
        fetch_min_bytes=fetch_min_bytes,
        group_id=group,
        ack_policy=AckPolicy.MANUAL,
        auto_offset_reset="earliest",
        listener=HoldRebalanceForBatch(),
        title=f"{group}:{topic}:batch",
        description=f"{group} consumes {event.event_type} in batches",
    )(consume)


def _validation_summary(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ())) or "message"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"invalid event: {location}: {first.get('msg')}{more}"
