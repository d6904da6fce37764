"""`flywheel ops sql|replay`: read-only SQL over ClickHouse, and rebuilding the sink's tables from Kafka."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

import typer

from services.cli import ops_views_cmd
from services.runtime.errors import FlywheelError
from services.runtime.settings import FlywheelSettings, load_settings

app = typer.Typer(help="Ops consoles over ClickHouse.", no_args_is_help=True)
ops_views_cmd.register(app)

READONLY = 164


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="A read-only ClickHouse query, e.g. \"SELECT * FROM inference_metrics(bucket_s = 3600)\".")],
    max_rows: Annotated[int, typer.Option(help="Rows printed at most.")] = 1000,
) -> None:
    """Run a read-only query and print tab-separated rows with a header; the engine refuses writes."""
    import os

    import httpx

    from services.runtime.running import door_of

    settings = load_settings(FlywheelSettings)
    # chDB lets one process open the data directory: beside a live monitor (found where it recorded its
    # door under FLYWHEEL_HOME, whatever its port), ask its query door instead.
    door = door_of(settings.home, "monitor") or f"http://{settings.http_host}:{settings.http_port}"
    url = f"{door}/monitor/v1/query"
    key = os.environ.get("FLYWHEEL_API_KEY") or os.environ.get("FLYWHEEL_MONITOR_API_KEY")
    try:
        response = httpx.post(url, json={"sql": query, "max_rows": max_rows}, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)
    except httpx.ConnectError:
        columns, rows = _query_store(settings, query, max_rows)
    else:
        if response.status_code == 401 and not key:
            raise FlywheelError(f"a Flywheel process serves the monitor at {door} and holds the ClickHouse data: set FLYWHEEL_API_KEY to a viewer's key (`flywheel registry keys create NAME --role viewer`)")
        if response.status_code != 200:
            raise FlywheelError(f"{url} answered {response.status_code}: {response.json().get('error', {}).get('message', response.text)}")
        body = response.json()
        columns, rows = body["columns"], body["rows"]
    typer.echo("\t".join(columns))
    for row in rows:
        typer.echo("\t".join("" if value is None else str(value) for value in row))


def _query_store(settings: FlywheelSettings, query: str, max_rows: int) -> tuple[list[str], list[list[Any]]]:
    from services.monitor.settings import MonitorSettings
    from services.runtime.clickhouse import ClickHouseError, open_clickhouse
    from services.runtime.clickhouse.query_guard import QueryGuard, QueryOverLimit, QueryRefused

    with open_clickhouse(settings.clickhouse_url, settings.home, readonly=True) as store:
        try:
            # The same guard and caps as the monitor's door: a query behaves alike with or without a running process.
            table = QueryGuard(store.database).run(store, query, None, load_settings(MonitorSettings).query_limits())
        except (QueryRefused, QueryOverLimit) as refused:
            raise FlywheelError(f"refused: {refused}") from None
        except ClickHouseError as error:
            if error.code == READONLY:
                raise FlywheelError("refused: `flywheel ops sql` is read-only and this statement writes or changes settings") from None
            raise FlywheelError(f"ClickHouse refused the query: {str(error).splitlines()[0]}") from None
    rows = table.slice(0, max_rows).to_pylist()
    return table.column_names, [list(row.values()) for row in rows]


@app.command()
def replay(
    from_timestamp: Annotated[datetime | None, typer.Option("--from-timestamp", help="Replay events from this time (ISO 8601, UTC unless a zone is given); default: the earliest retained.")] = None,
) -> None:
    """Rebuild inference_log and feedback from the topics, adding only events not stored yet."""
    from datetime import UTC

    from services.feedback.replay import replay as run_replay
    from services.feedback.service import Sink
    from services.feedback.settings import FeedbackSettings
    from services.feedback.store import FeedbackStore
    from services.runtime.broker import check_reachable
    from services.runtime.clickhouse import open_clickhouse
    from services.runtime.privacy import PrivacySettings

    settings = load_settings(FlywheelSettings)
    feedback = load_settings(FeedbackSettings)
    bootstrap = settings.resolved_kafka_bootstrap()
    security = settings.resolved_kafka_security("feedback")  # replaying is the sink's job: its principal reads both topics
    asyncio.run(check_reachable(bootstrap, security=security))
    from_ms = None
    if from_timestamp is not None:
        moment = from_timestamp if from_timestamp.tzinfo else from_timestamp.replace(tzinfo=UTC)
        from_ms = int(moment.timestamp() * 1000)
    with open_clickhouse(settings.clickhouse_url, settings.home) as clickhouse:
        clickhouse.migrate()
        sink = Sink(FeedbackStore(lambda: clickhouse), load_settings(PrivacySettings).redactor())
        counts = asyncio.run(run_replay(bootstrap, sink, topic_prefix=settings.topic_prefix, from_ms=from_ms, batch=feedback.batch_max_records, security=security))
    for count in counts:
        typer.echo(f"{count.topic}: read {count.read}, inserted {count.inserted}, already stored {count.read - count.inserted - count.undecodable}, undecodable {count.undecodable}")
