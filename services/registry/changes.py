"""What every registry mutation shares: one transaction with its audit entry and its outbox event,
refusals audited on their own, and a kick of the outbox relay once the transaction committed.

A mutation a rule refuses changes nothing and is audited in a transaction of its own. A refusal of
who is asking (Forbidden, as the door's 401 and 403) writes nothing at all: refusals cost the caller, not the platform.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from contracts.http import AuditEntryView
from services.registry.errors import Conflict, Forbidden, RegistryError
from services.registry.models import AuditEntry, ProcessedEvent, utcnow
from services.registry.store import Page, RegistryStore, audit_query, page
from services.runtime.http import status_of


def aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


def iso(moment: datetime | None) -> str | None:
    return aware(moment).isoformat() if moment else None


class Changes:
    """Transactions of audited changes over one store, and the audit log they leave."""

    def __init__(self, store: RegistryStore, on_commit: Callable[[], None] | None = None) -> None:
        self.store = store
        self._on_commit = on_commit or (lambda: None)

    @contextmanager
    def change(self, actor: str, action: str, object_type: str, object_id: str) -> Iterator[Session]:
        """A transaction for one mutation: a refusal by a rule is audited, a commit kicks the outbox relay."""
        try:
            with self.store.transaction() as session:
                yield session
        except Forbidden:
            raise
        except RegistryError as error:
            self._refused(actor, action, object_type, object_id, error)
            raise
        except IntegrityError:
            error = Conflict(
                f"{object_type} {object_id} was changed concurrently or already exists; reload and retry",
                code="concurrent_change",
            )
            self._refused(actor, action, object_type, object_id, error)
            raise error from None
        self._on_commit()

    def _refused(self, actor: str, action: str, object_type: str, object_id: str, error: RegistryError) -> None:
        # The status the HTTP door answers with is part of the entry, so the log reads the same whoever asked (door or CLI).
        with self.store.transaction() as session:
            session.add(
                AuditEntry(
                    actor=actor,
                    action=action,
                    object_type=object_type,
                    object_id=object_id,
                    outcome="refused",
                    detail=f"{status_of(error)} {error.code}: {error}",
                )
            )

    @staticmethod
    def record(
        session: Session,
        actor: str,
        action: str,
        object_type: str,
        object_id: str,
        *,
        before: dict | None = None,
        after: dict | None = None,
        detail: str | None = None,
    ) -> None:
        """Audit a change made in `session` (it commits or rolls back with it)."""
        session.add(
            AuditEntry(
                actor=actor,
                action=action,
                object_type=object_type,
                object_id=object_id,
                outcome="ok",
                before=before,
                after=after,
                detail=detail,
            )
        )

    @staticmethod
    def first_time(session: Session, event_id: str | None, event_type: str) -> bool:
        """Record a consumed event id in this transaction; False when it was handled before."""
        if event_id is None:
            return True
        if session.get(ProcessedEvent, event_id) is not None:
            return False
        session.add(ProcessedEvent(event_id=event_id, event_type=event_type))
        return True

    def entries(
        self,
        *,
        object_type: str | None = None,
        object_id: str | None = None,
        actor: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page:
        """Audit entries, oldest first, by object and/or by actor."""
        with self.store.reading() as session:
            return page(
                session,
                audit_query(object_type, object_id, actor),
                AuditEntry,
                AuditEntryView.model_validate,
                cursor,
                limit,
            )
