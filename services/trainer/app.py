"""The trainer as a service: job store, catalog, artifact store, worker, handlers and door, wired together."""

from __future__ import annotations

import asyncio


from services.runtime.auth import Authenticator
from services.runtime.service import Runtime, Service
from services.trainer.api import create_router
from services.trainer.catalog import EventCarriedCatalog
from services.trainer.handlers import HANDLERS, Deps
from services.trainer.service import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore


def create_app(runtime: Runtime, settings: TrainerSettings) -> Service:
    home = runtime.home / "trainer"
    artifacts = runtime.artifacts
    store = JobStore(home / "jobs.db")
    catalog = EventCarriedCatalog(home / "catalog.db", artifacts, home / "inputs")
    trainer = Trainer(store, catalog, artifacts, runtime.bus("trainer"), work_root=home / "jobs", settings=settings)
    runtime.subscribe_all("trainer", HANDLERS, Deps(trainer, catalog))

    async def stop() -> None:
        await trainer.stop()
        await asyncio.to_thread(store.close)
        await asyncio.to_thread(catalog.close)

    return Service(
        name="trainer",
        api=create_router(trainer, Authenticator.for_settings(runtime.settings)),
        on_start=[trainer.start],
        on_stop=[stop],
    )
