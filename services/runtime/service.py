"""How a service plugs into a process, and the process that runs one service or all of them.

Each `services/<name>/app.py` has `create_app(runtime, settings) -> Service`: it builds its store, its
handlers (subscribed on `runtime.broker` through `runtime.subscribe`) and its HTTP door from the
settings it is handed (it reads no environment), and returns them with its readiness checks and
start/stop hooks. `flywheel run NAME` builds one, `flywheel up` builds all six on one broker, one
ClickHouse store and one ASGI app. The composition root is services/cli/run_cmd.py, the only place
that imports services, with `build_process` below: settings are read from the environment there,
once per process, and handed to the services (none is configured by writing the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI
from faststream.kafka import KafkaBroker
from pydantic_settings import BaseSettings

from contracts.envelope import Envelope, P
from services.runtime.artifacts import ArtifactStore, configured_artifact_store
from services.runtime.broker import (
    EventBus,
    check_reachable,
    create_broker,
    ensure_topics,
    require_topics,
    warn_if_unauthenticated,
)
from services.runtime.auth import Authenticator
from services.runtime.clickhouse import ClickHouseStore, open_clickhouse
from services.runtime.console import Console
from services.runtime.consumer import (
    BatchHandler,
    DeadLetters,
    Handler,
    SqliteProcessedEvents,
    follow,
    subscribe,
    subscribe_batch,
)
from services.runtime.http import ReadinessCheck, create_http_app
from services.runtime.running import door_url, forget, record
from services.runtime.settings import FlywheelSettings, load_settings

log = logging.getLogger("flywheel.process")

Hook = Callable[[], Awaitable[None]]
Deps = TypeVar("Deps")
# A service's `handlers.py` declares what it consumes as one mapping, event type -> handler, each
# handler taking the envelope (or a batch of them) and the service's dependencies, which the app
# passes in once, with one call per delivery kind: `runtime.subscribe_all(GROUP, HANDLERS, deps)` (a consumer
# group, one event at a time), `runtime.subscribe_batches(...)` (a group, in batches: the sink) and
# `runtime.follow_all(...)` (every replica reads the whole topic: serving's routes). Nothing closes over a global.
Handlers = dict[type[Any], Callable[[Envelope[Any], Deps], Awaitable[None]]]
BatchHandlers = dict[type[Any], Callable[[list[Envelope[Any]], Deps], Awaitable[None]]]


@dataclass
class Service:
    """What a service contributes to a process."""

    name: str
    api: APIRouter | None = None
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    # What the service runs with, for /readyz to show (the engine's dtype); None until it is known.
    facts: dict[str, Callable[[], str | None]] = field(default_factory=dict)
    on_start: list[Hook] = field(default_factory=list)
    on_stop: list[Hook] = field(default_factory=list)
    # Doors whose bodies may pass the process's FLYWHEEL_HTTP_MAX_BODY_BYTES: path prefix -> bytes.
    body_limits: dict[str, int] = field(default_factory=dict)


class Runtime:
    """The shared pieces of one process: settings, the Kafka broker, the artifact store, ClickHouse (opened on first use)."""

    def __init__(self, settings: FlywheelSettings, *, client_id: str, clickhouse_database: str | None = None) -> None:
        self.settings = settings
        # None: the store's own database; a benchmark names one of its own, dropped afterwards.
        self._clickhouse_database = clickhouse_database
        # `flywheel run registry` (client id flywheel-registry) connects as the registry's principal; a
        # process of several services as their joint one (settings.PROCESS_PRINCIPAL). Explicit
        # FLYWHEEL_KAFKA_SASL_* settings (docker-compose, production) always win.
        self.kafka_security = settings.resolved_kafka_security(client_id.removeprefix("flywheel-"))
        self.broker: KafkaBroker = create_broker(settings, client_id=client_id, security=self.kafka_security)
        self.dead_letters = DeadLetters(self.broker)
        self._processed: dict[str, SqliteProcessedEvents] = {}
        self._clickhouse: ClickHouseStore | None = None
        # One store for every service of the process (FLYWHEEL_ARTIFACT_ROOT): what the registry
        # records, serving loads, and serving refuses an adapter from anywhere else.
        self.artifacts: ArtifactStore = configured_artifact_store(settings)

    @functools.cached_property
    def console(self) -> Console:
        """The process's one web console: services add their pages to it, build_process serves its sign-in."""
        return Console(
            Authenticator.for_settings(self.settings),
            session_s=self.settings.console_session_s,
            secure_cookie=self.settings.console_secure_cookie,
        )

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

    def subscribe_all(self, service: str, handlers: Handlers[Deps], deps: Deps, **options: Any) -> list[Any]:
        """Subscribe each of `handlers` as consumer group `service`, one event at a time, handed `deps`."""
        return [self.subscribe(service, event, _bound(handler, deps), **options) for event, handler in handlers.items()]

    def subscribe_batches(self, service: str, handlers: BatchHandlers[Deps], deps: Deps, **options: Any) -> list[Any]:
        """Subscribe each of `handlers` as consumer group `service`, in batches (`options`: max_records, max_wait_ms,
        fetch_min_bytes), handed `deps`. Batches are stored idempotently by their handler, not deduplicated here."""
        return subscribe_batches(
            self.broker,
            handlers,
            deps,
            group=service,
            dead_letters=self.dead_letters,
            topic_prefix=self.settings.topic_prefix,
            max_retries=self.settings.consumer_max_retries,
            **options,
        )

    def follow_all(self, name: str, handlers: Handlers[Deps], deps: Deps, *, from_start: bool) -> list[Any]:
        """Read each of `handlers`' topics in full in every instance, outside any consumer group (state every
        replica must hold; consumer.follow says why), handed `deps`: from the topic's start at every start
        with `from_start`, else from now on (commands that must not act again on a replay)."""
        return [
            follow(
                self.broker,
                event,
                _bound(handler, deps),
                name=name,
                from_start=from_start,
                topic_prefix=self.settings.topic_prefix,
                max_retries=self.settings.consumer_max_retries,
            )
            for event, handler in handlers.items()
        ]

    def clickhouse(self) -> ClickHouseStore:
        """The process's ClickHouse store, migrated; chDB allows one per process and data path."""
        if self._clickhouse is None:
            self._clickhouse = open_clickhouse(
                self.settings.clickhouse_url, self.home, database=self._clickhouse_database
            )
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


