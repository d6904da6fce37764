"""The trainer service on the real broker: inputs learned from registry events, a redelivered request is one job."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load_file

from contracts.envelope import Envelope
from contracts.events import (
    AdapterRegistered,
    DatasetPublished,
    DatasetRef,
    Hyperparameters,
    ModelRegistered,
    TrainingCompleted,
    TrainingFailed,
    TrainingRequested,
    TrainingStarted,
)
from contracts.http import Role
from services.runtime.artifacts import ArtifactStore, default_artifact_root
from services.runtime.service import Runtime, Service, build_process
from services.runtime.settings import FlywheelSettings
from services.trainer.app import create_app
from services.trainer.settings import TrainerSettings
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
        runtime.subscribe("probe", TrainingFailed, record)
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
    # Unannounced inputs are waited for 5 s, not a minute: the refused start adapter is one.
    trainer = functools.partial(create_app, settings=TrainerSettings(input_wait_s=5))
    app, runtime = build_process(settings, [trainer, probe(seen)], title="flywheel-test")
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


async def test_a_dpo_request_on_a_published_preference_dataset_trains_and_the_next_goes_on_from_its_adapter(
    settings: FlywheelSettings,
    base_model_dir: Path,  # noqa: F811
    preferences: Path,  # noqa: F811
) -> None:
    """A preference dataset as the registry publishes it (its own validation names the format) trains
    with method dpo through the service's events, as `flywheel ops preference-dataset` then
    `flywheel train submit --method dpo` run it. Once the registry announces the adapter, a request
    naming it as its start adapter goes on training it (SFT then DPO is the same request after an SFT
    job), and one naming a version never announced fails with the reason."""
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
        completed = await ended(seen, "job-dpo", TrainingCompleted)
        assert completed.hyperparameters.method == "dpo"
        assert {"reward_accuracy", "reward_margin"} <= set(completed.metrics)
        assert 0.0 <= completed.metrics["reward_accuracy"] <= 1.0

        await bus.publish(
            AdapterRegistered(
                model_name="smollm2",
                adapter_version=1,
                artifact_uri=completed.artifact_uri,
                artifact_sha256=completed.artifact_sha256,
                training_job_id="job-dpo",
            )
        )
        for job_id, version in (("job-on", 1), ("job-unknown-start", 9)):
            await bus.publish(
                TrainingRequested(
                    job_id=job_id,
                    model_name="smollm2",
                    dataset=DatasetRef(name="pairs", version=1),
                    requested_by="test",
                    # The first job's LoRA shape, which going on with its adapter keeps.
                    hyperparameters=Hyperparameters(
                        method="dpo", rank=4, alpha=8, batch_size=4, epochs=0.5, max_seq_length=128
                    ),
                    start_adapter_version=version,
                )
            )
        went_on = await ended(seen, "job-on", TrainingCompleted)
        refused = await ended(seen, "job-unknown-start", TrainingFailed)
    # It went on from the announced adapter: one step moved its weights a little, where a new adapter's
    # random initialisation would be as far from them as they are large.
    store = ArtifactStore(default_artifact_root(settings.home))
    before, after = (
        load_file(
            str(
                store.materialize(event.artifact_uri, event.artifact_sha256, into_dir=settings.home / name)
                / "adapter_model.safetensors"
            )
        )
        for name, event in (("start", completed), ("went-on", went_on))
    )
    assert before.keys() == after.keys()
    moved = max((after[key] - before[key]).norm() / before[key].norm() for key in before if "lora_A" in key)
    assert moved < 0.2, f"the adapter moved by {moved:.2f} of its size: it did not start from the announced one"
    assert went_on.artifact_sha256 != completed.artifact_sha256
    assert refused.error_type == "invalid_input"
    assert "unknown adapter smollm2 v9 to start from" in refused.reason


async def ended(seen: list[Envelope], job_id: str, kind: type[Any]) -> Any:
    """The job's terminal event of `kind`, once it has arrived."""

    def found() -> Any:
        return next((e.payload for e in seen if isinstance(e.payload, kind) and e.payload.job_id == job_id), None)

    await eventually(lambda: found() is not None, what=f"{kind.event_type} of {job_id}", timeout_s=500)
    return found()
