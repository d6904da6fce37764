"""What the trainer does when events arrive: one function per consumed event."""

from __future__ import annotations

import asyncio

from contracts.envelope import Envelope
from contracts.events import DatasetPublished, ModelRegistered, TrainingRequested
from services.trainer.catalog import EventCarriedCatalog
from services.trainer.service import Trainer


async def when_training_requested_run_job(envelope: Envelope[TrainingRequested], trainer: Trainer) -> None:
    # Queuing is the side effect the offset commit waits for; the job itself runs on the worker, and
    # a redelivered request with the same job_id finds its job already queued.
    await asyncio.to_thread(trainer.submit, envelope.payload, envelope.correlation_id)


async def when_model_registered_remember_it(envelope: Envelope[ModelRegistered], catalog: EventCarriedCatalog) -> None:
    await asyncio.to_thread(catalog.remember_model, envelope.payload)


async def when_dataset_published_remember_it(envelope: Envelope[DatasetPublished], catalog: EventCarriedCatalog) -> None:
    await asyncio.to_thread(catalog.remember_dataset, envelope.payload)
