"""Wires the monitor into a process: its stores, rules (checked against the engine at start), the tick task and the door."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from contracts.events import Stage
from services.monitor.api import CONSOLE, create_router
from services.monitor.canary import load_canary_policy
from services.monitor.handlers import HANDLERS
from services.monitor.retraining import RetrainingPolicy
from services.monitor.rules import load_rules
from services.monitor.service import Monitor
from services.monitor.settings import MonitorSettings
from services.monitor.store import MonitorStore
from services.runtime.auth import Authenticator
from services.runtime.clickhouse import ClickHouseStore, open_clickhouse
from services.runtime.console import Section
from services.runtime.errors import ConfigurationError
from services.runtime.registry_client import RegistryClient
from services.runtime.running import development_admin_key
from services.runtime.service import Runtime, Service

log = logging.getLogger("flywheel.monitor")
GROUP = "monitor"


def create_app(
    runtime: Runtime,
    settings: MonitorSettings,
    *,
    registry_transport: Any = None,
    open_readonly: Callable[[], ClickHouseStore] | None = None,
) -> Service:
    """`open_readonly` opens the query door's read-only handle; default: the process's store, opened with readonly=1."""
    if settings.query_clickhouse_url and not runtime.settings.clickhouse_url:
        raise ConfigurationError(
            "FLYWHEEL_MONITOR_QUERY_CLICKHOUSE_URL names a ClickHouse server user for the query door, but FLYWHEEL_CLICKHOUSE_URL is unset "
            "(embedded chDB, which has no users): set both to the same server, or unset the first"
        )
    readonly: list[ClickHouseStore] = []

    def readonly_store() -> ClickHouseStore:
        # Opened after the process's store, which creates and migrates the database it reads. On a server,
        # the door's own user (SELECT on Flywheel's tables only) when one is configured.
        if not readonly:
            runtime.clickhouse()
            url = settings.query_clickhouse_url or runtime.settings.clickhouse_url
            readonly.append(
                open_readonly()
                if open_readonly
                else open_clickhouse(url, runtime.home, readonly=True, database=runtime.clickhouse().database)
            )
        return readonly[0]

    store = MonitorStore(runtime.clickhouse, readonly_store)
    bus = runtime.bus(GROUP)
    registry_url = settings.registry_url or f"http://{runtime.settings.http_host}:{runtime.settings.http_port}"
    registry = RegistryClient(registry_url, settings.api_key, transport=registry_transport)
    policy = RetrainingPolicy(
        min_corrections=settings.retrain_min_corrections,
        cooldown_s=settings.retrain_cooldown_s,
        hyperparameters=settings.retrain_hyperparameters,
        include_lineage=settings.retrain_include_lineage,
        correction_repeats=settings.retrain_correction_repeats,
        method=settings.retrain_method,
    )
    monitor = Monitor(store, [], bus.publish_envelope, registry, policy=policy, state_dir=runtime.home / GROUP)
    tasks: list[asyncio.Task] = []
    runtime.subscribe_all(GROUP, HANDLERS, monitor)

    async def loop() -> None:
        while True:
            try:
                await monitor.tick()
            except Exception:  # noqa: BLE001 - a failed tick is logged; the next one tries again
                log.exception("monitor tick failed")
            await asyncio.sleep(settings.tick_s)

    async def viewers_lineage(viewer_key: str | None) -> dict[str, Any] | None:
        """The console's production lineage, asked with the viewer's own key: the page shows what its viewer
        may read, and works where the monitor has no key of its own."""
        asking = (
            registry if viewer_key is None else RegistryClient(registry_url, viewer_key, transport=registry_transport)
        )
        return await newest_production_lineage(asking)

    async def start() -> None:
        if settings.api_key is None:
            # On a development home `flywheel up` needs nothing set: without a key of its own the monitor
            # presents the admin key the registry wrote there as it started (a production home has none).
            registry.use_key(await asyncio.to_thread(development_admin_key, runtime.home))
        monitor.rules = await asyncio.to_thread(load_rules, settings.rules_path, store.check_rule)
        monitor.canary_policy = await asyncio.to_thread(load_canary_policy, settings.rules_path)
        log.info("monitor rules loaded: %s", ", ".join(f"{r.name}@v{r.version}" for r in monitor.rules))
        log.info(
            "canary policy: %s",
            f"v{monitor.canary_policy.version}" if monitor.canary_policy else "none (canaries are left to people)",
        )
        tasks.append(asyncio.create_task(loop(), name="monitor-tick"))

    async def stop() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for handle in readonly:
            handle.close()

    runtime.console.add(
        Section(GROUP, "Monitor", CONSOLE),
        Section(GROUP, "Traces", f"{CONSOLE}/traces"),
        Section(GROUP, "Sessions", f"{CONSOLE}/sessions"),
        Section(GROUP, "Guards", f"{CONSOLE}/guards"),
    )
    return Service(
        name=GROUP,
        api=create_router(
            monitor,
            Authenticator.for_settings(runtime.settings),
            console=runtime.console,
            console_hours=settings.console_hours,
            lineage=viewers_lineage,
            query_limits=settings.query_limits(),
        ),
        on_start=[start],
        on_stop=[stop],
    )


async def newest_production_lineage(registry: RegistryClient) -> dict[str, Any] | None:
    """For the console: the lineage of the newest version in production (of any model), as the door answered it."""
    try:
        page = await registry.adapters(stage=Stage.production, limit=1)
        if not page.items:
            return None
        return (await registry.lineage(page.items[0].model_name, page.items[0].version)).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - the console still renders without the registry
        log.warning("registry door did not answer the lineage request", exc_info=True)
        return None
