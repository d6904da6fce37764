"""How a service plugs into a process, and the process that runs one service or all of them.

Each `services/<name>/app.py` has `create_app(runtime) -> Service`: it builds its store, its
handlers (subscribed on `runtime.broker` through `runtime.subscribe`) and its HTTP door, and returns
them with its readiness checks and start/stop hooks. `flywheel run NAME` builds one, `flywheel up`
builds all six on one broker, one ClickHouse store and one ASGI app: the composition root is
services/cli/run_cmd.py, the only place that imports services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from faststream.kafka import KafkaBroker

from contracts.envelope import P
from services.runtime.broker import EventBus, check_reachable, create_broker, ensure_topics
from services.runtime.clickhouse import ClickHouseStore, open_clickhouse
from services.runtime.consumer import DeadLetters, Handler, SqliteProcessedEvents, subscribe
from services.runtime.http import ReadinessCheck, create_http_app
from services.runtime.settings import FlywheelSettings

log = logging.getLogger("flywheel.process")

Hook = Callable[[], Awaitable[None]]


@dataclass
class Service:
    """What a service contributes to a process."""

    name: str
    api: APIRouter | None = None
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    on_start: list[Hook] = field(default_factory=list)
    on_stop: list[Hook] = field(default_factory=list)


class Runtime:
    """The shared pieces of one process: settings, the Kafka broker, ClickHouse (opened on first use)."""

    def __init__(self, settings: FlywheelSettings, *, client_id: str) -> None:
        self.settings = settings
        self.broker: KafkaBroker = create_broker(settings, client_id=client_id)
        self.dead_letters = DeadLetters(self.broker)
        self._processed: dict[str, SqliteProcessedEvents] = {}
        self._clickhouse: ClickHouseStore | None = None

    @property
    def home(self) -> Path:
        return self.settings.home

    def bus(self, producer: str) -> EventBus:
        """The publisher a service uses, naming it as the producer of its events."""
        return EventBus(self.broker, producer=producer, topic_prefix=self.settings.topic_prefix)

    def subscribe(self, service: str, event: type[P], handler: Handler[P], **options: Any) -> Any:
        """Subscribe `handler` as consumer group `service`: idempotent, commit after, dead letters."""
        processed = self._processed.get(service)
        if processed is None:
            processed = self._processed[service] = SqliteProcessedEvents(self.home / service / "processed-events.db")
        return subscribe(
            self.broker,
            event,
            handler,
            group=service,
            processed=processed,
            dead_letters=self.dead_letters,
            topic_prefix=self.settings.topic_prefix,
            max_retries=self.settings.consumer_max_retries,
            **options,
        )

    def clickhouse(self) -> ClickHouseStore:
        """The process's ClickHouse store, migrated; chDB allows one per process and data path."""
        if self._clickhouse is None:
            self._clickhouse = open_clickhouse(self.settings.clickhouse_url, self.home)
            applied = self._clickhouse.migrate()
            if applied:
                log.info("clickhouse migrations applied: %s", ", ".join(applied))
        return self._clickhouse

    def close(self) -> None:
        for store in self._processed.values():
            store.close()
        if self._clickhouse is not None:
            self._clickhouse.close()
            self._clickhouse = None


ServiceFactory = Callable[[Runtime], Service]


def build_process(settings: FlywheelSettings, factories: Sequence[ServiceFactory], *, title: str) -> tuple[FastAPI, Runtime]:
    """One ASGI app and one broker running the given services; the broker starts with the app."""
    runtime = Runtime(settings, client_id=title)
    services = [factory(runtime) for factory in factories]
    bootstrap = settings.resolved_kafka_bootstrap()
    readiness: dict[str, ReadinessCheck] = {"kafka": lambda: check_reachable(bootstrap)}
    for service in services:
        readiness.update({f"{service.name}.{name}": check for name, check in service.readiness.items()})

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ensure_topics(bootstrap, settings.topic_prefix)
        started: list[Service] = []
        try:
            # The producer connects before the services start, so what they publish while starting (an
            # outbox relay, staged trainer events) goes out at once; consuming begins after they started.
            await runtime.broker.connect()
            for service in services:
                for hook in service.on_start:
                    await hook()
                started.append(service)
            await runtime.broker.start()
            log.info("%s ready: %s", title, ", ".join(service.name for service in services))
            yield
        finally:
            # Stop hooks run while the broker is still connected: a sink flushing its last batch
            # commits offsets, an outbox relay publishes what is left.
            for service in reversed(started):
                for hook in service.on_stop:
                    try:
                        await hook()
                    except Exception:  # noqa: BLE001 - one failing hook must not keep the others from running
                        log.exception("stop hook of %s failed", service.name)
            with contextlib.suppress(Exception):
                await runtime.broker.stop()
            await asyncio.to_thread(runtime.close)

    app = create_http_app(title, readiness=readiness, routers=[service.api for service in services if service.api is not None], lifespan=lifespan)
    return app, runtime
