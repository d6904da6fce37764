"""The registry as a service: store, artifact store, outbox relay, handlers and door, wired together."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter

from services.registry.api import create_router, dataset_body_limit
from services.registry.console import create_console_router
from services.registry.handlers import HANDLERS
from services.registry.outbox import OutboxRelay
from services.registry.service import Registry
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore
from services.runtime.auth import (
    Authenticator,
    KeyStore,
    LocalKeys,
    check_bootstrap_key,
    key_pepper,
    registry_database_url,
)
from services.runtime.console import Section
from services.runtime.service import Runtime, Service

log = logging.getLogger("flywheel.registry")


def create_app(runtime: Runtime, settings: RegistrySettings) -> Service:
    # Refused here, before anything starts: a short bootstrap key, or a server database without a pepper.
    bootstrap_key = check_bootstrap_key(runtime.settings.bootstrap_admin_key)
    pepper = key_pepper(runtime.settings)
    store = RegistryStore(registry_database_url(runtime.settings))
    artifacts = runtime.artifacts
    relay = OutboxRelay(store, runtime.bus("registry"), interval_s=settings.outbox_interval_s)
    registry = Registry(
        store, artifacts, max_dataset_bytes=settings.max_dataset_bytes, on_commit=relay.kick, key_pepper=pepper
    )
    keys = KeyStore(store.engine, pepper)
    auth = Authenticator(keys)
    # The other doors of this process (flywheel up) check keys against this store, not a second connection.
    LocalKeys.register(store.url, keys)

    runtime.subscribe_all("registry", HANDLERS, registry.adapters)

    # The JSON door and the console's pages side by side: each router keeps its own route class, so the
    # door's body caps and refusal hooks stay on the door, and the pages read forms as the console does.
    api = APIRouter()
    api.include_router(create_router(registry, auth))
    api.include_router(create_console_router(registry, runtime.console))
    runtime.console.add(
        Section("registry", "Models", "/registry/console/models"),
        Section("registry", "Prompts", "/registry/console/prompts"),
        Section("registry", "Rubrics", "/registry/console/rubrics"),
        Section("registry", "Datasets", "/registry/console/datasets"),
    )

    async def start() -> None:
        applied = await asyncio.to_thread(store.migrate)
        if applied:
            log.info("registry migrations applied: %s", ", ".join(applied))
        if await asyncio.to_thread(keys.ensure_bootstrap_admin, bootstrap_key):
            log.info("bootstrap admin key created from FLYWHEEL_BOOTSTRAP_ADMIN_KEY")
        elif bootstrap_key is None and runtime.settings.database_url is None:
            # A fresh development home: nothing to set by hand for the commands run beside it.
            written = await asyncio.to_thread(keys.ensure_development_admin, runtime.home)
            if written is not None:
                log.warning(
                    "no admin key existed: created one in %s (owner only); commands on this host read it, set FLYWHEEL_BOOTSTRAP_ADMIN_KEY in production",
                    written,
                )
        await relay.start()

    async def stop() -> None:
        await relay.stop()
        await asyncio.to_thread(store.close)

    async def database_ready() -> None:
        await asyncio.to_thread(store.ping)

    return Service(
        name="registry",
        api=api,
        readiness={"database": database_ready},
        on_start=[start],
        on_stop=[stop],
        body_limits={"/registry/v1/datasets": dataset_body_limit(settings.max_dataset_bytes)},
    )
