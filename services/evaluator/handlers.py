"""What the evaluator does when events arrive: learn the catalogue, and run evaluations.

Stages, adapters, datasets and base models are learned from the registry's events (event-carried
state), so an evaluation never waits on the registry. Every new adapter version is evaluated
against the model's current production version, or its base model when none is in production.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from contracts.envelope import Envelope
from contracts.events import (
    AdapterRegistered,
    DatasetPublished,
    DatasetRef,
    EvaluationCompleted,
    EvaluationRequested,
    ModelRegistered,
    ModelTarget,
    Stage,
    StageChanged,
)
from services.evaluator.service import Evaluator
from services.evaluator.store import DatasetPointer

log = logging.getLogger("flywheel.evaluator.handlers")

Publish = Callable[..., Awaitable[object]]
FINISHED = ("completed", "failed")


async def run_and_publish(evaluator: Evaluator, request: EvaluationRequested, publish: Publish, *, correlation_id: str | None) -> EvaluationCompleted | None:
    """Run `request` unless it already finished (a redelivery), record it, and publish the result."""
    store = evaluator.store
    store.claim(request.evaluation_id, request.model_dump(mode="json"))
    record = store.evaluation(request.evaluation_id)
    if record is not None and record.status in FINISHED:
        log.info("evaluation %s already %s; not run again", request.evaluation_id, record.status)
        return None
    store.set_status(request.evaluation_id, "running")
    result = await evaluator.run(request)
    # Published before it is recorded as finished: a crash between the two reruns the evaluation
    # and publishes it again (consumers dedupe by evaluation_id), instead of never publishing it.
    await publish(result, correlation_id=correlation_id)
    store.set_status(request.evaluation_id, result.status, result.model_dump(mode="json"))
    return result


def when_evaluation_requested_run(evaluator: Evaluator, publish: Publish):
    async def handle(envelope: Envelope[EvaluationRequested]) -> None:
        await run_and_publish(evaluator, envelope.payload, publish, correlation_id=envelope.correlation_id)

    return handle


def when_adapter_registered_evaluate_against_production(evaluator: Evaluator, publish: Publish):
    async def handle(envelope: Envelope[AdapterRegistered]) -> None:
        event = envelope.payload
        store = evaluator.store
        await asyncio.to_thread(store.remember_adapter, event.model_name, event.adapter_version, event.artifact_uri, event.artifact_sha256)
        golden = store.latest_golden(event.model_name)
        candidate = ModelTarget(model_name=event.model_name, adapter_version=event.adapter_version)
        request = EvaluationRequested(
            evaluation_id=f"auto-{event.model_name}-v{event.adapter_version}",
            candidate=candidate,
            baseline=evaluator.baseline_for(candidate),
            # Without a golden set the evaluation fails visibly (the name says why) rather than being skipped.
            golden=DatasetRef(name=golden.name, version=golden.version) if golden else DatasetRef(name=f"no-golden-set-for-{event.model_name}", version=1),
            requested_by="evaluator:adapter.registered",
        )
        await run_and_publish(evaluator, request, publish, correlation_id=envelope.correlation_id)

    return handle


def when_stage_changed_track_production(evaluator: Evaluator):
    async def handle(envelope: Envelope[StageChanged]) -> None:
        event = envelope.payload
        store = evaluator.store
        if event.to_stage == Stage.production and event.canary_percent is None:
            store.set_production(event.model_name, event.adapter_version)
        elif event.from_stage == Stage.production and store.production(event.model_name) == event.adapter_version:
            store.set_production(event.model_name, None)

    return handle


def when_model_registered_remember_it(evaluator: Evaluator):
    async def handle(envelope: Envelope[ModelRegistered]) -> None:
        event = envelope.payload
        evaluator.store.remember_model(event.model_name, event.artifact_uri, event.artifact_sha256)

    return handle


def when_dataset_published_remember_it(evaluator: Evaluator):
    async def handle(envelope: Envelope[DatasetPublished]) -> None:
        event = envelope.payload
        evaluator.store.remember_dataset(DatasetPointer(event.dataset_name, event.version, event.split, event.artifact_uri, event.sha256, event.model_name))

    return handle
