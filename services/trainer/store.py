"""Training job state in SQLite under FLYWHEEL_HOME/trainer: the only module that opens the jobs database.

A job's end and its terminal event (training.completed / training.failed) are written in one
transaction: the event waits in the `outbox` table until the broker has acknowledged it, so a
broker outage or a worker killed between the two loses neither the state nor the event.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contracts.events import DatasetRef, Hyperparameters
from services.runtime.outbox import OutboxClaim, StagedEvent
from services.runtime.sqlite import Migration, SqliteDatabase

# Migration 1 is the schema as it was before migrations were numbered (IF NOT EXISTS throughout), so an
# existing FLYWHEEL_HOME/trainer/jobs.db is adopted as it is.
MIGRATIONS = (
    Migration(
        1,
        "jobs_and_outbox",
        """
CREATE TABLE IF NOT EXISTS job (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE, model_name TEXT, dataset_name TEXT,
    dataset_version INTEGER, hyperparameters TEXT, status TEXT, correlation_id TEXT, requested_by TEXT, step INTEGER DEFAULT 0,
    total_steps INTEGER DEFAULT 0, loss REAL, error TEXT, error_type TEXT, artifact_uri TEXT, artifact_sha256 TEXT, updated_at TEXT);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE, job_id TEXT, event_type TEXT,
    envelope TEXT, sent_at TEXT);
""",
    ),
    Migration(2, "start_adapter", "ALTER TABLE job ADD COLUMN start_adapter_version INTEGER;"),
    Migration(
        3,
        "preference_dataset",
        "ALTER TABLE job ADD COLUMN preference_dataset_name TEXT; ALTER TABLE job ADD COLUMN preference_dataset_version INTEGER;",
    ),
)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    model_name: str
    dataset: DatasetRef
    hyperparameters: Hyperparameters
    status: str
    correlation_id: str | None
    requested_by: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    error: str | None = None
    error_type: str | None = None
    artifact_uri: str | None = None
    artifact_sha256: str | None = None
    start_adapter_version: int | None = None
    preference_dataset: DatasetRef | None = None


# A terminal event as it will be published: the whole envelope, so a republished one is identical.
OutboxEvent = StagedEvent


class JobStore:
    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, MIGRATIONS)

    def add(self, job: JobRecord) -> tuple[JobRecord, bool]:
        """Insert a queued job; returns the stored job and whether it is new (a known job_id adds nothing)."""
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO job (job_id, model_name, dataset_name, dataset_version, hyperparameters, status,"
            " correlation_id, requested_by, updated_at, start_adapter_version, preference_dataset_name,"
            " preference_dataset_version) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
            (
                job.job_id,
                job.model_name,
                job.dataset.name,
                job.dataset.version,
                job.hyperparameters.model_dump_json(),
                job.correlation_id,
                job.requested_by,
                _now(),
                job.start_adapter_version,
                job.preference_dataset.name if job.preference_dataset else None,
                job.preference_dataset.version if job.preference_dataset else None,
            ),
        )
        stored = self.get(job.job_id)
        assert stored is not None
        return stored, inserted == 1

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.row(f"SELECT {_COLUMNS} FROM job WHERE job_id = ?", (job_id,))
        return _record(row) if row else None

    def list(self, limit: int = 100) -> list[JobRecord]:
        return [
            _record(row) for row in self._db.rows(f"SELECT {_COLUMNS} FROM job ORDER BY seq DESC LIMIT ?", (limit,))
        ]

    def next_runnable(self) -> JobRecord | None:
        """A job left `running` by a dead worker comes first (it resumes from its checkpoint), then the oldest queued."""
        row = self._db.row(
            f"SELECT {_COLUMNS} FROM job WHERE status IN ('running', 'queued') ORDER BY status = 'running' DESC, seq LIMIT 1"
        )
        return _record(row) if row else None

    def update(self, job_id: str, **fields: object) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self._db.execute(
            f"UPDATE job SET {assignments}, updated_at = ? WHERE job_id = ?", (*fields.values(), _now(), job_id)
        )

    def finish(self, job_id: str, event: OutboxEvent, **fields: object) -> None:
        """Record a job's end and stage its terminal event, both or neither; a staged event_id is staged once."""
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._db.transaction() as db:
            db.execute(
                f"UPDATE job SET {assignments}, updated_at = ? WHERE job_id = ?", (*fields.values(), _now(), job_id)
            )
            db.execute(
                "INSERT OR IGNORE INTO outbox (event_id, job_id, event_type, envelope) VALUES (?, ?, ?, ?)",
                (event.event_id, job_id, event.event_type, event.envelope),
            )

    def unsent(self, limit: int = 100) -> list[OutboxEvent]:
        """Staged events the broker has not acknowledged yet, oldest first."""
        return [
            OutboxEvent(*row)
            for row in self._db.rows(
                "SELECT event_id, event_type, envelope FROM outbox WHERE sent_at IS NULL ORDER BY seq LIMIT ?", (limit,)
            )
        ]

    def mark_sent(self, event_id: str) -> None:
        self._db.execute("UPDATE outbox SET sent_at = ? WHERE event_id = ?", (_now(), event_id))

    @contextmanager
    def claim(self, limit: int) -> Iterator[OutboxClaim]:
        """The outbox relay's storage: the oldest unsent events, each marked sent as soon as the broker acknowledges it.

        Only this process's worker stages trainer events and one relay sends them, so no row lock is needed.
        """
        yield _JobOutboxClaim(self, self.unsent(limit))

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class _JobOutboxClaim:
    store: JobStore
    events: list[StagedEvent]

    def mark_sent(self, event: StagedEvent) -> None:
        self.store.mark_sent(event.event_id)


_COLUMNS = (
    "job_id, model_name, dataset_name, dataset_version, hyperparameters, status, correlation_id, requested_by, step, total_steps,"
    " loss, error, error_type, artifact_uri, artifact_sha256, start_adapter_version, preference_dataset_name,"
    " preference_dataset_version"
)


def _record(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        job_id=row[0],
        model_name=row[1],
        dataset=DatasetRef(name=row[2], version=row[3]),
        hyperparameters=Hyperparameters.model_validate(json.loads(row[4])),
        status=row[5],
        correlation_id=row[6],
        requested_by=row[7],
        step=row[8],
        total_steps=row[9],
        loss=row[10],
        error=row[11],
        error_type=row[12],
        artifact_uri=row[13],
        artifact_sha256=row[14],
        start_adapter_version=row[15],
        preference_dataset=None if row[16] is None else DatasetRef(name=row[16], version=row[17]),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()
