"""Shared pieces of the registry tests: a registry on SQLite or on a fresh PostgreSQL database, and seed data."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from contracts.events import DatasetRef, EvaluationCompleted, Hyperparameters, ModelTarget, Stage, TrainingCompleted
from contracts.http import Role
from services.registry.service import Registry
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactRef, ArtifactStore
from tests.fixtures.postgres import fresh_database

CHAT = [
    {
        "messages": [
            {"role": "user", "content": "How do I reset my password?"},
            {"role": "assistant", "content": "Use Settings > Security > Reset."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Refund policy?"},
            {"role": "assistant", "content": "30 days, no questions."},
        ]
    },
]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        with fresh_database(request.getfixturevalue("postgres_url")) as url:
            yield url


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    store = RegistryStore(database_url)
    store.migrate()
    yield Registry(store, ArtifactStore(tmp_path / "artifacts"))
    store.close()


def adapter_artifact(registry: Registry, tmp_path: Path, seed: int = 0) -> ArtifactRef:
    directory = tmp_path / f"adapter-{uuid.uuid4().hex[:6]}"
    directory.mkdir()
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {"base_model.model.q_proj.lora_A.weight": torch.randn(4, 8, generator=generator)},
        str(directory / "adapter_model.safetensors"),
    )
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "seed": seed}))
    return registry.artifacts.put_directory(directory)


def seed_model(registry: Registry, tmp_path: Path, name: str = "smol") -> None:
    weights = registry.artifacts.put_bytes(b'{"fake": "base"}', kind="json")
    registry.models.register_base_model(
        "alice",
        name=name,
        source="test",
        architecture="LlamaForCausalLM",
        parameter_count=135,
        artifact_uri=weights.uri,
        artifact_sha256=weights.sha256,
        license="apache-2.0",
    )


def training_completed(
    registry: Registry,
    tmp_path: Path,
    *,
    job_id: str,
    seed: int = 0,
    model: str = "smol",
    dataset: DatasetRef | None = None,
    hyperparameters: Hyperparameters | None = None,
) -> TrainingCompleted:
    ref = adapter_artifact(registry, tmp_path, seed)
    return TrainingCompleted(
        job_id=job_id,
        model_name=model,
        dataset=dataset or DatasetRef(name="support", version=1),
        hyperparameters=hyperparameters or Hyperparameters(rank=4),
        artifact_uri=ref.uri,
        artifact_sha256=ref.sha256,
        metrics={"final_loss": 0.5},
    )


def evaluation(model: str, version: int, *, passed: bool = True) -> EvaluationCompleted:
    return EvaluationCompleted(
        evaluation_id=f"eval-{uuid.uuid4().hex[:8]}",
        candidate=ModelTarget(model_name=model, adapter_version=version),
        golden=DatasetRef(name="golden", version=1),
        passed=passed,
        gate_policy="default@v1",
        reasons=["beats baseline" if passed else "worse than baseline"],
    )


def seed_adapters(registry: Registry, tmp_path: Path, count: int = 2, *, evaluated: bool = True) -> None:
    seed_model(registry, tmp_path)
    registry.datasets.publish_dataset("alice", name="support", split="train", jsonl=jsonl(CHAT))
    for index in range(count):
        adapter = registry.adapters.register_trained_adapter(
            training_completed(registry, tmp_path, job_id=f"job-{index}", seed=index),
            event_id=str(uuid.uuid4()),
            correlation_id=f"corr-{index}",
        )
        if evaluated:
            registry.adapters.attach_evaluation(evaluation("smol", adapter.version))


def seed_production_and_approved_candidate(registry: Registry, tmp_path: Path, model: str) -> None:
    """`model` with v1 in production and v2 staged, both trained on support:v1, evaluated and approved by an
    approver (so alice, an operator, may promote either)."""
    seed_model(registry, tmp_path, name=model)
    registry.datasets.publish_dataset("alice", name="support", split="train", jsonl=jsonl(CHAT))
    for index in range(2):
        adapter = registry.adapters.register_trained_adapter(
            training_completed(registry, tmp_path, job_id=f"job-{index}", seed=index, model=model),
            event_id=str(uuid.uuid4()),
            correlation_id=f"corr-{index}",
        )
        registry.adapters.attach_evaluation(evaluation(model, adapter.version))
        registry.adapters.transition("alice", model_name=model, version=adapter.version, to_stage=Stage.staging)
        registry.approvals.approve("bob", Role.approver, object_type="adapter", name=model, version=adapter.version)
    registry.adapters.transition("alice", model_name=model, version=1, to_stage=Stage.production)