def subscribe_batches(
    broker: KafkaBroker,
    handlers: BatchHandlers[Deps],
    deps: Deps,
    *,
    group: str,
    dead_letters: DeadLetters,
    **options: Any,
) -> list[Any]:
    """Subscribe each of `handlers` on `broker` as consumer group `group`, in batches, handed `deps`: what
    Runtime.subscribe_batches does for a process, for a benchmark or test that runs its own broker."""
    return [
        subscribe_batch(broker, event, _bound_batch(handler, deps), group=group, dead_letters=dead_letters, **options)
        for event, handler in handlers.items()
    ]


def _bound(handler: Callable[[Envelope[Any], Deps], Awaitable[None]], deps: Deps) -> Handler[Any]:
    async def handle(envelope: Envelope[Any]) -> None:
        await handler(envelope, deps)

    return handle


def _bound_batch(handler: Callable[[list[Envelope[Any]], Deps], Awaitable[None]], deps: Deps) -> BatchHandler[Any]:
    async def handle(envelopes: list[Envelope[Any]]) -> None:
        await handler(envelopes, deps)

    return handle


# A service's `create_app(runtime, settings, ...)`, or it with its settings already given
# (`functools.partial(create_app, settings=ServingSettings(...))`, as tests and the demo do).
ServiceFactory = Callable[..., Service]


def with_settings(
    factory: ServiceFactory, built: dict[type[BaseSettings], BaseSettings]
) -> Callable[[Runtime], Service]:
    """`factory` handed every settings object it takes and was not given: each parameter annotated with
    a settings class and no value is read from the environment, once per class into `built`, so the
    services of one process that share settings (serving and feedback: PrivacySettings) share one object."""
    missing: dict[str, BaseSettings] = {}
    try:
        signature = inspect.signature(factory, eval_str=True)
    except NameError:
        # An annotation only a type checker resolves: no settings class to read; a settings parameter
        # left without a value still fails loudly when the factory is called.
        signature = inspect.signature(factory)
    for name, parameter in signature.parameters.items():
        cls = parameter.annotation
        if parameter.default is inspect.Parameter.empty and isinstance(cls, type) and issubclass(cls, BaseSettings):
            if cls not in built:
                built[cls] = load_settings(cls)
            missing[name] = built[cls]
    return functools.partial(factory, **missing) if missing else factory


def settings_class(factory: ServiceFactory, parameter: str = "settings") -> type[BaseSettings]:
    """The settings class `factory` takes as `parameter`: how a caller that may import only a service's
    app (the demo) builds that service's settings with its own values."""
    cls = inspect.signature(factory, eval_str=True).parameters[parameter].annotation
    if not (isinstance(cls, type) and issubclass(cls, BaseSettings)):
        raise TypeError(f"{factory!r} takes no settings class as {parameter!r}")
    return cls


