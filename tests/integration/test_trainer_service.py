"""The trainer's use cases on the real model without Kafka: events out, idempotent submission, bad input refused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from contracts.envelope import Envelope
from contracts.events import (
    DatasetRef,
    Hyperparameters,
    SpanKind,
    SpanLogged,
    SpanStatus,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
)
from services.runtime.artifacts import ArtifactStore
from services.runtime.spans import RetrainingTrace
from services.trainer.catalog import UnknownInput
from services.trainer.service import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore
from tests.fixtures.trainer_model import DEMO_DATA, base_model_dir  # noqa: F401 - fixture
from tests.support import eventually

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[object] = []
        self.spans: list[SpanLogged] = []

    async def publish(self, payload: object, *, correlation_id: str | None = None, event_id: object = None) -> None:
        # A job's span goes to its trace, beside the job's events: kept apart, `events` is what the job reported.
        if isinstance(payload, SpanLogged):
            self.spans.append(payload)
        else:
            self.events.append(payload)

    async def publish_envelope(self, envelope: Envelope) -> None:
        self.events.append(envelope.payload)


class BrokerDownPublisher(RecordingPublisher):
    """Refuses the first `failures` terminal events, as a producer does while the broker is unreachable."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def publish_envelope(self, envelope: Envelope) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker unreachable")
        await super().publish_envelope(envelope)


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
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def trainer(
    tmp_path: Path, base_model_dir: Path, publisher: RecordingPublisher
) -> tuple[Trainer, RecordingPublisher, Path]:  # noqa: F811
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join((DEMO_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:4]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hub " * 400}, {"role": "assistant", "content": "ok"}]})
        + "\n"
    )
    catalog = DictCatalog(base_model_dir, {("tiny", 1): tiny, ("empty", 1): empty, ("long", 1): long})
    artifacts = tmp_path / "artifacts"
    service = Trainer(
        JobStore(tmp_path / "jobs.db"),
        catalog,
        ArtifactStore(artifacts),
        publisher,
        work_root=tmp_path / "jobs",
        settings=TrainerSettings(progress_every=1, input_wait_s=0),
    )
    return service, publisher, artifacts


