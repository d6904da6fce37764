"""`flywheel up` (every service in one process) and `flywheel run SERVICE [SERVICE ...]` (the named ones).

The composition root: the only module that imports services. Each service's `app.create_app` is
found by name, so a service is added by adding its folder.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

from services.runtime.errors import ConfigurationError
from services.runtime.service import HttpServer, ServiceFactory, build_process
from services.runtime.settings import FlywheelSettings, load_settings

SERVICES = ("registry", "trainer", "evaluator", "serving", "feedback", "monitor")


def available_services() -> list[str]:
    """The contract's services whose code is present in this installation."""
    return [name for name in SERVICES if importlib.util.find_spec(f"services.{name}") is not None and importlib.util.find_spec(f"services.{name}.app") is not None]


def factory(name: str) -> ServiceFactory:
    if name not in SERVICES:
        raise ConfigurationError(f"unknown service {name!r}: choose one of {', '.join(SERVICES)}")
    if name not in available_services():
        raise ConfigurationError(f"service {name!r} is not part of this installation yet (present: {', '.join(available_services()) or 'none'})")
    return importlib.import_module(f"services.{name}.app").create_app


def serve(names: list[str], title: str) -> None:
    """Build one process for `names` and serve its HTTP doors until SIGINT/SIGTERM."""
    from services.runtime.logging import configure_logging

    settings = load_settings(FlywheelSettings)
    configure_logging(settings)
    app, _ = build_process(settings, [factory(name) for name in names], title=title)
    server = HttpServer(app, settings)
    server.run()
    if not server.started:
        raise ConfigurationError(f"{title} did not start: see the log above (is port {settings.http_port} free? FLYWHEEL_HTTP_PORT)")


def _known(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        raise typer.BadParameter(f"unknown service{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: choose from {', '.join(SERVICES)}")
    # Naming a service twice would subscribe its handlers twice in one consumer group.
    return list(dict.fromkeys(names))


def run(
    services: list[str] = typer.Argument(..., metavar="SERVICE", callback=_known, help=f"One or more of: {', '.join(SERVICES)}."),
) -> None:
    """Run the named services together in one process: their handlers on Kafka, their HTTP doors on one port.

    `flywheel run feedback monitor` is how the sink and the monitor share one embedded ClickHouse (chDB lets one process open a data directory) when the other services run apart.
    """
    serve(services, title=f"flywheel-{'-'.join(services)}")


def up() -> None:
    """Run every service in one process: one broker connection, one ClickHouse, one HTTP app."""
    present = available_services()
    if not present:
        raise ConfigurationError("no service is part of this installation yet")
    serve(present, title="flywheel")
