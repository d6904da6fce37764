"""An existing FLYWHEEL_HOME upgrades in place: each SQLite file the services kept before numbered migrations
(made here with the exact statements that code ran, as of commit 193b642) opens under its migration 1 with its
rows intact, and is recorded at schema version 1."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from contracts.events import DatasetRef, Hyperparameters
from services.evaluator.store import EvaluatorStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.consumer import SqliteProcessedEvents
from services.trainer.catalog import EventCarriedCatalog, UnknownInput
from services.trainer.store import JobRecord, JobStore

pytestmark = pytest.mark.unit


def old_file(path: Path, *statements: str) -> Path:
    """A file as the code before numbered migrations left it: its tables, its rows, no schema_migrations."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        for statement in statements:
            db.execute(statement)
    finally:
        db.close()
    return path


def schema_versions(path: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    finally:
        db.close()


def test_the_trainers_job_store_adopts_an_old_jobs_db_with_its_jobs_and_staged_events(tmp_path: Path) -> None:
    path = old_file(
        tmp_path / "trainer" / "jobs.db",
        "CREATE TABLE IF NOT EXISTS job (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE, model_name TEXT, dataset_name TEXT,"
        " dataset_version INTEGER, hyperparameters TEXT, status TEXT, correlation_id TEXT, requested_by TEXT, step INTEGER DEFAULT 0,"
        " total_steps INTEGER DEFAULT 0, loss REAL, error TEXT, error_type TEXT, artifact_uri TEXT, artifact_sha256 TEXT, updated_at TEXT)",
        "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE, job_id TEXT, event_type TEXT,"
        " envelope TEXT, sent_at TEXT)",
        "INSERT INTO job (job_id, model_name, dataset_name, dataset_version, hyperparameters, status, correlation_id, requested_by, updated_at)"
        f" VALUES ('job-old', 'smollm2', 'tiny', 1, '{Hyperparameters().model_dump_json()}', 'failed', 'c-1', 'alice', '2026-01-01T00:00:00+00:00')",
        "INSERT INTO outbox (event_id, job_id, event_type, envelope) VALUES ('e-1', 'job-old', 'training.failed', '{}')",
    )
    store = JobStore(path)
    try:
        old = store.get("job-old")
        assert (
            old is not None
            and old.status == "failed"
            and old.dataset == DatasetRef(name="tiny", version=1)
            and old.requested_by == "alice"
            and old.start_adapter_version is None
            and old.preference_dataset is None
        )
        assert [event.event_id for event in store.unsent()] == ["e-1"]
        _, created = store.add(
            JobRecord(
                job_id="job-new",
                model_name="smollm2",
                dataset=DatasetRef(name="tiny", version=1),
                hyperparameters=Hyperparameters(),
                status="queued",
                correlation_id=None,
                requested_by="bob",
                start_adapter_version=3,
                preference_dataset=DatasetRef(name="pairs", version=2),
            )
        )
        assert created and [job.job_id for job in store.list()] == ["job-new", "job-old"]
        new = store.get("job-new")
        assert new is not None and new.start_adapter_version == 3
        assert new.preference_dataset == DatasetRef(name="pairs", version=2)
    finally:
        store.close()
    assert schema_versions(path) == [(1, "jobs_and_outbox"), (2, "start_adapter"), (3, "preference_dataset")]


def test_the_trainers_catalog_adopts_an_old_catalog_db_with_what_it_learned(tmp_path: Path) -> None:
    path = old_file(
        tmp_path / "trainer" / "catalog.db",
        "CREATE TABLE IF NOT EXISTS model (name TEXT PRIMARY KEY, uri TEXT, sha256 TEXT)",
        "CREATE TABLE IF NOT EXISTS dataset (name TEXT, version INTEGER, split TEXT, uri TEXT, sha256 TEXT, PRIMARY KEY (name, version))",
        f"INSERT INTO dataset VALUES ('golden-set', 1, 'golden', 'file:///nowhere', '{'0' * 64}')",
    )
    catalog = EventCarriedCatalog(path, ArtifactStore(tmp_path / "artifacts"), tmp_path / "inputs")
    try:
        # The remembered row is read: the refusal names its split, where an unknown dataset would say "publish it first".
        with pytest.raises(UnknownInput, match="is a 'golden' split; training needs a 'train' split"):
            catalog.dataset_path(DatasetRef(name="golden-set", version=1))
        with pytest.raises(UnknownInput, match="unknown adapter smollm2 v1 to start from"):
            catalog.adapter_path("smollm2", 1)
    finally:
        catalog.close()
    assert schema_versions(path) == [(1, "models_and_datasets"), (2, "adapters")]


def test_the_evaluators_store_adopts_an_old_evaluator_db_with_its_catalogue_and_evaluations(tmp_path: Path) -> None:
    path = old_file(
        tmp_path / "evaluator" / "evaluator.db",
        "CREATE TABLE IF NOT EXISTS base_model (name TEXT PRIMARY KEY, artifact_uri TEXT NOT NULL, artifact_sha256 TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS adapter (model_name TEXT, version INTEGER, artifact_uri TEXT NOT NULL, artifact_sha256 TEXT NOT NULL, PRIMARY KEY (model_name, version))",
        "CREATE TABLE IF NOT EXISTS dataset (name TEXT, version INTEGER, split TEXT NOT NULL, artifact_uri TEXT NOT NULL, sha256 TEXT NOT NULL, model_name TEXT, PRIMARY KEY (name, version))",
        "CREATE TABLE IF NOT EXISTS production (model_name TEXT PRIMARY KEY, version INTEGER)",
        "CREATE TABLE IF NOT EXISTS prompt (name TEXT, version INTEGER, template TEXT NOT NULL, variables TEXT NOT NULL, labels TEXT NOT NULL, PRIMARY KEY (name, version))",
        "CREATE TABLE IF NOT EXISTS evaluation (\n    evaluation_id TEXT PRIMARY KEY, status TEXT NOT NULL, request TEXT NOT NULL, result TEXT,\n"
        "    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, correlation_id TEXT\n)",
        "INSERT INTO base_model VALUES ('smollm2', 'file:///base', 'b')",
        "INSERT INTO dataset VALUES ('acme-golden', 3, 'golden', 'file:///golden', 'g', 'smollm2')",
        "INSERT INTO production VALUES ('smollm2', 2)",
        f"INSERT INTO evaluation VALUES ('ev-1', 'completed', '{json.dumps({'candidate': {'model_name': 'smollm2'}})}', '{json.dumps({'passed': True})}',"
        " '2026-01-01T00:00:00+00:00', '2026-01-01T00:01:00+00:00', 'c-1')",
    )
    store = EvaluatorStore(path)
    try:
        assert store.base_model("smollm2") is not None and store.production("smollm2") == 2
        golden = store.latest_golden("smollm2")
        assert golden is not None and (golden.name, golden.version) == ("acme-golden", 3)
        old = store.evaluation("ev-1")
        assert old is not None and old.result == {"passed": True} and old.correlation_id == "c-1"
        assert store.claim("ev-2", {"candidate": {"model_name": "smollm2"}}) and not store.claim("ev-1", {})
    finally:
        store.close()
    assert schema_versions(path) == [(1, "catalogue_and_evaluations")]


def test_the_processed_event_ids_of_an_old_file_are_still_seen(tmp_path: Path) -> None:
    path = old_file(
        tmp_path / "monitor" / "processed-events.db",
        "CREATE TABLE IF NOT EXISTS processed_event (consumer_group TEXT, event_id TEXT, processed_at TEXT, PRIMARY KEY (consumer_group, event_id))",
        "INSERT INTO processed_event VALUES ('monitor', 'e-old', '2026-01-01T00:00:00+00:00')",
    )
    processed = SqliteProcessedEvents(path)
    try:
        assert processed.seen("monitor", "e-old") and not processed.seen("feedback", "e-old")
        processed.remember("monitor", "e-new")
    finally:
        processed.close()
    reopened = SqliteProcessedEvents(path)  # a new process: its cache starts empty
    try:
        assert reopened.seen("monitor", "e-new")
    finally:
        reopened.close()
    assert schema_versions(path) == [(1, "processed_event")]
