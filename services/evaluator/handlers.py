"""What the evaluator does when events arrive: learn the catalogue, and run evaluations.

Stages, adapters, prompt versions, datasets and base models are learned from the registry's events (event-carried
state), so an evaluation never waits on the registry. Every new adapter version is evaluated
against the model's current production version, or its base model when none is in production.
Handlers only queue evaluations; the worker runs them (see worker.py for why). The store is SQLite:
every call to it goes through asyncio.to_thread, so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from contracts.envelope import Envelope
from contracts.events import (
    AdapterRegistered,
    DatasetPublished,
    DatasetRef,
    EvaluationRequested,
    ModelRegistered,
    ModelTarget,
    PromptPublished,
    Stage,
    StageChanged,
)
from contracts.ids import NAME_MAX_LENGTH
from services.evaluator.service import Evaluator
from services.evaluator.store import DatasetPointer, EvaluatorStore
from services.evaluator.worker import EvaluationWorker
from services.runtime.service import Handlers


@dataclass(frozen=True)
class Deps:
    evaluator: Evaluator
    worker: EvaluationWorker


async def when_evaluation_requested_run(envelope: Envelope[EvaluationRequested], deps: Deps) -> None:
    request = envelope.payload
    # A repeated id (a redelivery, or a request the door already recorded) is queued once.
    await asyncio.to_thread(
        deps.evaluator.store.claim,
        request.evaluation_id,
        request.model_dump(mode="json"),
        correlation_id=envelope.correlation_id,
    )
    deps.worker.kick()


async def when_adapter_registered_evaluate_against_production(
    envelope: Envelope[AdapterRegistered], deps: Deps
) -> None:
    event = envelope.payload
    evaluator, store = deps.evaluator, deps.evaluator.store
    # Refused on arrival (dead-lettered with the reason), not at the evaluation that would load it.
    evaluator.artifacts.check(event.artifact_uri)
    await asyncio.to_thread(
        store.remember_adapter, event.model_name, event.adapter_version, event.artifact_uri, event.artifact_sha256
    )
    golden = await asyncio.to_thread(store.latest_golden, event.model_name)
    candidate = ModelTarget(model_name=event.model_name, adapter_version=event.adapter_version)
    request = EvaluationRequested(
        evaluation_id=f"auto-{event.model_name}-v{event.adapter_version}",
        candidate=candidate,
        baseline=await asyncio.to_thread(evaluator.baseline_for, candidate),
        # Without a golden set the evaluation fails visibly (the name says why) rather than being skipped.
        golden=DatasetRef(name=golden.name, version=golden.version)
        if golden
        else DatasetRef(name=f"no-golden-set-for-{event.model_name}"[:NAME_MAX_LENGTH], version=1),
        requested_by="evaluator:adapter.registered",
    )
    await asyncio.to_thread(
        store.claim, request.evaluation_id, request.model_dump(mode="json"), correlation_id=envelope.correlation_id
    )
    deps.worker.kick()


async def when_stage_changed_track_production(envelope: Envelope[StageChanged], deps: Deps) -> None:
    await asyncio.to_thread(_track_production, deps.evaluator.store, envelope.payload)


def _track_production(store: EvaluatorStore, event: StageChanged) -> None:
    if event.to_stage == Stage.production and event.canary_percent is None:
        store.set_production(event.model_name, event.adapter_version)
    elif event.from_stage == Stage.production and store.production(event.model_name) == event.adapter_version:
        store.set_production(event.model_name, None)


async def when_model_registered_remember_it(envelope: Envelope[ModelRegistered], deps: Deps) -> None:
    event = envelope.payload
    deps.evaluator.artifacts.check(event.artifact_uri)
    await asyncio.to_thread(
        deps.evaluator.store.remember_model, event.model_name, event.artifact_uri, event.artifact_sha256
    )


async def when_dataset_published_remember_it(envelope: Envelope[DatasetPublished], deps: Deps) -> None:
    event = envelope.payload
    deps.evaluator.artifacts.check(event.artifact_uri)
    pointer = DatasetPointer(
        event.dataset_name, event.version, event.split, event.artifact_uri, event.sha256, event.model_name
    )
    await asyncio.to_thread(deps.evaluator.store.remember_dataset, pointer)


async def when_prompt_published_remember_it(envelope: Envelope[PromptPublished], deps: Deps) -> None:
    event = envelope.payload
    await asyncio.to_thread(
        deps.evaluator.store.remember_prompt,
        event.prompt_name,
        event.version,
        event.template,
        event.variables,
        event.labels,
    )


HANDLERS: Handlers[Deps] = {
    ModelRegistered: when_model_registered_remember_it,
    DatasetPublished: when_dataset_published_remember_it,
    StageChanged: when_stage_changed_track_production,
    PromptPublished: when_prompt_published_remember_it,
    AdapterRegistered: when_adapter_registered_evaluate_against_production,
    EvaluationRequested: when_evaluation_requested_run,
}
