"""Runs queued evaluations one at a time, off the Kafka consumer.

An evaluation takes minutes on a CPU; run inside a handler it would hold its partition and outlive
the consumer's poll interval (the group would evict it, and the request would be redelivered and
run again). So a handler only records the request (SQLite, durable, then the offset is committed)
and this worker takes it from there; a process that stops mid-evaluation finds it `running` on
restart and runs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from contracts.events import SPAN_TEXT_MAX, EvaluationCompleted, EvaluationRequested, SpanKind, SpanLogged
from services.evaluator.service import Evaluator, label
from services.runtime.spans import RetrainingTrace, publish_span

log = logging.getLogger("flywheel.evaluator.worker")

Publish = Callable[..., Awaitable[object]]
SERVICE_NAME = "flywheel-evaluator"


class EvaluationWorker:
    def __init__(self, evaluator: Evaluator, publish: Publish, *, poll_s: float = 5.0) -> None:
        self._evaluator = evaluator
        self._publish = publish
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        """Something was queued: look now instead of at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="evaluator-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        store = self._evaluator.store
        while True:
            record = await asyncio.to_thread(store.next_pending)
            if record is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_s)
                continue
            request = EvaluationRequested.model_validate(record.request)
            await asyncio.to_thread(store.set_status, request.evaluation_id, "running")
            started_at = datetime.now(UTC)
            try:
                result = await self._evaluator.run(request)
            except Exception as error:  # noqa: BLE001 - an unforeseen failure ends this evaluation visibly, not the worker
                log.exception("evaluation %s failed unexpectedly", request.evaluation_id)
                message = f"internal error: {type(error).__name__}: {error}"
                result = EvaluationCompleted(
                    evaluation_id=request.evaluation_id,
                    candidate=request.candidate,
                    baseline=request.baseline,
                    golden=request.golden,
                    passed=False,
                    reasons=[f"FAIL evaluation could not run: {message}"],
                    gate_policy="n/a",
                    status="failed",
                    error=message,
                )
            # Published before it is recorded as finished: a crash between the two runs it again and
            # publishes it twice (consumers dedupe by evaluation_id), rather than never.
            await self._publish(result, correlation_id=record.correlation_id)
            # An evaluation asked for without a correlation id is followed by its own id (a trace of its own).
            correlation_id = record.correlation_id or request.evaluation_id
            span = evaluation_span(result, correlation_id, started_at, datetime.now(UTC))
            await publish_span(self._publish, span, correlation_id=correlation_id)
            await asyncio.to_thread(
                store.set_status, request.evaluation_id, result.status, result.model_dump(mode="json")
            )


def evaluation_span(
    result: EvaluationCompleted, correlation_id: str, started_at: datetime, ended_at: datetime
) -> SpanLogged:
    """An evaluation's span in its retraining's trace: the gate's verdict and each metric's means as attributes.
    A gate that failed is an outcome (status ok); only an evaluation that could not run is an error."""
    attributes = {
        "flywheel.evaluation_id": result.evaluation_id,
        "flywheel.candidate": label(result.candidate),
        "flywheel.golden": f"{result.golden.name}:v{result.golden.version}",
        "flywheel.gate.passed": str(result.passed).lower(),
        "flywheel.gate.policy": result.gate_policy,
    }
    if result.baseline is not None:
        attributes["flywheel.baseline"] = label(result.baseline)
    for metric in result.metrics:
        attributes[f"flywheel.score.{metric.metric}.candidate"] = f"{metric.candidate:g}"
        if metric.baseline is not None:
            attributes[f"flywheel.score.{metric.metric}.baseline"] = f"{metric.baseline:g}"
    if result.report_uri:
        attributes["flywheel.report_uri"] = result.report_uri
    return RetrainingTrace(correlation_id).span(
        f"evaluation/{result.evaluation_id}",
        name=f"evaluate {result.evaluation_id}",
        kind=SpanKind.evaluator,
        service_name=SERVICE_NAME,
        started_at=started_at,
        ended_at=ended_at,
        error=(result.error or "failed") if result.status == "failed" else None,
        model_name=result.candidate.model_name,
        adapter_version=result.candidate.adapter_version,
        # The gate's reasons, one line each, are what a reader of the trace wants to see of its verdict.
        output_text="\n".join(result.reasons)[:SPAN_TEXT_MAX],
        attributes=attributes,
    )
