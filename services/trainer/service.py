"""The trainer's use cases: accept jobs (idempotent by job_id), run them one at a time, report each step.

Imports neither Kafka nor FastAPI: events leave through a `Publisher` (the runtime's EventBus).
A job's state lives in the JobStore before any event is published about it, so a worker killed at
any point finds its job again on restart: `running` jobs resume from their checkpoint first.
Progress events are best effort (the next one supersedes a lost one); the terminal event is staged
with the job's end in one transaction and relayed until the broker acknowledges it, retrying with
backoff through an outage and again at the next start. Its event_id is derived from the job, so a
republished one is deduplicated by consumers.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError

from contracts.envelope import Envelope, wrap
from contracts.events import (
    SpanKind,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
)
from contracts.ids import JobId
from services.runtime.artifacts import ArtifactError, ArtifactStore
from services.runtime.outbox import OutboxRelay
from services.runtime.paths import PathOutsideRoot, under
from services.runtime.spans import RetrainingTrace, publish_span
from services.trainer.catalog import Catalog, UnknownInput
from services.trainer.engine import Progress, TrainingError, TrainingJob, TrainingPaused, TrainingPlan, train
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobRecord, JobStore, OutboxEvent

log = logging.getLogger("flywheel.trainer")

PRODUCER = "trainer"
SERVICE_NAME = "flywheel-trainer"
_JOB_ID = TypeAdapter(JobId)


class StoppedWaitingForInputs(Exception):
    """The trainer began to stop while a job waited for its model or dataset to be announced."""


class Publisher(Protocol):
    async def publish(
        self, payload: Any, *, correlation_id: str | None = None, event_id: uuid.UUID | None = None
    ) -> Any: ...

    async def publish_envelope(self, envelope: Envelope) -> None: ...


class Trainer:
    def __init__(
        self,
        store: JobStore,
        catalog: Catalog,
        artifacts: ArtifactStore,
        publisher: Publisher,
        *,
        work_root: Path,
        settings: TrainerSettings,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._artifacts = artifacts
        self._publisher = publisher
        self._work_root = work_root
        self._settings = settings
        self._wake = asyncio.Event()
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        # Set by stop(): the training thread checks it between steps, saves a checkpoint and returns, so a
        # stopping process is not held until the job ends (a thread cannot be cancelled from outside).
        self._stopping = threading.Event()
        self._worker: asyncio.Task | None = None
        # Only this worker stages terminal events, so the relay need not poll: it runs when kicked, and
        # retries with backoff through a broker outage.
        self._relay = OutboxRelay(
            store,
            publisher,
            name="trainer-outbox-relay",
            interval_s=None,
            retry_initial_s=settings.publish_retry_initial_s,
            retry_max_s=settings.publish_retry_max_s,
            drain_timeout_s=settings.stop_drain_s,
        )

    def submit(self, request: TrainingRequested, correlation_id: str | None = None) -> tuple[JobRecord, bool]:
        """Queue a job; a job_id seen before returns the existing job and starts nothing."""
        job, created = self._store.add(
            JobRecord(
                job_id=request.job_id,
                model_name=request.model_name,
                dataset=request.dataset,
                hyperparameters=request.hyperparameters,
                status="queued",
                # A job asked for without a correlation id (the door, an app) is followed by its own id: its events and
                # its span still share one trace from training to the evaluation of what it trained.
                correlation_id=correlation_id or request.job_id,
                requested_by=request.requested_by,
                start_adapter_version=request.start_adapter_version,
                preference_dataset=request.preference_dataset,
            )
        )
        if created:
            self._wake.set()
        return job, created

    def get(self, job_id: str) -> JobRecord | None:
        return self._store.get(job_id)

    def list(self, limit: int = 100) -> list[JobRecord]:
        return self._store.list(limit)

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job at once, a running one at its next step; finished jobs stay as they are."""
        job = self._store.get(job_id)
        if job is None or job.status not in ("queued", "running"):
            return job
        with self._cancel_lock:
            self._cancelled.add(job_id)
        if job.status == "queued":
            await self._fail(job, TrainingError("cancelled", "cancelled before it started"))
        return self._store.get(job_id)

    async def start(self) -> None:
        # The relay starts first: terminal events a previous worker staged but never sent go out now.
        await self._relay.start()
        self._worker = asyncio.create_task(self._run_forever(), name="trainer-worker")

    async def stop(self) -> None:
        self._stopping.set()
        # An idle worker sleeps on _wake, not _stopping: without this, stop() waited stop_pause_s for nothing.
        self._wake.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), self._settings.stop_pause_s)
            except TimeoutError:
                log.warning(
                    "the training step in flight did not end within %.0fs; stopping without waiting for it",
                    self._settings.stop_pause_s,
                )
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        # The relay drains what is staged on its way out (for at most stop_drain_s): the process stops
        # its services before it disconnects the broker. A broker that is down leaves it staged.
        await self._relay.stop()

    async def relay_once(self) -> int:
        """Publish the staged terminal events, oldest first, marking each sent once acknowledged; how many were sent."""
        return await self._relay.relay_once()

    async def _run_forever(self) -> None:
        while not self._stopping.is_set():
            job = await asyncio.to_thread(self._store.next_runnable)
            if job is None:
                self._wake.clear()
                # stop() may have set _wake while next_runnable ran; the clear above must not hide it.
                if not self._stopping.is_set():
                    await self._wake.wait()
                continue
            await self.run_job(job)

    async def run_job(self, job: JobRecord) -> None:
        """Run one job to its end and publish what happened; never raises for a job's own failure."""
        loop = asyncio.get_running_loop()
        try:
            work_dir = under(self._work_root, job.job_id)
            _JOB_ID.validate_python(job.job_id)
        except (PathOutsideRoot, ValidationError) as refused:
            # Only a job stored before ids were constrained gets here (the contract refuses such ids, so
            # no training.failed could carry it either): it ends failed, and nothing on disk is touched.
            reason = f"job id {job.job_id[:100]!r} refused: {refused}"
            log.warning("training job %s", reason)
            self._store.update(job.job_id, status="failed", error=reason, error_type="invalid_input")
            return
        self._store.update(job.job_id, status="running")
        # A job resumed after a restart is timed from its resumption: the span shows what this worker ran.
        started_at = datetime.now(UTC)
        try:
            model_path, dataset_path, start_adapter, preference_path = await self._resolve(job)
        except StoppedWaitingForInputs:
            log.info("training job %s: stopped while waiting for its inputs; it resumes at the next start", job.job_id)
            return
        except (UnknownInput, ArtifactError) as error:
            await self._fail(job, TrainingError("invalid_input", str(error)), started_at)
            return

        def publish_soon(payload: Any) -> None:
            # Called from the training thread: progress is reported without waiting for Kafka.
            asyncio.run_coroutine_threadsafe(self._publish(payload, job), loop)

        def on_start(plan: TrainingPlan) -> None:
            self._store.update(job.job_id, total_steps=plan.total_steps, step=plan.resumed_from_step)
            publish_soon(
                TrainingStarted(
                    job_id=job.job_id,
                    model_name=job.model_name,
                    total_steps=plan.total_steps,
                    resumed_from_step=plan.resumed_from_step,
                    device=plan.device,
                )
            )

        def on_progress(progress: Progress) -> None:
            self._store.update(job.job_id, step=progress.step, loss=progress.loss)
            publish_soon(TrainingProgress(job_id=job.job_id, model_name=job.model_name, **progress.__dict__))

        spec = TrainingJob(
            model_path=model_path,
            dataset_path=dataset_path,
            hyperparameters=job.hyperparameters,
            work_dir=work_dir,
            start_adapter=start_adapter,
            preference_path=preference_path,
            checkpoint_every=self._settings.checkpoint_every,
            threads=self._settings.torch_threads,
            log_every=self._settings.progress_every,
            on_start=on_start,
            on_progress=on_progress,
            should_cancel=lambda: job.job_id in self._cancelled,
            should_pause=self._stopping.is_set,
        )
        try:
            result = await asyncio.to_thread(train, spec)
            ref = await asyncio.to_thread(self._artifacts.put_directory, result.adapter_dir)
        except TrainingPaused as paused:
            log.info(
                "training job %s paused at step %d by the stopping worker; it resumes there at the next start",
                job.job_id,
                paused.step,
            )
            return
        except TrainingError as error:
            await self._fail(job, error, started_at)
            return
        except Exception as error:  # noqa: BLE001 - a job's crash must become training.failed, not kill the worker
            log.exception("training job %s crashed", job.job_id)
            await self._fail(job, TrainingError("internal", f"{type(error).__name__}: {error}"), started_at)
            return
        completed = TrainingCompleted(
            job_id=job.job_id,
            model_name=job.model_name,
            dataset=job.dataset,
            hyperparameters=job.hyperparameters,
            artifact_uri=ref.uri,
            artifact_sha256=ref.sha256,
            metrics=result.metrics,
            preference_dataset=job.preference_dataset,
        )
        await self._finish(
            job,
            completed,
            status="completed",
            step=result.total_steps,
            artifact_uri=ref.uri,
            artifact_sha256=ref.sha256,
        )
        shutil.rmtree(work_dir, ignore_errors=True)
        await self._send_staged()
        await self._publish_span(job, completed, started_at)

    async def _resolve(self, job: JobRecord) -> tuple[Path, Path, Path | None, Path | None]:
        # The registry's events travel on other topics than the request: a model or dataset published
        # just before the request may not have been consumed yet, so unknown inputs are retried a while.
        deadline = asyncio.get_running_loop().time() + self._settings.input_wait_s
        while True:
            try:
                model_path = await asyncio.to_thread(self._catalog.model_path, job.model_name)
                dataset_path = await asyncio.to_thread(self._catalog.dataset_path, job.dataset)
                start_adapter = (
                    None
                    if job.start_adapter_version is None
                    else await asyncio.to_thread(self._catalog.adapter_path, job.model_name, job.start_adapter_version)
                )
                preference_path = (
                    None
                    if job.preference_dataset is None
                    else await asyncio.to_thread(self._catalog.dataset_path, job.preference_dataset)
                )
                return model_path, dataset_path, start_adapter, preference_path
            except UnknownInput:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                if self._stopping.is_set():
                    # A stopping trainer does not sit out the wait (input_wait_s): the job stays `running`
                    # and its inputs are looked up again when the next start resumes it.
                    raise StoppedWaitingForInputs(job.job_id) from None
                await asyncio.sleep(1.0)

    async def _fail(self, job: JobRecord, error: TrainingError, started_at: datetime | None = None) -> None:
        status = "cancelled" if error.error_type == "cancelled" else "failed"
        failed = TrainingFailed(
            job_id=job.job_id, model_name=job.model_name, reason=error.reason, error_type=error.error_type
        )
        await self._finish(job, failed, status=status, error=error.reason, error_type=error.error_type)
        # No partial adapter survives a failed job: its checkpoints and work directory go with it. Only
        # a directory inside the work root is ever removed, whatever the job id holds.
        try:
            shutil.rmtree(under(self._work_root, job.job_id), ignore_errors=True)
        except PathOutsideRoot as refused:
            log.warning("training job %r: work directory not removed: %s", job.job_id, refused)
        await self._send_staged()
        await self._publish_span(job, failed, started_at)

    async def _publish_span(
        self, job: JobRecord, outcome: TrainingCompleted | TrainingFailed, started_at: datetime | None
    ) -> None:
        """The job's span in its retraining's trace; a job cancelled before it started is a span of no length."""
        ended_at = datetime.now(UTC)
        attributes = {
            "flywheel.job_id": job.job_id,
            "flywheel.base_model": job.model_name,
            "flywheel.dataset": f"{job.dataset.name}:v{job.dataset.version}",
            "flywheel.requested_by": job.requested_by,
            **(
                {}
                if job.preference_dataset is None
                else {"flywheel.preference_dataset": f"{job.preference_dataset.name}:v{job.preference_dataset.version}"}
            ),
            "flywheel.hyperparameters": job.hyperparameters.model_dump_json(),
        }
        stored = await asyncio.to_thread(self._store.get, job.job_id)
        if stored is not None and stored.total_steps:
            attributes["flywheel.steps"] = f"{stored.step}/{stored.total_steps}"
        if isinstance(outcome, TrainingCompleted):
            attributes["flywheel.artifact_sha256"] = outcome.artifact_sha256
            attributes.update({f"flywheel.metric.{name}": f"{value:g}" for name, value in outcome.metrics.items()})
            error = None
        else:
            attributes["flywheel.error_type"] = outcome.error_type
            error = outcome.reason
        correlation_id = job.correlation_id or job.job_id
        span = RetrainingTrace(correlation_id).span(
            f"training/{job.job_id}",
            name=f"train {job.job_id}",
            kind=SpanKind.chain,
            service_name=SERVICE_NAME,
            started_at=started_at or ended_at,
            ended_at=ended_at,
            error=error,
            model_name=job.model_name,
            attributes=attributes,
        )
        await publish_span(self._publisher.publish, span, correlation_id=correlation_id)

    async def _finish(self, job: JobRecord, payload: TrainingCompleted | TrainingFailed, **fields: object) -> None:
        # The event id is a function of the job and its outcome: a job finished again after a crash stages nothing new.
        event_id = uuid.uuid5(
            uuid.NAMESPACE_URL, f"flywheel-trainer/{job.job_id}/{payload.event_type.rsplit('.', 1)[-1]}"
        )
        envelope = wrap(payload, producer=PRODUCER, correlation_id=job.correlation_id, event_id=event_id)
        staged = OutboxEvent(
            event_id=str(event_id), event_type=envelope.event_type, envelope=envelope.model_dump_json()
        )
        await asyncio.to_thread(self._store.finish, job.job_id, staged, **fields)

    async def _send_staged(self) -> None:
        try:
            await self.relay_once()
        except Exception as error:  # noqa: BLE001 - staged, not lost: the relay retries with backoff
            log.warning("terminal event not published yet (%s: %s); the relay will retry", type(error).__name__, error)
            self._relay.kick()

    async def _publish(self, payload: Any, job: JobRecord) -> None:
        try:
            await self._publisher.publish(payload, correlation_id=job.correlation_id)
        except Exception as error:  # noqa: BLE001 - progress is best effort: the next event supersedes it, the job's state stays readable over HTTP
            log.warning(
                "could not publish %s for job %s (%s: %s)",
                type(payload).__name__,
                job.job_id,
                type(error).__name__,
                error,
            )
