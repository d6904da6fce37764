"""`flywheel doctor`: checks that the configured Kafka, ClickHouse and database answer."""

from __future__ import annotations

import asyncio

import typer

from services.runtime.errors import ConfigurationError
from services.runtime.settings import FlywheelSettings, load_settings


def doctor() -> None:
    """Check every configured dependency; the first one that fails is reported as one line."""
    settings = load_settings(FlywheelSettings)
    _check_kafka(settings)
    _check_clickhouse(settings)
    _check_database(settings)
    typer.echo("all checks passed")


def _check_kafka(settings: FlywheelSettings) -> None:
    from services.runtime.broker import check_reachable

    bootstrap = settings.resolved_kafka_bootstrap()
    security = settings.resolved_kafka_security()
    asyncio.run(check_reachable(bootstrap, security=security))
    typer.echo(
        f"kafka       ok  {bootstrap}" + (f" as {security.username} ({security.protocol})" if security.username else "")
    )


def _check_clickhouse(settings: FlywheelSettings) -> None:
    from services.runtime.clickhouse import open_clickhouse

    if settings.clickhouse_url is None and not (settings.home / "clickhouse").exists():
        typer.echo(f"clickhouse  ok  embedded chDB, created under {settings.home / 'clickhouse'} on first write")
        return
    with open_clickhouse(settings.clickhouse_url, settings.home, readonly=True) as store:
        store.query("SELECT 1")
    typer.echo(
        f"clickhouse  ok  {'server' if settings.clickhouse_url else 'embedded chDB under ' + str(settings.home / 'clickhouse')}"
    )


def _check_database(settings: FlywheelSettings) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    url = settings.database_url or f"sqlite:///{settings.home / 'registry.db'}"
    try:
        engine = create_engine(url)
    except (ArgumentError, ImportError, ValueError) as error:
        raise ConfigurationError(
            f"FLYWHEEL_DATABASE_URL is not a usable database URL ({error}); e.g. postgresql+psycopg://user:pass@host/db"
        ) from None
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        raise ConfigurationError(
            f"cannot connect to the registry database {engine.url.render_as_string(hide_password=True)}: {str(error.orig or error).splitlines()[0]}"
        ) from None
    finally:
        engine.dispose()
    typer.echo(f"database    ok  {engine.url.render_as_string(hide_password=True)}")
