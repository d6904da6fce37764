"""What the trainer does when events arrive: one function per consumed event, subscribed together as HANDLERS."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from contracts.envelope import Envelope
from contracts.events import AdapterRegistered, DatasetPublished, ModelRegistered, TrainingRequested
from services.runtime.service import Handlers
from services.trainer.catalog import EventCarriedCatalog
from services.trainer.service import Trainer


@dataclass(frozen=True)
class Deps:
    trainer: Trainer
    catalog: EventCarriedCatalog


async def when_training_requested_run_job(envelope: Envelope[TrainingRequested], deps: Deps) -> None:
    # Queuing is the side effect the offset commit waits for; the job itself runs on the worker, and
    # a redelivered request with the same job_id finds its job already queued.
    await asyncio.to_thread(deps.trainer.submit, envelope.payload, envelope.correlation_id)


async def when_model_registered_remember_it(envelope: Envelope[ModelRegistered], deps: Deps) -> None:
    await asyncio.to_thread(deps.catalog.remember_model, envelope.payload)


async def when_dataset_published_remember_it(envelope: Envelope[DatasetPublished], deps: Deps) -> None:
    await asyncio.to_thread(deps.catalog.remember_dataset, envelope.payload)


async def when_adapter_registered_remember_it(envelope: Envelope[AdapterRegistered], deps: Deps) -> None:
    await asyncio.to_thread(deps.catalog.remember_adapter, envelope.payload)


HANDLERS: Handlers[Deps] = {
    TrainingRequested: when_training_requested_run_job,
    ModelRegistered: when_model_registered_remember_it,
    DatasetPublished: when_dataset_published_remember_it,
    AdapterRegistered: when_adapter_registered_remember_it,
}
