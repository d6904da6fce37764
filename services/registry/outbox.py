"""The transactional outbox: events are rows written in the transaction of the change they announce.

A rolled-back change leaves no row, so no event. A relay claims a batch of committed rows, publishes
them in commit order and marks them sent in the claiming transaction:

- Several registry replicas may relay at once. On PostgreSQL the claim is `SELECT ... FOR UPDATE SKIP
  LOCKED`, so no two relays hold the same row and none blocks on another; a relay whose claim does
  not start at the oldest unsent row would overtake an earlier batch still being published, so it
  lets its claim go and tries again later, and events leave in commit order. On SQLite every
  transaction begins IMMEDIATE (one writer at a time), which makes the claim exclusive just the same.
- A crash (or a lost connection) between publishing and the commit leaves the batch unsent; the next
  claim publishes those envelopes again with the same event_id, and consumers deduplicate by
  event_id. So every committed change has its effect exactly once: at-least-once delivery of each
  envelope, made idempotent where it is consumed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlmodel import Session

from contracts.envelope import Envelope, Payload, wrap
from contracts.topics import EVENT_TYPES
from services.registry.models import OutboxEvent, utcnow

if TYPE_CHECKING:
    from services.registry.store import RegistryStore
    from services.runtime.broker import EventBus

log = logging.getLogger("flywheel.registry.outbox")

PRODUCER = "registry"
# Longer than the producer's own request timeout: a publish that has not settled by then is abandoned
# with its batch, which stays unsent and is published again.
PUBLISH_TIMEOUT_S = 60.0


def stage_event(session: Session, payload: Payload, *, correlation_id: str | None = None) -> Envelope:
    """Add an event to the caller's transaction; it is published only if that transaction commits."""
    envelope = wrap(payload, producer=PRODUCER, correlation_id=correlation_id)
    session.add(OutboxEvent(event_id=str(envelope.event_id), event_type=envelope.event_type, envelope=envelope.model_dump_json()))
    return envelope


class OutboxRelay:
    """Publishes committed outbox rows through the event bus and marks them sent."""

    def __init__(self, store: RegistryStore, bus: EventBus, *, interval_s: float = 0.2, batch: int = 100) -> None:
        self._store = store
        self._bus = bus
        self._interval = interval_s
        self._batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._batch_lock = threading.Lock()

    def kick(self) -> None:
        """Publish soon: called after a commit in this process, so events need not wait a poll."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch of pending events in commit order; returns how many were sent."""
        return await asyncio.to_thread(self._relay_batch, asyncio.get_running_loop())

    def _relay_batch(self, loop: asyncio.AbstractEventLoop) -> int:
        # The claim's transaction stays open while the batch is published, so it runs in a thread and
        # publishes through the loop. The lock keeps a final drain on stop from racing a batch whose
        # task was cancelled but whose thread still runs.
        with self._batch_lock, self._store.transaction() as session:
            rows = self._claim(session)
            for row in rows:
                envelope = Envelope[EVENT_TYPES[row.event_type]].model_validate_json(row.envelope)  # type: ignore[misc]
                asyncio.run_coroutine_threadsafe(self._bus.publish_envelope(envelope), loop).result(PUBLISH_TIMEOUT_S)
                row.sent_at = utcnow()
                session.add(row)
            return len(rows)

    def _claim(self, session: Session) -> list[OutboxEvent]:
        pending = select(OutboxEvent).where(OutboxEvent.sent_at.is_(None)).order_by(OutboxEvent.id).limit(self._batch)  # type: ignore[union-attr,arg-type]
        if self._store.dialect == "postgresql":
            pending = pending.with_for_update(skip_locked=True)
        rows = list(session.scalars(pending))
        oldest = session.scalar(select(func.min(OutboxEvent.id)).where(OutboxEvent.sent_at.is_(None)))  # type: ignore[union-attr]
        if rows and rows[0].id != oldest:
            return []  # an earlier batch is claimed by another relay and not yet sent
        return rows

    async def run(self) -> None:
        delay = self._interval
        while True:
            try:
                sent = await self.relay_once()
                delay = self._interval
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the relay outlives a broker or database outage
                log.warning("outbox relay failed (%s: %s); retrying in %.1fs", type(error).__name__, error, delay)
                sent = 0
                delay = min(delay * 2, 10.0)
            if sent < self._batch:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass

    async def _drain(self) -> None:
        while await self.relay_once() >= self._batch:
            pass

    async def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="registry-outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        # What is committed but unsent goes out now rather than at the next start: the process stops
        # its services before it disconnects the broker.
        try:
            await asyncio.wait_for(self._drain(), 5.0)
        except Exception as error:  # noqa: BLE001 - left in the outbox for the next start
            log.info("outbox not drained on stop (%s); it will be published at the next start", error)
