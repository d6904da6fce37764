"""`flywheel demo`: runs what the platform has, end to end, on real components, and reports.

Today that is the foundation: a local Apache Kafka, every contract topic, every event published by
an app through the typed publisher and consumed by the idempotent consumer (a duplicate skipped, a
poison message dead-lettered), and the ClickHouse schema migrated in the embedded engine. The
demo grows step by step into the seven-step loop of ARCHITECTURE.md as the services land.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import REGISTRY
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.runtime.settings import FlywheelSettings, load_settings

console = Console(highlight=False)


@dataclass
class DemoReport:
    started_at: datetime
    bootstrap: str = ""
    broker_pid: int | None = None
    broker_started_here: bool = False
    topics_created: int = 0
    events_published: int = 0
    events_consumed: dict[str, int] = field(default_factory=dict)
    duplicates_skipped: int = 0
    dead_lettered: list[str] = field(default_factory=list)
    clickhouse_tables: list[str] = field(default_factory=list)
    migrations_applied: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_text(self) -> str:
        lines = [
            f"Flywheel demo (foundation) - {self.started_at:%Y-%m-%d %H:%M:%S} UTC, {self.seconds:.1f} s",
            f"kafka: {self.bootstrap} pid {self.broker_pid or '-'} ({'started and stopped by the demo' if self.broker_started_here else 'already running'})",
            f"topics created: {self.topics_created}",
            f"events published by an app: {self.events_published}; consumed once each: {sum(self.events_consumed.values())}",
            f"duplicates skipped: {self.duplicates_skipped}; dead-lettered: {len(self.dead_lettered)}",
            *[f"  dlq: {reason}" for reason in self.dead_lettered],
            f"clickhouse (embedded chDB) tables: {', '.join(self.clickhouse_tables)}",
            f"migrations applied this run: {', '.join(self.migrations_applied) or 'none (already up to date)'}",
        ]
        return "\n".join(lines) + "\n"


def demo(
    home: Path = typer.Option(None, help="Data directory for this demo; default FLYWHEEL_HOME."),
) -> None:
    """Run the platform end to end on real local components and write a report."""
    overrides = {"home": home} if home else {}
    settings = load_settings(FlywheelSettings, **overrides)
    report = DemoReport(started_at=datetime.now(UTC))
    started = time.monotonic()
    kafka = None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as progress:
        try:
            task = progress.add_task("kafka: starting a local Apache Kafka broker", total=None)
            if settings.kafka_bootstrap:
                report.bootstrap = settings.kafka_bootstrap
            else:
                from infra.local_kafka import LocalKafka

                kafka = LocalKafka(settings.home, settings.cache)
                report.broker_started_here = not kafka.status().running
                report.bootstrap = kafka.start()
                report.broker_pid = kafka.status().pid
            progress.update(task, description=f"kafka: ready at {report.bootstrap}", completed=1, total=1)
            asyncio.run(_events(settings, report, progress))
            _clickhouse(settings, report, progress)
        finally:
            if kafka is not None and report.broker_started_here:
                task = progress.add_task("kafka: stopping the broker the demo started", total=None)
                kafka.stop()
                progress.update(task, description="kafka: stopped", completed=1, total=1)
    report.seconds = time.monotonic() - started
    _print(report)
    out = settings.home / "reports"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo-summary.txt"
    path.write_text(report.to_text())
    console.print(f"report written to {path}")


async def _events(settings: FlywheelSettings, report: DemoReport, progress: Progress) -> None:
    from contracts.events import EVENTS, InferenceLogged
    from contracts.publisher import EventPublisher
    from contracts.topics import dlq_for, topic_for
    from services.runtime.broker import create_broker, ensure_topics
    from services.runtime.consumer import DeadLetters, SqliteProcessedEvents, subscribe
    from contracts.examples import example_events

    task = progress.add_task("topics: creating every contract topic and its dead-letter topic", total=None)
    settings = settings.model_copy(update={"kafka_bootstrap": report.bootstrap, "topic_prefix": settings.topic_prefix or f"demo-{int(time.time())}."})
    report.topics_created = len(await ensure_topics(report.bootstrap, settings.topic_prefix))
    progress.update(task, description=f"topics: {report.topics_created} created", completed=1, total=1)

    task = progress.add_task("events: an app publishes one of each; the idempotent consumer reads them", total=len(EVENTS) + 2)
    received: dict[str, int] = {event.event_type: 0 for event in EVENTS}

    def counter(event_type: str):
        async def handle(envelope) -> None:
            received[event_type] += 1
            progress.advance(task)

        return handle

    broker = create_broker(settings, client_id="demo")
    processed = SqliteProcessedEvents(settings.home / "demo" / "processed-events.db")
    for event in EVENTS:
        subscribe(broker, event, counter(event.event_type), group=f"demo.{event.event_type}", processed=processed, dead_letters=DeadLetters(broker), topic_prefix=settings.topic_prefix)
    async with broker:
        await broker.start()
        async with EventPublisher(report.bootstrap, producer="demo-app", topic_prefix=settings.topic_prefix) as publisher:
            envelopes = [await publisher.publish(payload) for payload in example_events().values()]
        report.events_published = len(envelopes)
        inference = next(envelope for envelope in envelopes if isinstance(envelope.payload, InferenceLogged))
        raw = AIOKafkaProducer(bootstrap_servers=report.bootstrap, acks="all", enable_idempotence=True)
        await raw.start()
        try:
            # A redelivery (same event_id) and a message no consumer can read.
            await raw.send_and_wait(topic_for(InferenceLogged, settings.topic_prefix), inference.model_dump_json().encode(), key=inference.payload.partition_key().encode())
            await raw.send_and_wait(topic_for(InferenceLogged, settings.topic_prefix), b'{"event_type": "inference.logged", "payload": "truncated', key=b"poison")
        finally:
            await raw.stop()
        dlq = dlq_for(topic_for(InferenceLogged, settings.topic_prefix))
        report.dead_lettered = await _read_dead_letters(report.bootstrap, dlq, expected=1)
        progress.advance(task, 2)
        duplicates = {"group": f"demo.{InferenceLogged.event_type}", "event_type": InferenceLogged.event_type, "outcome": "duplicate"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (sum(received.values()) < len(EVENTS) or not REGISTRY.get_sample_value("flywheel_consumer_messages_total", duplicates)):
            await asyncio.sleep(0.1)
    processed.close()
    report.events_consumed = received
    report.duplicates_skipped = int(REGISTRY.get_sample_value("flywheel_consumer_messages_total", duplicates) or 0)
    progress.update(task, description=f"events: {sum(received.values())} consumed once, {report.duplicates_skipped} duplicate skipped, {len(report.dead_lettered)} dead-lettered")


async def _read_dead_letters(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list[str]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None, enable_auto_commit=False)
    await consumer.start()
    reasons: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(reasons) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                reasons.extend(dict(record.headers).get("x-flywheel-error", b"").decode() for record in records)
    finally:
        await consumer.stop()
    return reasons


def _clickhouse(settings: FlywheelSettings, report: DemoReport, progress: Progress) -> None:
    from services.runtime.clickhouse import open_clickhouse

    task = progress.add_task("clickhouse: applying migrations in the embedded engine", total=None)
    with open_clickhouse(settings.clickhouse_url, settings.home) as store:
        report.migrations_applied = store.migrate()
        report.clickhouse_tables = [row["name"] for row in store.query("SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name")]
    progress.update(task, description=f"clickhouse: {len(report.clickhouse_tables)} tables ready", completed=1, total=1)


def _print(report: DemoReport) -> None:
    table = Table(title="Flywheel demo", show_header=False)
    for line in report.to_text().splitlines()[1:]:
        name, _, value = line.partition(": ")
        table.add_row(name.strip(), value)
    console.print(table)
