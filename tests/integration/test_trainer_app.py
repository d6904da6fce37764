"""The trainer service on the real broker: inputs learned from registry events, a redelivered request is one job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.envelope import Envelope
from contracts.events import (
    DatasetPublished,
    DatasetRef,
    Hyperparameters,
    ModelRegistered,
    TrainingCompleted,
    TrainingRequested,
    TrainingStarted,
)
from contracts.http import Role
from services.runtime.artifacts import ArtifactStore, default_artifact_root
from services.runtime.service import Runtime, Service, build_process
from services.runtime.settings import FlywheelSettings
from services.trainer.app import create_app
from services.registry.datasets import validate_jsonl
from tests.fixtures.trainer_model import DEMO_DATA, base_model_dir  # noqa: F401 - fixture
from tests.integration.test_trainer_dpo import preferences  # noqa: F401 - fixture
from tests.integration.test_event_bus import eventually
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def probe(seen: list[Envelope]) -> object:
    def create(runtime: Runtime) -> Service:
        async def record(envelope: Envelope) -> None:
            seen.append(envelope)

        runtime.subscribe("probe", TrainingStarted, record)
        runtime.subscribe("probe", TrainingCompleted, record)
        return Service(name="probe")

    return create


async def publish_inputs(bus: Any, model: Any, dataset: Any, name: str, rows: int, provenance: str) -> None:
    """What the registry announces before a job can run: the base model, and version 1 of dataset `name`."""
    await bus.publish(
        ModelRegistered(
            model_name="smollm2",
            source="test",
            architecture="LlamaForCausalLM",
            parameter_count=1,
            artifact_uri=model.uri,
            artifact_sha256=model.sha256,
        )
    )
    await bus.publish(
        DatasetPublished(
            dataset_name=name,
            version=1,
            split="train",
            row_count=rows,
            sha256=dataset.sha256,
            artifact_uri=dataset.uri,
            provenance=provenance,
        )
    )


async def test_a_redelivered_request_trains_once_and_reports_completed(
    settings: FlywheelSettings, base_model_dir: Path, tmp_path: Path
) -> None:  # noqa: F811
    artifacts = ArtifactStore(default_artifact_root(settings.home))
    model = artifacts.put_directory(base_model_dir)
    rows = tmp_path / "tiny.jsonl"
    rows.write_text("".join((DEMO_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:4]))
    dataset = artifacts.put_file(rows)

    seen: list[Envelope] = []
    app, runtime = build_process(settings, [create_app, probe(seen)], title="flywheel-test")
    async with app.router.lifespan_context(app):
        bus = runtime.bus("test")
        await publish_inputs(bus, model, dataset, "tiny", 4, "uploaded")
        request = TrainingRequested(
            job_id="job-42",
            model_name="smollm2",
            dataset=DatasetRef(name="tiny", version=1),
            requested_by="test",
            hyperparameters=Hyperparameters(rank=4, alpha=8, batch_size=2, epochs=1, max_seq_length=128),
        )
        await bus.publish(request, correlation_id="corr-1")
        await bus.publish(request, correlation_id="corr-1")  # a redelivery: a new envelope, the same job_id

        await eventually(
            lambda: any(isinstance(e.payload, TrainingCompleted) for e in seen),
            what="training.completed",
            timeout_s=500,
        )
        completed = next(e for e in seen if isinstance(e.payload, TrainingCompleted))
        assert completed.correlation_id == "corr-1"
        assert sorted(artifacts.manifest(completed.payload.artifact_uri, completed.payload.artifact_sha256)) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ]

        viewer = api_key(settings, Role.viewer)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/trainer/v1/training-jobs")).status_code == 401
            client.headers["Authorization"] = f"Bearer {viewer}"
            jobs = (await client.get("/trainer/v1/training-jobs")).json()
            assert [(job["job_id"], job["status"], job["step"], job["total_steps"]) for job in jobs] == [
                ("job-42", "completed", 2, 2)
            ]
            missing = await client.get("/trainer/v1/training-jobs/nope")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        assert [type(e.payload) for e in seen].count(TrainingStarted) == 1


async def test_a_dpo_request_on_a_published_preference_dataset_trains_and_reports_its_reward_metrics(
    settings: FlywheelSettings,
    base_model_dir: Path,  # noqa: F811
    preferences: Path,  # noqa: F811
) -> None:
    """A preference dataset as the registry publishes it (its own validation names the format) trains
    with method dpo through the service's events, as `flywheel ops preference-dataset` then
    `flywheel train submit --method dpo` run it."""
    record_format, row_count = validate_jsonl(preferences.read_bytes())
    assert record_format == "preference"
    artifacts = ArtifactStore(default_artifact_root(settings.home))
    model = artifacts.put_directory(base_model_dir)
    dataset = artifacts.put_file(preferences)

    seen: list[Envelope] = []
    app, runtime = build_process(settings, [create_app, probe(seen)], title="flywheel-test")
    async with app.router.lifespan_context(app):
        bus = runtime.bus("test")
        await publish_inputs(bus, model, dataset, "pairs", row_count, "preferences")
        await bus.publish(
            TrainingRequested(
                job_id="job-dpo",
                model_name="smollm2",
                dataset=DatasetRef(name="pairs", version=1),
                requested_by="test",
                hyperparameters=Hyperparameters(
                    method="dpo", rank=4, alpha=8, batch_size=4, epochs=1, max_seq_length=128, learning_rate=2e-3
                ),
            )
        )
        await eventually(
            lambda: any(isinstance(e.payload, TrainingCompleted) for e in seen),
            what="training.completed",
            timeout_s=500,
        )
    completed = next(e.payload for e in seen if isinstance(e.payload, TrainingCompleted))
    assert completed.hyperparameters.method == "dpo"
    assert {"reward_accuracy", "reward_margin"} <= set(completed.metrics)
    assert 0.0 <= completed.metrics["reward_accuracy"] <= 1.0
