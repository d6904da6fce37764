"""The trainer as a service: job store, catalog, artifact store, worker, handlers and door, wired together."""

from __future__ import annotations

import asyncio

import torch

from contracts.events import DatasetPublished, ModelRegistered, TrainingRequested
from services.runtime.auth import Authenticator
from services.runtime.service import Runtime, Service
from services.trainer.api import build_router
from services.trainer.catalog import EventCarriedCatalog
from services.trainer.handlers import when_dataset_published_remember_it, when_model_registered_remember_it, when_training_requested_run_job
from services.trainer.service import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore


def create_app(runtime: Runtime, settings: TrainerSettings) -> Service:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    home = runtime.home / "trainer"
    artifacts = runtime.artifacts
    store = JobStore(home / "jobs.db")
    catalog = EventCarriedCatalog(home / "catalog.db", artifacts, home / "inputs")
    trainer = Trainer(store, catalog, artifacts, runtime.bus("trainer"), work_root=home / "jobs", settings=settings)

    async def on_training_requested(envelope) -> None:  # noqa: ANN001 - typed by the subscription
        await when_training_requested_run_job(envelope, trainer)

    async def on_model_registered(envelope) -> None:  # noqa: ANN001
        await when_model_registered_remember_it(envelope, catalog)

    async def on_dataset_published(envelope) -> None:  # noqa: ANN001
        await when_dataset_published_remember_it(envelope, catalog)

    runtime.subscribe("trainer", TrainingRequested, on_training_requested)
    runtime.subscribe("trainer", ModelRegistered, on_model_registered)
    runtime.subscribe("trainer", DatasetPublished, on_dataset_published)

    async def stop() -> None:
        await trainer.stop()
        await asyncio.to_thread(store.close)
        await asyncio.to_thread(catalog.close)

    return Service(name="trainer", api=build_router(trainer, Authenticator.for_settings(runtime.settings)), on_start=[trainer.start], on_stop=[stop])
