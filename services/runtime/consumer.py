"""The idempotent consumer every service subscribes through.

Per message: decode and validate the envelope (a poison message goes straight to `<topic>.dlq`),
skip it when its `event_id` was already processed by this consumer group, run the handler with
bounded retries and backoff, remember the event id, and only then commit the offset. When the
retries are spent the original bytes go to the dead-letter topic with the error in the headers and
the consumer moves on: a message that can never succeed must not block its partition.

FastStream's default Kafka ack policy commits before the handler runs (at-most-once) and has no
Kafka dead-letter support; hence manual acknowledgement here.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage, KafkaRouter
from pydantic import ValidationError

from contracts.envelope import Envelope, P
from contracts.topics import dlq_for, topic_for
from services.runtime.metrics import CONSUMER_MESSAGES

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

    def __init__(self, path: Path, cache_size: int = 10_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS processed_event (consumer_group TEXT, event_id TEXT, processed_at TEXT, PRIMARY KEY (consumer_group, event_id))")
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._cache_size = cache_size

    def seen(self, group: str, event_id: str) -> bool:
        if (group, event_id) in self._cache:
            return True
        with self._lock:
            row = self._db.execute("SELECT 1 FROM processed_event WHERE consumer_group = ? AND event_id = ?", (group, event_id)).fetchone()
        return row is not None

    def remember(self, group: str, event_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO processed_event VALUES (?, ?, ?)", (group, event_id, datetime.now(UTC).isoformat())
            )
        self._cache[(group, event_id)] = None
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def close(self) -> None:
        self._db.close()


class DeadLetters:
    """Publishes poison messages, untouched, to `<topic>.dlq` with the reason in the headers."""

    def __init__(self, broker: KafkaBroker) -> None:
        self._broker = broker

    async def send(self, message: KafkaMessage, *, group: str, error: BaseException, attempts: int, reason: str | None = None) -> None:
        record = message.raw_message
        reason = reason or f"{type(error).__name__}: {error}"
        headers = {
            "x-flywheel-error": reason[:4000],
            "x-flywheel-error-type": type(error).__name__,
            "x-flywheel-original-topic": record.topic,
            "x-flywheel-original-partition": str(record.partition),
            "x-flywheel-original-offset": str(record.offset),
            "x-flywheel-consumer-group": group,
            "x-flywheel-attempts": str(attempts),
            "x-flywheel-failed-at": datetime.now(UTC).isoformat(),
        }
        for name, value in record.headers or ():
            headers.setdefault(f"x-flywheel-original-header-{name}", value.decode(errors="replace"))
        delay = 0.5
        while True:
            try:
                await self._broker.publish(record.value or b"", dlq_for(record.topic), key=record.key, headers=headers)
                break
            except Exception as publish_error:  # noqa: BLE001 - the offset must not move past an unsaved message
                log.warning("dead-letter publish to %s failed (%s); retrying in %.1fs", dlq_for(record.topic), publish_error, delay)
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
        for attempt in range(1, max_retries + 2):
            try:
                await handler(envelope)
                break
            except Exception as error:  # noqa: BLE001 - any handler failure is retried, then dead-lettered
                if attempt > max_retries:
                    await dead_letters.send(message, group=group, error=error, attempts=attempt)
                    return "dead_lettered"
                log.info("retrying %s after %s (attempt %d of %d)", event.event_type, type(error).__name__, attempt, max_retries + 1)
                await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
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


def _validation_summary(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first.get("loc", ())) or "message"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"invalid event: {location}: {first.get('msg')}{more}"
