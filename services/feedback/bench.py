"""`flywheel bench ingest`: events/s from Kafka into ClickHouse through the batched sink, against a
per-event insert consumer in the same run, on the configured broker and store (own topics and databases,
dropped afterwards)."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaProducer

from contracts.envelope import Envelope, wrap
from contracts.events import InferenceLogged
from contracts.publisher import encode
from contracts.topics import topic_for
from services.feedback.handlers import BATCH_HANDLERS
from services.feedback.models import inference_rows
from services.runtime.privacy import Redactor
from services.feedback.service import Sink
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.broker import create_broker, ensure_topics
from services.runtime.clickhouse import ClickHouseStore, open_clickhouse
from services.runtime.consumer import DeadLetters, SqliteProcessedEvents, subscribe
from services.runtime.service import subscribe_batches
from services.runtime.settings import FlywheelSettings
from services.runtime.stages import StageClock


@dataclass
class SteadyLag:
    """Events published but not yet stored, sampled while a paced producer runs at `rate`."""

    rate: int
    sent: int
    samples: list[int]
    drain_seconds: float

    def quantile(self, q: float) -> int:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


@dataclass
class IngestResult:
    events: int
    sink_seconds: float
    baseline_events: int
    baseline_seconds: float
    steady: SteadyLag | None = None
    # Seconds per stage of the sink path while it stored `events` (services/runtime/stages.py).
    stages: dict[str, float] = field(default_factory=dict)
    batches: int = 0  # inserts the sink made while storing `events`

    @property
    def sink_rate(self) -> float:
        return self.events / self.sink_seconds

    @property
    def baseline_rate(self) -> float:
        return self.baseline_events / self.baseline_seconds

    def stage_split(self) -> list[tuple[str, float, float]]:
        """(stage, seconds, share of the sink's wall time), the time no stage accounts for last: fetching
        from Kafka, waiting for a batch to fill, handing it to a thread."""
        split = [(name, seconds, seconds / self.sink_seconds) for name, seconds in self.stages.items()]
        other = max(0.0, self.sink_seconds - sum(self.stages.values()))
        return [*split, ("other (fetch, wait, scheduling)", other, other / self.sink_seconds)]


def _event(i: int) -> Envelope[InferenceLogged]:
    question = f"How do I reset my Acme hub model {i % 17}? It blinks red after the update and the app says error {i}."
    return wrap(
        InferenceLogged(
            inference_id=f"bench-{i}",
            model_name="smollm2-135m-instruct",
            adapter_version=1 + i % 3,
            route="production",
            input_messages=[{"role": "user", "content": question}],
            input_text=question,
            output_text="Hold the reset button for 10 seconds until the light turns white, then pair it again in the app.",
            prompt_tokens=30 + i % 20,
            completion_tokens=25 + i % 30,
            latency_total_ms=100.0 + i % 250,
        ),
        producer="bench",
    )


async def _publish(bootstrap: str, prefix: str, events: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    try:
        topic = topic_for(InferenceLogged, prefix)
        for start in range(0, events, 5000):
            futures = []
            for i in range(start, min(start + 5000, events)):
                key, value, headers = encode(_event(i))
                futures.append(await producer.send(topic, value=value, key=key, headers=headers))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def stored_rows(store: ClickHouseStore, table: str = "inference_log") -> int:
    """Rows of `table` (one of the sink's own tables, never a caller's text)."""
    return await asyncio.to_thread(lambda: int(store.query(f"SELECT count() AS n FROM {table}")[0]["n"]))


async def _steady_lag(
    bootstrap: str, prefix: str, store: ClickHouseStore, *, first: int, rate: int, seconds: float, timeout_s: float
) -> SteadyLag:
    """Publish at a steady `rate` for `seconds` while the sink runs; sample how far storage trails."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    topic = topic_for(InferenceLogged, prefix)
    samples: list[int] = []
    sent = 0
    try:
        started = time.perf_counter()
        next_sample = started + 0.25
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(int(elapsed * rate) - sent):
                key, value, headers = encode(_event(first + sent))
                await producer.send(topic, value=value, key=key, headers=headers)
                sent += 1
            if time.perf_counter() >= next_sample:
                samples.append(sent - (await stored_rows(store) - first))
                next_sample += 0.25
            await asyncio.sleep(0.005)
        await producer.flush()
    finally:
        await producer.stop()
    drain = await until_stored(store, first + sent, timeout_s)
    return SteadyLag(rate, sent, samples, drain)


async def settled(clock: StageClock, timeout_s: float = 10.0) -> None:
    """Until every batch the sink took is committed: its rows are readable before its offsets are committed,
    and the split should hold that commit too."""
    deadline = time.perf_counter() + timeout_s
    while clock.count("commit") < clock.count("decode+validate") and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)


