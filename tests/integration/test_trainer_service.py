"""The trainer's use cases on the real model without Kafka: events out, idempotent submission, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.events import DatasetRef, Hyperparameters, TrainingCompleted, TrainingFailed, TrainingProgress, TrainingRequested, TrainingStarted
from services.runtime.artifacts import ArtifactStore
from services.trainer.catalog import UnknownInput
from services.trainer.service import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore
from tests.fixtures.trainer_model import DEMO_DATA, base_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def publish(self, payload: object, *, correlation_id: str | None = None, event_id: object = None) -> None:
        self.events.append(payload)


class DictCatalog:
    def __init__(self, model: Path, datasets: dict[tuple[str, int], Path]) -> None:
        self._model, self._datasets = model, datasets

    def model_path(self, model_name: str) -> Path:
        if model_name != MODEL:
            raise UnknownInput(f"unknown base model {model_name!r}: register it first (no model.registered event seen)")
        return self._model

    def dataset_path(self, dataset: DatasetRef) -> Path:
        if (dataset.name, dataset.version) not in self._datasets:
            raise UnknownInput(f"unknown dataset {dataset.name} v{dataset.version}")
        return self._datasets[(dataset.name, dataset.version)]


@pytest.fixture
def trainer(tmp_path: Path, base_model_dir: Path) -> tuple[Trainer, RecordingPublisher, Path]:  # noqa: F811
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join((DEMO_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:4]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "hub " * 400}, {"role": "assistant", "content": "ok"}]}) + "\n")
    catalog = DictCatalog(base_model_dir, {("tiny", 1): tiny, ("empty", 1): empty, ("long", 1): long})
    publisher = RecordingPublisher()
    artifacts = tmp_path / "artifacts"
    service = Trainer(JobStore(tmp_path / "jobs.db"), catalog, ArtifactStore(artifacts), publisher, work_root=tmp_path / "jobs", settings=TrainerSettings(progress_every=1, input_wait_s=0))
    return service, publisher, artifacts


def request(job_id: str, model: str = MODEL, dataset: str = "tiny") -> TrainingRequested:
    hp = Hyperparameters(rank=4, alpha=8, batch_size=2, epochs=1, max_seq_length=128, seed=1)
    return TrainingRequested(job_id=job_id, model_name=model, dataset=DatasetRef(name=dataset, version=1), hyperparameters=hp, requested_by="test")


async def test_a_job_reports_started_progress_and_completed_with_a_stored_adapter(trainer, tmp_path: Path) -> None:
    service, publisher, artifacts = trainer
    job, created = service.submit(request("job-1"))
    again, created_again = service.submit(request("job-1"))
    assert created and not created_again and again.job_id == job.job_id
    assert len(service.list()) == 1

    await service.run_job(job)

    kinds = [type(event) for event in publisher.events]
    assert kinds[0] is TrainingStarted and kinds[-1] is TrainingCompleted
    assert kinds.count(TrainingProgress) == 2
    completed = publisher.events[-1]
    assert isinstance(completed, TrainingCompleted)
    files = ArtifactStore(artifacts).materialize(completed.artifact_uri, completed.artifact_sha256, into_dir=tmp_path / "out")
    assert sorted(path.name for path in files.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert service.get("job-1").status == "completed"
    assert not (tmp_path / "jobs" / "job-1").exists()


@pytest.mark.parametrize(
    ("model", "dataset", "reason"),
    [
        ("no-such-model", "tiny", "unknown base model 'no-such-model'"),
        (MODEL, "missing", "unknown dataset missing v1"),
        (MODEL, "empty", "dataset empty.jsonl is empty"),
        (MODEL, "long", "exceed max_seq_length=128 and are rejected, not truncated"),
    ],
)
async def test_bad_input_is_training_failed_with_a_clear_reason_and_no_adapter(trainer, model: str, dataset: str, reason: str) -> None:
    service, publisher, artifacts = trainer
    job, _ = service.submit(request("bad", model=model, dataset=dataset))
    await service.run_job(job)
    failed = publisher.events[-1]
    assert isinstance(failed, TrainingFailed)
    assert failed.error_type == "invalid_input"
    assert reason in failed.reason
    assert not any(isinstance(event, TrainingCompleted) for event in publisher.events)
    assert not artifacts.exists() or not any(artifacts.rglob("*"))
    assert service.get("bad").status == "failed"
