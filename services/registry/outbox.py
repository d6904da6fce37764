"""The transactional outbox: events are rows written in the transaction of the change they announce.

A rolled-back change leaves no row, so no event. The relay publishes committed rows in order and
marks them sent; a crash between publish and mark republishes the same envelope (same event_id),
which consumers deduplicate, so every committed change has its effect exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlmodel import Session

from contracts.envelope import Envelope, Payload, wrap
from contracts.topics import EVENT_TYPES
from services.registry.models import OutboxEvent, utcnow

if TYPE_CHECKING:
    from services.registry.store import RegistryStore
    from services.runtime.broker import EventBus

log = logging.getLogger("flywheel.registry.outbox")

PRODUCER = "registry"


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

    def kick(self) -> None:
        """Publish soon: called after a commit in this process, so events need not wait a poll."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch of pending events in commit order; returns how many were sent."""
        rows = await asyncio.to_thread(self._pending)
        for row in rows:
            envelope = Envelope[EVENT_TYPES[row.event_type]].model_validate_json(row.envelope)  # type: ignore[misc]
            await self._bus.publish_envelope(envelope)
            await asyncio.to_thread(self._mark_sent, row.id)
        return len(rows)

    def _pending(self) -> list[OutboxEvent]:
        with self._store.reading() as session:
            return list(session.scalars(select(OutboxEvent).where(OutboxEvent.sent_at.is_(None)).order_by(OutboxEvent.id).limit(self._batch)))  # type: ignore[union-attr,arg-type]

    def _mark_sent(self, row_id: int | None) -> None:
        with self._store.transaction() as session:
            session.execute(update(OutboxEvent).where(OutboxEvent.id == row_id).values(sent_at=utcnow()))  # type: ignore[arg-type]

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
        # What is committed but unsent goes out now rather than at the next start, when the broker allows.
        try:
            await asyncio.wait_for(self.relay_once(), 5.0)
        except Exception as error:  # noqa: BLE001 - left in the outbox for the next start
            log.info("outbox not drained on stop (%s); it will be published at the next start", error)