async def until_stored(store: ClickHouseStore, rows: int, timeout_s: float, table: str = "inference_log") -> float:
    """Seconds until `table` holds `rows` rows; TimeoutError after `timeout_s`."""
    started = time.perf_counter()
    while await stored_rows(store, table) < rows:
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"fewer than {rows} rows stored in {table} after {timeout_s:.0f}s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def ingest_benchmark(
    settings: FlywheelSettings,
    feedback: FeedbackSettings,
    *,
    events: int,
    baseline_events: int,
    steady_rate: int = 0,
    steady_seconds: float = 0.0,
    timeout_s: float = 600.0,
) -> IngestResult:
    """Publish `events`, time the sink storing them all, measure its lag under a steady load, then time
    a per-event consumer storing `baseline_events`."""
    run = uuid.uuid4().hex[:10]
    prefix = f"{settings.topic_prefix}bench{run}."
    bootstrap = settings.resolved_kafka_bootstrap()
    await ensure_topics(bootstrap, prefix)
    await _publish(bootstrap, prefix, events)
    bench_settings = settings.model_copy(update={"topic_prefix": prefix})
    stores = {
        name: open_clickhouse(settings.clickhouse_url, settings.home, database=f"bench_{run}_{name}")
        for name in ("sink", "baseline")
    }
    try:
        for store in stores.values():
            await asyncio.to_thread(store.migrate)

        clock = StageClock()
        broker = create_broker(bench_settings, client_id="bench-sink")
        subscribe_batches(
            broker,
            BATCH_HANDLERS,
            Sink(FeedbackStore(lambda: stores["sink"]), Redactor(), clock),
            group="bench-sink",
            dead_letters=DeadLetters(broker),
            topic_prefix=prefix,
            max_retries=3,
            clock=clock,
            **feedback.batch_options(),
        )
        async with broker:
            await broker.start()
            started = time.perf_counter()
            await until_stored(stores["sink"], events, timeout_s)
            await settled(clock)
            sink_seconds = time.perf_counter() - started
            stages, batches = clock.split(), clock.count("insert")
            steady = None
            if steady_rate and steady_seconds:
                steady = await _steady_lag(
                    bootstrap,
                    prefix,
                    stores["sink"],
                    first=events,
                    rate=steady_rate,
                    seconds=steady_seconds,
                    timeout_s=timeout_s,
                )

        redactor = Redactor()
        baseline_store = stores["baseline"]

        async def insert_one(envelope: Envelope[InferenceLogged]) -> None:
            await asyncio.to_thread(baseline_store.insert_arrow, "inference_log", inference_rows([envelope], redactor))

        with tempfile.TemporaryDirectory() as scratch:
            processed = SqliteProcessedEvents(Path(scratch) / "processed.db")
            broker = create_broker(bench_settings, client_id="bench-baseline")
            subscribe(
                broker,
                InferenceLogged,
                insert_one,
                group="bench-baseline",
                processed=processed,
                dead_letters=DeadLetters(broker),
                topic_prefix=prefix,
            )
            try:
                async with broker:
                    await broker.start()
                    baseline_seconds = await until_stored(baseline_store, baseline_events, timeout_s)
            finally:
                processed.close()
    finally:
        for store in stores.values():
            database = store.database
            store.close()
            with open_clickhouse(settings.clickhouse_url, settings.home, database="default") as admin:
                admin.command(f"DROP DATABASE IF EXISTS `{database}`")
    return IngestResult(events, sink_seconds, baseline_events, baseline_seconds, steady, stages, batches)
