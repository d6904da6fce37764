"""How the trainer finds the base model, dataset and starting adapter a request names: the registry owns them.

The seam is the `Catalog` protocol. The trainer's implementation is event-carried state: it keeps
the `model.registered`, `dataset.published` and `adapter.registered` events it consumes (name -> artifact URI and digest)
in its own SQLite, and materializes the artifacts from the content-addressed store on first use,
verifying their digests. So it never calls the registry, and a registry that is down does not stop
a queued job whose inputs were announced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from contracts.events import AdapterRegistered, DatasetPublished, DatasetRef, ModelRegistered
from services.runtime.artifacts import ArtifactStore
from services.runtime.paths import under
from services.runtime.sqlite import Migration, SqliteDatabase

# Migration 1 is the schema as it was before migrations were numbered (IF NOT EXISTS throughout), so an
# existing FLYWHEEL_HOME/trainer/catalog.db is adopted as it is.
MIGRATIONS = (
    Migration(
        1,
        "models_and_datasets",
        """
CREATE TABLE IF NOT EXISTS model (name TEXT PRIMARY KEY, uri TEXT, sha256 TEXT);
CREATE TABLE IF NOT EXISTS dataset (name TEXT, version INTEGER, split TEXT, uri TEXT, sha256 TEXT, PRIMARY KEY (name, version));
""",
    ),
    Migration(
        2,
        "adapters",
        "CREATE TABLE adapter (model_name TEXT, version INTEGER, uri TEXT, sha256 TEXT, PRIMARY KEY (model_name, version));",
    ),
)


class UnknownInput(LookupError):
    """The request names a model or dataset version the trainer has not heard of."""


class Catalog(Protocol):
    def model_path(self, model_name: str) -> Path: ...

    def dataset_path(self, dataset: DatasetRef) -> Path: ...

    def adapter_path(self, model_name: str, version: int) -> Path: ...


class EventCarriedCatalog:
    """Model and dataset locations learned from registry events, materialized under `cache_dir`."""

    def __init__(self, db_path: Path, artifacts: ArtifactStore, cache_dir: Path) -> None:
        self._db = SqliteDatabase(db_path, MIGRATIONS)
        self._artifacts = artifacts
        self._cache = cache_dir

    def remember_model(self, event: ModelRegistered) -> None:
        """Remember where a model's weights are; a URI outside the artifact store is refused (the event is dead-lettered)."""
        self._artifacts.check(event.artifact_uri)
        self._db.execute(
            "INSERT OR REPLACE INTO model VALUES (?, ?, ?)",
            (event.model_name, event.artifact_uri, event.artifact_sha256),
        )

    def remember_dataset(self, event: DatasetPublished) -> None:
        """Remember where a dataset version is; a URI outside the artifact store is refused (the event is dead-lettered)."""
        self._artifacts.check(event.artifact_uri)
        self._db.execute(
            "INSERT OR REPLACE INTO dataset VALUES (?, ?, ?, ?, ?)",
            (event.dataset_name, event.version, event.split, event.artifact_uri, event.sha256),
        )

    def remember_adapter(self, event: AdapterRegistered) -> None:
        """Remember where an adapter version is, to go on training it; a URI outside the store is refused."""
        self._artifacts.check(event.artifact_uri)
        self._db.execute(
            "INSERT OR REPLACE INTO adapter VALUES (?, ?, ?, ?)",
            (event.model_name, event.adapter_version, event.artifact_uri, event.artifact_sha256),
        )

    def adapter_path(self, model_name: str, version: int) -> Path:
        row = self._db.row(
            "SELECT uri, sha256 FROM adapter WHERE model_name = ? AND version = ?", (model_name, version)
        )
        if row is None:
            raise UnknownInput(
                f"unknown adapter {model_name} v{version} to start from: no adapter.registered event seen for it"
            )
        target = under(self._cache, "adapters", row[1])
        if not (target / "adapter_config.json").exists():
            self._artifacts.materialize(row[0], row[1], into_dir=target)
        return target

    def model_path(self, model_name: str) -> Path:
        row = self._db.row("SELECT uri, sha256 FROM model WHERE name = ?", (model_name,))
        if row is None:
            raise UnknownInput(f"unknown base model {model_name!r}: register it first (no model.registered event seen)")
        target = under(self._cache, "models", row[1])
        if not (target / "config.json").exists():
            self._artifacts.materialize(row[0], row[1], into_dir=target)
        return target

    def dataset_path(self, dataset: DatasetRef) -> Path:
        row = self._db.row(
            "SELECT uri, sha256, split FROM dataset WHERE name = ? AND version = ?", (dataset.name, dataset.version)
        )
        if row is None:
            raise UnknownInput(
                f"unknown dataset {dataset.name} v{dataset.version}: publish it first (no dataset.published event seen)"
            )
        if row[2] != "train":
            raise UnknownInput(
                f"dataset {dataset.name} v{dataset.version} is a {row[2]!r} split; training needs a 'train' split"
            )
        return self._artifacts.materialize(row[0], row[1], into_dir=self._cache / "datasets", name=f"{row[1]}.jsonl")

    def close(self) -> None:
        self._db.close()