def request(job_id: str, model: str = MODEL, dataset: str = "tiny") -> TrainingRequested:
    hp = Hyperparameters(rank=4, alpha=8, batch_size=2, epochs=1, max_seq_length=128, seed=1)
    return TrainingRequested(
        job_id=job_id,
        model_name=model,
        dataset=DatasetRef(name=dataset, version=1),
        hyperparameters=hp,
        requested_by="test",
    )


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
    files = ArtifactStore(artifacts).materialize(
        completed.artifact_uri, completed.artifact_sha256, into_dir=tmp_path / "out"
    )
    assert sorted(path.name for path in files.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert service.get("job-1").status == "completed"
    assert not (tmp_path / "jobs" / "job-1").exists()
    # Asked for without a correlation id, the job is followed by its own id: the trace that id derives.
    [span] = publisher.spans
    trace = RetrainingTrace("job-1")
    assert (span.trace_id, span.span_id, span.parent_span_id) == (
        trace.trace_id,
        trace.span_id("training/job-1"),
        trace.root_span_id,
    )
    assert (span.name, span.kind, span.status, span.model_name) == ("train job-1", SpanKind.chain, SpanStatus.ok, MODEL)
    assert span.attributes["flywheel.steps"] == "2/2" and span.attributes["flywheel.dataset"] == "tiny:v1"
    assert span.attributes["flywheel.artifact_sha256"] == completed.artifact_sha256
    assert float(span.attributes["flywheel.metric.final_loss"]) == pytest.approx(
        completed.metrics["final_loss"], rel=1e-5
    )


@pytest.mark.parametrize(
    ("model", "dataset", "reason"),
    [
        ("no-such-model", "tiny", "unknown base model 'no-such-model'"),
        (MODEL, "missing", "unknown dataset missing v1"),
        (MODEL, "empty", "dataset empty.jsonl is empty"),
        (MODEL, "long", "exceed max_seq_length=128 and are rejected, not truncated"),
    ],
)
async def test_bad_input_is_training_failed_with_a_clear_reason_and_no_adapter(
    trainer, model: str, dataset: str, reason: str
) -> None:
    service, publisher, artifacts = trainer
    job, _ = service.submit(request("bad", model=model, dataset=dataset))
    await service.run_job(job)
    failed = publisher.events[-1]
    assert isinstance(failed, TrainingFailed)
    assert failed.error_type == "invalid_input"
    assert reason in failed.reason
    [span] = publisher.spans
    assert (span.status, span.error, span.attributes["flywheel.error_type"]) == (
        SpanStatus.error,
        failed.reason,
        "invalid_input",
    )
    assert not any(isinstance(event, TrainingCompleted) for event in publisher.events)
    assert not artifacts.exists() or not any(artifacts.rglob("*"))
    assert service.get("bad").status == "failed"


@pytest.mark.parametrize("publisher", [BrokerDownPublisher(failures=2)], ids=["broker-down-twice"])
async def test_a_terminal_event_the_broker_refused_stays_staged_and_is_published_once_later(trainer) -> None:
    # A narrow test of the retry bookkeeping with a refusing publisher; test_trainer_outbox.py shows it on a real broker that goes down.
    service, publisher, _ = trainer
    job, _ = service.submit(request("lost", model="no-such-model"))
    await service.run_job(job)
    assert service.get("lost").status == "failed"
    assert not any(isinstance(event, TrainingFailed) for event in publisher.events)
    with pytest.raises(ConnectionError):
        await service.relay_once()
    assert await service.relay_once() == 1
    assert await service.relay_once() == 0
    failed = [event for event in publisher.events if isinstance(event, TrainingFailed)]
    assert len(failed) == 1 and "unknown base model" in failed[0].reason


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError()],
    ids=["torch-cuda-oom", "host-memory-error"],
)
async def test_out_of_memory_is_training_failed_naming_what_to_lower_and_no_adapter(
    trainer, error: BaseException, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # There is no GPU here to run out of, so the first training step raises what torch raises when it does.
    def out_of_memory(*_: object) -> None:
        raise error

    monkeypatch.setattr("services.trainer.engine.assistant_loss", out_of_memory)
    service, publisher, artifacts = trainer
    job, _ = service.submit(request("oom"))
    await service.run_job(job)
    failed = publisher.events[-1]
    assert isinstance(failed, TrainingFailed)
    assert failed.error_type == "out_of_memory"
    assert (
        "out of memory with batch_size=2, max_seq_length=128, rank=4: lower batch_size or max_seq_length"
        in failed.reason
    )
    assert not any(isinstance(event, TrainingCompleted) for event in publisher.events)
    assert not artifacts.exists() or not any(artifacts.rglob("*"))
    assert not (tmp_path / "jobs" / "oom").exists()
    assert service.get("oom").status == "failed"


async def test_a_stopping_worker_pauses_its_job_at_a_checkpoint_and_the_next_worker_resumes_it(
    tmp_path: Path, base_model_dir: Path
) -> None:  # noqa: F811
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join((DEMO_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:4]))
    catalog = DictCatalog(base_model_dir, {("tiny", 1): tiny})
    settings = TrainerSettings(progress_every=1, input_wait_s=0, checkpoint_every=100)

    def worker(publisher: RecordingPublisher) -> Trainer:
        return Trainer(
            JobStore(tmp_path / "jobs.db"),
            catalog,
            ArtifactStore(tmp_path / "artifacts"),
            publisher,
            work_root=tmp_path / "jobs",
            settings=settings,
        )

    hp = Hyperparameters(rank=4, alpha=8, batch_size=2, epochs=4, max_seq_length=128, seed=1)  # 8 steps
    first_events = RecordingPublisher()
    first = worker(first_events)
    first.submit(
        TrainingRequested(
            job_id="job-paused",
            model_name=MODEL,
            dataset=DatasetRef(name="tiny", version=1),
            hyperparameters=hp,
            requested_by="test",
        )
    )
    await first.start()
    await eventually(lambda: (first.get("job-paused").step or 0) >= 2, timeout_s=300, what="two training steps")
    await first.stop()  # returns after the step in flight, not after the job: 8 steps would take much longer
    paused = first.get("job-paused")
    assert paused.status == "running" and paused.step < 8, paused
    assert not any(isinstance(event, TrainingCompleted | TrainingFailed) for event in first_events.events)

    second_events = RecordingPublisher()
    second = worker(second_events)
    await second.start()
    try:
        await eventually(
            lambda: second.get("job-paused").status == "completed", timeout_s=300, what="the resumed job to complete"
        )
    finally:
        await second.stop()
    started = next(event for event in second_events.events if isinstance(event, TrainingStarted))
    assert started.resumed_from_step >= 2, started
    assert isinstance(second_events.events[-1], TrainingCompleted)


async def test_a_stopping_trainer_does_not_sit_out_a_jobs_wait_for_its_inputs(tmp_path: Path) -> None:
    # The model is never announced: the job waits for it (input_wait_s), and a stop must not wait that out.
    events = RecordingPublisher()
    trainer = Trainer(
        JobStore(tmp_path / "jobs.db"),
        DictCatalog(tmp_path / "no-model", {}),
        ArtifactStore(tmp_path / "artifacts"),
        events,
        work_root=tmp_path / "jobs",
        settings=TrainerSettings(input_wait_s=600, stop_pause_s=120),
    )
    trainer.submit(request("job-waiting", model="not-announced-yet"))
    await trainer.start()
    await eventually(lambda: trainer.get("job-waiting").status == "running", timeout_s=30, what="the job to start")
    started = time.monotonic()
    await trainer.stop()
    assert time.monotonic() - started < 10, "stop waited for the job's inputs"
    # Not failed: the job resumes, and looks its inputs up again, at the next start.
    assert trainer.get("job-waiting").status == "running"
    assert not any(isinstance(event, TrainingFailed) for event in events.events)
