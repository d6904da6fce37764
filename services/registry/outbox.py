"""The registry's transactional outbox: events are rows written in the transaction of the change they announce.

A rolled-back change leaves no row, so no event. The runtime's relay (services/runtime/outbox.py) claims
a batch of committed rows through `RegistryOutbox`, publishes them in commit order and marks them sent
in the claiming transaction:

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

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlmodel import Session

from contracts.envelope import Envelope, Payload, wrap
from services.registry.models import OutboxEvent, utcnow
from services.runtime import outbox
from services.runtime.outbox import OutboxClaim, StagedEvent

if TYPE_CHECKING:
    from services.registry.store import RegistryStore
    from services.runtime.outbox import EnvelopePublisher

PRODUCER = "registry"


def stage_event(
    session: Session, payload: Payload, *, correlation_id: str | None = None, event_id: uuid.UUID | None = None
) -> Envelope:
    """Add an event to the caller's transaction; it is published only if that transaction commits."""
    envelope = wrap(payload, producer=PRODUCER, correlation_id=correlation_id, event_id=event_id)
    session.add(
        OutboxEvent(
            event_id=str(envelope.event_id), event_type=envelope.event_type, envelope=envelope.model_dump_json()
        )
    )
    return envelope


class RegistryOutbox:
    """The registry's outbox table as the relay's storage: a claim is a transaction held while its batch is published."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    @contextmanager
    def claim(self, limit: int) -> Iterator[OutboxClaim]:
        with self._store.transaction() as session:
            yield _RowsClaim(session, self._oldest_unsent(session, limit))

    def _oldest_unsent(self, session: Session, limit: int) -> list[OutboxEvent]:
        pending = select(OutboxEvent).where(OutboxEvent.sent_at.is_(None)).order_by(OutboxEvent.id).limit(limit)  # type: ignore[union-attr,arg-type]
        if self._store.dialect == "postgresql":
            pending = pending.with_for_update(skip_locked=True)
        rows = list(session.scalars(pending))
        oldest = session.scalar(select(func.min(OutboxEvent.id)).where(OutboxEvent.sent_at.is_(None)))  # type: ignore[union-attr]
        if rows and rows[0].id != oldest:
            return []  # an earlier batch is claimed by another relay and not yet sent
        return rows


class _RowsClaim:
    def __init__(self, session: Session, rows: list[OutboxEvent]) -> None:
        self._session = session
        self._rows = {row.event_id: row for row in rows}
        self.events = [StagedEvent(row.event_id, row.event_type, row.envelope) for row in rows]

    def mark_sent(self, event: StagedEvent) -> None:
        row = self._rows[event.event_id]
        row.sent_at = utcnow()
        self._session.add(row)


class OutboxRelay(outbox.OutboxRelay):
    """The runtime's relay over the registry's outbox table."""

    def __init__(
        self, store: RegistryStore, bus: EnvelopePublisher, *, interval_s: float = 0.2, batch: int = 100
    ) -> None:
        super().__init__(RegistryOutbox(store), bus, name="registry-outbox-relay", interval_s=interval_s, batch=batch)
