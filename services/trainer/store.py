"""Training job state in SQLite under FLYWHEEL_HOME/trainer: the only module that opens the jobs database.

A job's end and its terminal event (training.completed / training.failed) are written in one
transaction: the event waits in the `outbox` table until the broker has acknowledged it, so a
broker outage or a worker killed between the two loses neither the state nor the event.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from contracts.events import DatasetRef, Hyperparameters


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


@dataclass(frozen=True)
class OutboxEvent:
    """A terminal event as it will be published: the whole envelope, so a republished one is identical."""

    event_id: str
    event_type: str
    envelope: str


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS job (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE, model_name TEXT, dataset_name TEXT,"
            " dataset_version INTEGER, hyperparameters TEXT, status TEXT, correlation_id TEXT, requested_by TEXT, step INTEGER DEFAULT 0,"
            " total_steps INTEGER DEFAULT 0, loss REAL, error TEXT, error_type TEXT, artifact_uri TEXT, artifact_sha256 TEXT, updated_at TEXT)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE, job_id TEXT, event_type TEXT,"
            " envelope TEXT, sent_at TEXT)"
        )
        self._lock = threading.Lock()

    def add(self, job: JobRecord) -> tuple[JobRecord, bool]:
        """Insert a queued job; returns the stored job and whether it is new (a known job_id adds nothing)."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO job (job_id, model_name, dataset_name, dataset_version, hyperparameters, status, correlation_id, requested_by, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (job.job_id, job.model_name, job.dataset.name, job.dataset.version, job.hyperparameters.model_dump_json(), job.correlation_id, job.requested_by, _now()),
            )
        stored = self.get(job.job_id)
        assert stored is not None
        return stored, cursor.rowcount == 1

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM job WHERE job_id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def list(self, limit: int = 100) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM job ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_record(row) for row in rows]

    def next_runnable(self) -> JobRecord | None:
        """A job left `running` by a dead worker comes first (it resumes from its checkpoint), then the oldest queued."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM job WHERE status IN ('running', 'queued') ORDER BY status = 'running' DESC, seq LIMIT 1"
            ).fetchone()
        return _record(row) if row else None

    def update(self, job_id: str, **fields: object) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE job SET {assignments}, updated_at = ? WHERE job_id = ?", (*fields.values(), _now(), job_id))

    def finish(self, job_id: str, event: OutboxEvent, **fields: object) -> None:
        """Record a job's end and stage its terminal event, both or neither; a staged event_id is staged once."""
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(f"UPDATE job SET {assignments}, updated_at = ? WHERE job_id = ?", (*fields.values(), _now(), job_id))
                self._db.execute(
                    "INSERT OR IGNORE INTO outbox (event_id, job_id, event_type, envelope) VALUES (?, ?, ?, ?)",
                    (event.event_id, job_id, event.event_type, event.envelope),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def unsent(self, limit: int = 100) -> list[OutboxEvent]:
        """Staged events the broker has not acknowledged yet, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT event_id, event_type, envelope FROM outbox WHERE sent_at IS NULL ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [OutboxEvent(*row) for row in rows]

    def mark_sent(self, event_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE outbox SET sent_at = ? WHERE event_id = ?", (_now(), event_id))

    def close(self) -> None:
        self._db.close()


_COLUMNS = (
    "job_id, model_name, dataset_name, dataset_version, hyperparameters, status, correlation_id, requested_by, step, total_steps,"
    " loss, error, error_type, artifact_uri, artifact_sha256"
)


def _record(row: tuple) -> JobRecord:
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
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()
