"""What the evaluator keeps: the catalogue it learns from registry events, evaluation records, and result rows.

The catalogue (base models, adapter versions, datasets, the production version per model) is
event-carried state: the evaluator never calls the registry, so it evaluates while the registry is
down. It lives in SQLite under FLYWHEEL_HOME/evaluator because consumer offsets are committed: a
restarted evaluator is not sent the old events again. Per-example results go to ClickHouse.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.runtime.clickhouse import ClickHouseStore
from services.runtime.sqlite import Migration, SqliteDatabase

# Migration 1 is the schema as it was before migrations were numbered (IF NOT EXISTS throughout), so an
# existing FLYWHEEL_HOME/evaluator/evaluator.db is adopted as it is.
MIGRATIONS = (
    Migration(
        1,
        "catalogue_and_evaluations",
        """
CREATE TABLE IF NOT EXISTS base_model (name TEXT PRIMARY KEY, artifact_uri TEXT NOT NULL, artifact_sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapter (model_name TEXT, version INTEGER, artifact_uri TEXT NOT NULL, artifact_sha256 TEXT NOT NULL, PRIMARY KEY (model_name, version));
CREATE TABLE IF NOT EXISTS dataset (name TEXT, version INTEGER, split TEXT NOT NULL, artifact_uri TEXT NOT NULL, sha256 TEXT NOT NULL, model_name TEXT, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS production (model_name TEXT PRIMARY KEY, version INTEGER);
CREATE TABLE IF NOT EXISTS prompt (name TEXT, version INTEGER, template TEXT NOT NULL, variables TEXT NOT NULL, labels TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS evaluation (
    evaluation_id TEXT PRIMARY KEY, status TEXT NOT NULL, request TEXT NOT NULL, result TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, correlation_id TEXT
);
""",
    ),
)


@dataclass(frozen=True)
class ArtifactPointer:
    uri: str
    sha256: str


@dataclass(frozen=True)
class DatasetPointer:
    name: str
    version: int
    split: str
    uri: str
    sha256: str
    model_name: str | None


@dataclass(frozen=True)
class PromptVersion:
    name: str
    version: int
    template: str
    variables: tuple[str, ...]


@dataclass(frozen=True)
class EvaluationRecord:
    evaluation_id: str
    status: str  # queued, running, completed, failed
    request: dict[str, Any]
    result: dict[str, Any] | None
    created_at: str
    updated_at: str
    correlation_id: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat()


class EvaluatorStore:
    """Blocking SQLite calls: handlers and the HTTP door call them through asyncio.to_thread, evaluations from the worker's thread."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------------------- catalogue

    def remember_model(self, name: str, uri: str, sha256: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO base_model VALUES (?, ?, ?)", (name, uri, sha256))

    def remember_adapter(self, model_name: str, version: int, uri: str, sha256: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO adapter VALUES (?, ?, ?, ?)", (model_name, version, uri, sha256))

    def remember_dataset(self, pointer: DatasetPointer) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO dataset VALUES (?, ?, ?, ?, ?, ?)",
            (pointer.name, pointer.version, pointer.split, pointer.uri, pointer.sha256, pointer.model_name),
        )

    def set_production(self, model_name: str, version: int | None) -> None:
        self._db.execute("INSERT OR REPLACE INTO production VALUES (?, ?)", (model_name, version))

    def remember_prompt(
        self, name: str, version: int, template: str, variables: Sequence[str], labels: Sequence[str]
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO prompt VALUES (?, ?, ?, ?, ?)",
            (name, version, template, json.dumps(list(variables)), json.dumps(list(labels))),
        )

    def prompt(self, name: str, version: int) -> PromptVersion | None:
        rows = self._db.rows(
            "SELECT name, version, template, variables FROM prompt WHERE name = ? AND version = ?", (name, version)
        )
        return PromptVersion(rows[0][0], rows[0][1], rows[0][2], tuple(json.loads(rows[0][3]))) if rows else None

    def prompt_labelled(self, name: str, label: str) -> int | None:
        """The version of prompt `name` that last arrived carrying `label` (labels move by re-publication)."""
        rows = self._db.rows("SELECT version, labels FROM prompt WHERE name = ? ORDER BY rowid DESC", (name,))
        return next((version for version, labels in rows if label in json.loads(labels)), None)

    def base_model(self, name: str) -> ArtifactPointer | None:
        rows = self._db.rows("SELECT artifact_uri, artifact_sha256 FROM base_model WHERE name = ?", (name,))
        return ArtifactPointer(*rows[0]) if rows else None

    def adapter(self, model_name: str, version: int) -> ArtifactPointer | None:
        rows = self._db.rows(
            "SELECT artifact_uri, artifact_sha256 FROM adapter WHERE model_name = ? AND version = ?",
            (model_name, version),
        )
        return ArtifactPointer(*rows[0]) if rows else None

    def dataset(self, name: str, version: int) -> DatasetPointer | None:
        rows = self._db.rows(
            "SELECT name, version, split, artifact_uri, sha256, model_name FROM dataset WHERE name = ? AND version = ?",
            (name, version),
        )
        return DatasetPointer(*rows[0]) if rows else None

    def latest_golden(self, model_name: str) -> DatasetPointer | None:
        """The newest golden dataset meant for `model_name`, else the newest golden dataset meant for no model."""
        rows = self._db.rows(
            "SELECT name, version, split, artifact_uri, sha256, model_name FROM dataset WHERE split = 'golden' AND (model_name = ? OR model_name IS NULL) "
            "ORDER BY model_name IS NULL, rowid DESC LIMIT 1",
            (model_name,),
        )
        return DatasetPointer(*rows[0]) if rows else None

    def production(self, model_name: str) -> int | None:
        rows = self._db.rows("SELECT version FROM production WHERE model_name = ?", (model_name,))
        return rows[0][0] if rows else None

    # ----------------------------------------------------------------------------- evaluations

    def claim(self, evaluation_id: str, request: dict[str, Any], *, correlation_id: str | None = None) -> bool:
        """Record a new evaluation as queued; False if the id exists (a redelivered or repeated request)."""
        now = _now()
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO evaluation VALUES (?, 'queued', ?, NULL, ?, ?, ?)",
            (evaluation_id, json.dumps(request), now, now, correlation_id),
        )
        return inserted == 1

    def next_pending(self) -> EvaluationRecord | None:
        """The oldest evaluation not finished: queued, or running when the process stopped mid-way."""
        rows = self._db.rows(
            "SELECT * FROM evaluation WHERE status IN ('queued', 'running') ORDER BY created_at LIMIT 1"
        )
        return _record(rows[0]) if rows else None

    def set_status(self, evaluation_id: str, status: str, result: dict[str, Any] | None = None) -> None:
        self._db.execute(
            "UPDATE evaluation SET status = ?, result = COALESCE(?, result), updated_at = ? WHERE evaluation_id = ?",
            (status, json.dumps(result) if result is not None else None, _now(), evaluation_id),
        )

    def evaluation(self, evaluation_id: str) -> EvaluationRecord | None:
        rows = self._db.rows("SELECT * FROM evaluation WHERE evaluation_id = ?", (evaluation_id,))
        return _record(rows[0]) if rows else None

    def evaluations(self, *, model_name: str | None = None, limit: int = 50) -> list[EvaluationRecord]:
        rows = self._db.rows(
            "SELECT * FROM evaluation ORDER BY created_at DESC LIMIT ?",
            (max(limit * 4, limit) if model_name else limit,),
        )
        records = [_record(row) for row in rows]
        if model_name:
            records = [r for r in records if r.request.get("candidate", {}).get("model_name") == model_name]
        return records[:limit]

    def evaluation_page(
        self, *, model_name: str | None = None, status: str | None = None, before: str | None = None, limit: int = 50
    ) -> list[EvaluationRecord]:
        """Evaluations newest first, of one model's candidates and in one status when given, older than the
        evaluation `before` (the console's page cursor: an id, so runs requested in the same instant stay in order)."""
        clauses, parameters = [], []
        if model_name is not None:
            clauses.append("json_extract(request, '$.candidate.model_name') = ?")
            parameters.append(model_name)
        if status is not None:
            clauses.append("status = ?")
            parameters.append(status)
        if before is not None:
            clauses.append(
                "(created_at, evaluation_id) < (SELECT created_at, evaluation_id FROM evaluation WHERE evaluation_id = ?)"
            )
            parameters.append(before)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.rows(
            f"SELECT * FROM evaluation {where} ORDER BY created_at DESC, evaluation_id DESC LIMIT ?",
            (*parameters, limit),
        )
        return [_record(row) for row in rows]


def _record(row: Sequence[Any]) -> EvaluationRecord:
    evaluation_id, status, request, result, created_at, updated_at, correlation_id = row
    return EvaluationRecord(
        evaluation_id,
        status,
        json.loads(request),
        json.loads(result) if result else None,
        created_at,
        updated_at,
        correlation_id,
    )


@dataclass(frozen=True)
class ResultRow:
    example_id: str
    model_name: str
    adapter_version: int | None
    target: str
    metric: str
    score: float | None
    error: str | None
    prediction: str
    reference: str
    prompt_name: str | None = None
    prompt_version: int | None = None


def read_results(
    clickhouse: Callable[[], ClickHouseStore],
    evaluation_id: str,
    *,
    target: str,
    metric: str,
    example_ids: Sequence[str] | None = None,
    limit: int = 50,
) -> list[ResultRow]:
    """One target's rows for one metric of an evaluation: those of `example_ids` when given, else the first
    `limit` by example id."""
    chosen = "AND example_id IN {ids:Array(String)}" if example_ids is not None else ""
    rows = clickhouse().query(
        "SELECT example_id, model_name, adapter_version, target, metric, score, error, prediction, reference, "
        "prompt_name, prompt_version FROM evaluation_result FINAL "
        f"WHERE evaluation_id = {{id:String}} AND target = {{target:String}} AND metric = {{metric:String}} {chosen} "
        "ORDER BY example_id LIMIT {limit:UInt32}",
        {"id": evaluation_id, "target": target, "metric": metric, "ids": list(example_ids or ()), "limit": limit},
    )
    return [ResultRow(**{**row, "prompt_name": row["prompt_name"] or None}) for row in rows]


def write_results(
    clickhouse: Callable[[], ClickHouseStore], evaluation_id: str, rows: Sequence[ResultRow], created_at: datetime
) -> None:
    """One columnar insert of an evaluation's per-example rows into `evaluation_result`."""
    import pyarrow as pa

    table = pa.table(
        {
            "evaluation_id": pa.array([evaluation_id] * len(rows), pa.string()),
            "example_id": pa.array([r.example_id for r in rows], pa.string()),
            "model_name": pa.array([r.model_name for r in rows], pa.string()),
            "adapter_version": pa.array([r.adapter_version for r in rows], pa.uint32()),
            "prompt_name": pa.array([r.prompt_name or "" for r in rows], pa.string()),
            "prompt_version": pa.array([r.prompt_version for r in rows], pa.uint32()),
            "target": pa.array([r.target for r in rows], pa.string()),
            "metric": pa.array([r.metric for r in rows], pa.string()),
            "score": pa.array([r.score for r in rows], pa.float64()),
            "error": pa.array([r.error for r in rows], pa.string()),
            "prediction": pa.array([r.prediction for r in rows], pa.string()),
            "reference": pa.array([r.reference for r in rows], pa.string()),
            "created_at": pa.array([created_at] * len(rows), pa.timestamp("ms", tz="UTC")),
        }
    )
    clickhouse().insert_arrow("evaluation_result", table)
