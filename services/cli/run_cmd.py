"""`flywheel up` (every service in one process) and `flywheel run SERVICE [SERVICE ...]` (the named ones).

The composition root: the only module that imports services. Each service's `app.create_app` is
found by name, so a service is added by adding its folder; `build_process` reads the settings each
one takes (its `<Name>Settings`, and PrivacySettings for serving and feedback) from the environment
once, when the process is built, and hands them over.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

import typer

from services.runtime.errors import ConfigurationError
from services.runtime.settings import FlywheelSettings, load_settings

if TYPE_CHECKING:
    # The process's assembly (FastAPI, FastStream, the key store) is imported by the commands that build
    # one: every `flywheel` command imports this module, and that assembly is most of a second of imports.
    from services.runtime.service import ServiceFactory

SERVICES = ("registry", "trainer", "evaluator", "serving", "feedback", "monitor")


def available_services() -> list[str]:
    """The contract's services whose code is present in this installation."""
    return [
        name
        for name in SERVICES
        if importlib.util.find_spec(f"services.{name}") is not None
        and importlib.util.find_spec(f"services.{name}.app") is not None
    ]


def factory(name: str) -> ServiceFactory:
    if name not in SERVICES:
        raise ConfigurationError(f"unknown service {name!r}: choose one of {', '.join(SERVICES)}")
    if name not in available_services():
        raise ConfigurationError(
            f"service {name!r} is not part of this installation yet (present: {', '.join(available_services()) or 'none'})"
        )
    return importlib.import_module(f"services.{name}.app").create_app


def serve(names: list[str], title: str, settings: FlywheelSettings | None = None) -> None:
    """Build one process for `names` and serve its HTTP doors until SIGINT/SIGTERM."""
    from services.runtime.logging import configure_logging
    from services.runtime.service import HttpServer, build_process

    settings = settings or load_settings(FlywheelSettings)
    configure_logging(settings)
    app, _ = build_process(settings, [factory(name) for name in names], title=title)
    server = HttpServer(app, settings)
    server.run()
    if not server.started:
        raise ConfigurationError(
            f"{title} did not start: see the log above (is port {settings.http_port} free? FLYWHEEL_HTTP_PORT)"
        )


def _known(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        raise typer.BadParameter(
            f"unknown service{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: choose from {', '.join(SERVICES)}"
        )
    # Naming a service twice would subscribe its handlers twice in one consumer group.
    return list(dict.fromkeys(names))


def run(
    services: list[str] = typer.Argument(
        ..., metavar="SERVICE", callback=_known, help=f"One or more of: {', '.join(SERVICES)}."
    ),
) -> None:
    """Run the named services together in one process: their handlers on Kafka, their HTTP doors on one port.

    `flywheel run feedback monitor` is how the sink and the monitor share one embedded ClickHouse (chDB lets one process open a data directory) when the other services run apart.
    """
    serve(services, title=f"flywheel-{'-'.join(services)}")


def up() -> None:
    """Run every service in one process: one broker connection, one ClickHouse, one HTTP app.

    With no broker configured (FLYWHEEL_KAFKA_BOOTSTRAP unset, none running for this home), a local Apache
    Kafka is started first, recorded under FLYWHEEL_HOME as `flywheel infra up` records it, and stopped
    when this process stops; `flywheel infra up` keeps one running across runs instead."""
    from infra.local_kafka import LocalKafka

    present = available_services()
    if not present:
        raise ConfigurationError("no service is part of this installation yet")
    settings = load_settings(FlywheelSettings)
    kafka = None if settings.kafka_bootstrap else LocalKafka(settings.home, settings.cache)
    if kafka is not None and kafka.status().running:
        kafka = None  # `flywheel infra up` (or another run) started it: it is theirs to stop
    if kafka is not None:
        typer.echo(
            f"no Kafka broker configured: starting a local one for {settings.home} (it stops with this process; `flywheel infra up` keeps one running)",
            err=True,
        )
        bootstrap = kafka.start()
        typer.echo(f"kafka: ready at {bootstrap}", err=True)
    try:
        serve(present, title="flywheel", settings=settings)
    finally:
        if kafka is not None:
            kafka.stop()