def build_process(
    settings: FlywheelSettings,
    factories: Sequence[ServiceFactory],
    *,
    title: str,
    clickhouse_database: str | None = None,
) -> tuple[FastAPI, Runtime]:
    """One ASGI app and one broker running the given services; the broker starts with the app.

    The composition root: each service's settings not given with its factory are read from the
    environment here, once, when the process is built (with_settings)."""
    for warning in settings.deprecation_warnings():
        log.warning(warning)
    runtime = Runtime(settings, client_id=title, clickhouse_database=clickhouse_database)
    built: dict[type[BaseSettings], BaseSettings] = {}
    services = [with_settings(factory, built)(runtime) for factory in factories]
    bootstrap = settings.resolved_kafka_bootstrap()
    security = runtime.kafka_security
    readiness: dict[str, ReadinessCheck] = {"kafka": lambda: check_reachable(bootstrap, security=security)}
    for service in services:
        readiness.update({f"{service.name}.{name}": check for name, check in service.readiness.items()})
    facts = {f"{service.name}.{name}": fact for service in services for name, fact in service.facts.items()}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        warn_if_unauthenticated(security, bootstrap)
        if security.uses_sasl:
            # An authenticated principal is a service's, which may not create topics (infra/kafka_acls.py):
            # the admin made them (`flywheel infra up --secure`, `flywheel infra topics` as admin).
            await check_reachable(bootstrap, security=security)
            subscribed = sorted(
                {topic.name for subscriber in runtime.broker.subscribers for topic in getattr(subscriber, "topics", ())}
            )
            await require_topics(bootstrap, subscribed, security=security)
        else:
            await ensure_topics(bootstrap, settings.topic_prefix, security=security)
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
            # commits offsets, an outbox relay publishes what is left. Services stop side by side, so
            # the stop takes as long as the slowest (Triton, a training step) rather than their sum.
            await asyncio.gather(*(_stop(service) for service in started))
            with contextlib.suppress(Exception):
                await runtime.broker.stop()
            await asyncio.to_thread(runtime.close)

    async def _stop(service: Service) -> None:
        for hook in service.on_stop:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - one failing hook must not keep the others from running
                log.exception("stop hook of %s failed", service.name)

    app = create_http_app(
        title,
        readiness=readiness,
        facts=facts,
        routers=[service.api for service in services if service.api is not None],
        lifespan=lifespan,
        max_body_bytes=settings.http_max_body_bytes,
        body_limits={prefix: limit for service in services for prefix, limit in service.body_limits.items()},
    )
    # Every process serves the console's sign-in and index, even one whose services have no pages yet.
    runtime.console.install(app)
    app.state.services = [service.name for service in services]
    return app, runtime


class HttpServer(uvicorn.Server):
    """uvicorn serving a process's app: SIGINT/SIGTERM stop it gracefully, a second one during the stop forces the exit."""

    def __init__(self, app: FastAPI, settings: FlywheelSettings, *, handle_signals: bool = True) -> None:
        super().__init__(
            uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_config=None, lifespan="on")
        )
        self.handle_signals = handle_signals
        self._services: list[str] = list(getattr(app.state, "services", []))
        self._home = settings.home
        self._record: Path | None = None

    async def startup(self, sockets: list[Any] | None = None) -> None:
        """Once listening, the door is recorded under FLYWHEEL_HOME (services/runtime/running.py), so
        processes and commands on this host find it without being told its address."""
        await super().startup(sockets)
        if self.started and self.servers and self._services:
            host, port = self.servers[0].sockets[0].getsockname()[:2]  # the bound port, also when 0 asked for any
            self._record = record(self._home, self._services, door_url(self.config.host or host, port))

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        if self._record is not None:
            forget(self._record)  # first: nothing should find a door that is closing
            self._record = None
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn raises the captured signal again once it has stopped; in a loop that runs more than
        # the server (the demo's) that interrupts every other task mid-await and the loop's close then
        # reports each as "Task was destroyed but it is pending!". The stop was graceful: it is not raised again.
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            force_exit(sig)
        log.info("%s received: stopping every service (send it again to exit at once)", signal.Signals(sig).name)
        super().handle_exit(sig, frame)


def force_exit(sig: int) -> None:
    """Exit now, without the services' stop hooks; child processes (tritonserver) are killed, not left orphaned."""
    doomed = descendant_pids(os.getpid())
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # SIGKILL is delivered asynchronously: reap the direct children, so none outlives this exit, a little while at most.
    deadline = time.monotonic() + 5
    while doomed and time.monotonic() < deadline:
        for pid in list(doomed):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:  # a grandchild, reaped by its own parent or init
                done = not Path(f"/proc/{pid}").exists()
            if done:
                doomed.remove(pid)
        time.sleep(0.05)
    print(
        f"{signal.Signals(sig).name} received again: exited without stopping the services", file=sys.stderr, flush=True
    )
    os._exit(128 + sig)


def descendant_pids(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; psutil is not a dependency of the runtime)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return [descendant for child in children for descendant in (child, *descendant_pids(child))]
