"""`flywheel bench traces`: OTLP spans/s end to end, from `POST /v1/traces` to the `span` table, through the
feedback service as `flywheel run feedback` builds it (API key, door, Kafka, sink, ClickHouse), sent in
batches as an exporter's batch processor sends them, against the same service sent one span per request
(a simple span processor) in the same run; then the lag under a steady load. Own topics, database and
key database, dropped afterwards. The client runs in the same process and on the same cores as the
service, as an app on a one-machine install would."""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from contracts.http import Role
from services.feedback import otlp
from services.feedback.app import create_app
from services.feedback.bench import SteadyLag, settled, stored_rows, until_stored
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.auth import ApiKey, KeyStore, LocalKeys, create_database_engine
from services.runtime.broker import ensure_topics
from services.runtime.clickhouse import ClickHouseStore, open_clickhouse
from services.runtime.privacy import PrivacySettings
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from services.runtime.stages import StageClock

# The steps of one traced RAG request, as OpenInference instrumentations name them.
STEPS = ("CHAIN", "RETRIEVER", "LLM", "TOOL", "LLM")
# Requests in flight at once, as a few app workers exporting side by side.
CONCURRENCY = 4


@dataclass
class TracesResult:
    spans: int
    seconds: float
    batch: int
    baseline_spans: int
    baseline_seconds: float
    stored_rows: int
    stored_events: int
    steady: SteadyLag | None = None
    stages: dict[str, float] = field(default_factory=dict)
    batches: int = 0  # inserts the sink made while storing the batched spans

    @property
    def rate(self) -> float:
        return self.spans / self.seconds

    @property
    def baseline_rate(self) -> float:
        return self.baseline_spans / self.baseline_seconds


def _value(value: str | int) -> AnyValue:
    return AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)


def _span(run: str, i: int) -> Span:
    """Span `i`: trace i // 5, a step of a RAG request with the attributes instrumentations set."""
    trace, step = divmod(i, len(STEPS))
    kind = STEPS[step]
    started = 1_733_450_000_000_000_000 + i * 1_000_000
    values: dict[str, str | int] = {
        "openinference.span.kind": kind,
        "session.id": f"session-{trace % 97}",
        "input.value": f"How do I reset my Acme hub model {trace % 17}? It blinks red after the update (error {trace}).",
        "output.value": "Hold the reset button for 10 seconds until the light turns white, then pair it again.",
    }
    if kind == "LLM":
        values |= {"llm.model_name": "smollm2-135m-instruct", "llm.token_count.prompt": 120 + i % 40}
        values |= {"llm.token_count.completion": 30 + i % 20}
    return Span(
        trace_id=uuid.uuid5(uuid.NAMESPACE_OID, f"{run}/{trace}").bytes,
        span_id=(i + 1).to_bytes(8, "big"),
        parent_span_id=(trace * len(STEPS) + 1).to_bytes(8, "big") if step else b"",
        name=f"rag {kind.lower()}",
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=started,
        end_time_unix_nano=started + 250_000_000,
        attributes=[KeyValue(key=key, value=_value(value)) for key, value in values.items()],
    )


def _request(run: str, first: int, count: int) -> bytes:
    export = ExportTraceServiceRequest()
    resource_spans = export.resource_spans.add()
    resource_spans.resource.attributes.append(KeyValue(key="service.name", value=_value("bench-rag-app")))
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "bench.rag"
    scope_spans.spans.extend(_span(run, i) for i in range(first, first + count))
    return export.SerializeToString()


class _Sender:
    """Posts OTLP/protobuf bodies to the door with an app's key, `CONCURRENCY` at a time."""

    def __init__(self, client: httpx.AsyncClient, url: str, key: str) -> None:
        self._client = client
        self._url = f"{url}/v1/traces"
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": otlp.PROTOBUF}

    async def post(self, body: bytes) -> None:
        response = await self._client.post(self._url, content=body, headers=self._headers)
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/traces answered {response.status_code}: {response.text[:200]}")

    async def post_all(self, bodies: list[bytes]) -> None:
        pending = iter(bodies)

        async def worker() -> None:
            for body in pending:
                await self.post(body)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def _app_key(database_url: str) -> str:
    """An app key in a key database of the benchmark's own, offered to the door as a registry in this process would."""
    engine = create_database_engine(database_url)
    ApiKey.metadata.create_all(engine, tables=[ApiKey.__table__])  # type: ignore[attr-defined]
    keys = KeyStore(engine)
    LocalKeys.register(database_url, keys)
    return keys.create(principal="bench-traces", role=Role.app, created_by="flywheel bench traces")[0]


async def _steady_lag(
    sender: _Sender,
    store: ClickHouseStore,
    run: str,
    *,
    first: int,
    batch: int,
    rate: int,
    seconds: float,
    timeout_s: float,
) -> SteadyLag:
    """Export `batch`-span requests paced at `rate` spans/s for `seconds`; sample how far storage trails."""
    samples: list[int] = []
    sent = 0
    started = time.perf_counter()
    next_sample = started + 0.25
    while (elapsed := time.perf_counter() - started) < seconds:
        due = int(elapsed * rate) - sent
        if due >= batch or (due > 0 and elapsed + 0.05 >= seconds):
            await sender.post(_request(run, first + sent, due))
            sent += due
        if time.perf_counter() >= next_sample:
            samples.append(sent - (await stored_rows(store, "span") - first))
            next_sample += 0.25
        await asyncio.sleep(0.005)
    drained = time.perf_counter()
    await until_stored(store, first + sent, timeout_s, table="span")
    return SteadyLag(rate, sent, samples, time.perf_counter() - drained)


async def traces_benchmark(
    settings: FlywheelSettings,
    feedback: FeedbackSettings,
    privacy: PrivacySettings,
    *,
    spans: int,
    batch: int,
    baseline_spans: int,
    steady_rate: int = 0,
    steady_seconds: float = 0.0,
    timeout_s: float = 600.0,
) -> TracesResult:
    """Export `spans` in requests of `batch` and time them into the span table; then `baseline_spans` one per
    request; then a steady load. Every span has its own id, so the table must end with exactly one row each."""
    run = uuid.uuid4().hex[:10]
    prefix = f"{settings.topic_prefix}bench{run}."
    database = f"bench_{run}_traces"
    await ensure_topics(settings.resolved_kafka_bootstrap(), prefix)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-keys-") as scratch:
        keys_url = f"sqlite:///{Path(scratch) / 'keys.db'}"
        bench_settings = settings.model_copy(
            update={"topic_prefix": prefix, "database_url": keys_url, "registry_url": None}
        )
        key = await asyncio.to_thread(_app_key, keys_url)
        clock = StageClock()
        app, _ = build_process(
            bench_settings,
            [
                functools.partial(
                    create_app,
                    # No gRPC door: the benchmark sends OTLP/HTTP, and a second run must not fight for its port.
                    settings=feedback.model_copy(update={"otlp_grpc_port": 0}),
                    privacy=privacy,
                    clock=clock,
                )
            ],
            title="flywheel-feedback",
            clickhouse_database=database,
        )
        # Port 0: the system picks a free one, read back once listening.
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                if serving.done():
                    raise RuntimeError(f"the feedback service did not start: {serving.exception()}")
                await asyncio.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            store = open_clickhouse(settings.clickhouse_url, settings.home, database=database)
            try:
                result = await _measure(
                    store,
                    f"http://127.0.0.1:{port}",
                    key,
                    run,
                    clock,
                    spans=spans,
                    batch=batch,
                    baseline_spans=baseline_spans,
                    steady_rate=steady_rate,
                    steady_seconds=steady_seconds,
                    timeout_s=timeout_s,
                )
            finally:
                store.close()
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, timeout=120)
            with open_clickhouse(settings.clickhouse_url, settings.home, database="default") as admin:
                admin.command(f"DROP DATABASE IF EXISTS `{database}`")
    return result


async def _measure(
    store: ClickHouseStore,
    url: str,
    key: str,
    run: str,
    clock: StageClock,
    *,
    spans: int,
    batch: int,
    baseline_spans: int,
    steady_rate: int,
    steady_seconds: float,
    timeout_s: float,
) -> TracesResult:
    bodies = [_request(run, first, min(batch, spans - first)) for first in range(0, spans, batch)]
    singles = [_request(run, spans + i, 1) for i in range(baseline_spans)]
    async with httpx.AsyncClient(timeout=60) as client:
        sender = _Sender(client, url, key)
        clock.reset()
        started = time.perf_counter()
        await sender.post_all(bodies)
        await until_stored(store, spans, timeout_s, table="span")
        await settled(clock)
        seconds = time.perf_counter() - started
        stages, batches = clock.split(), clock.count("insert")
        # One request at a time: a simple span processor exports each span as it ends.
        started = time.perf_counter()
        for body in singles:
            await sender.post(body)
        await until_stored(store, spans + baseline_spans, timeout_s, table="span")
        baseline_seconds = time.perf_counter() - started
        steady = None
        if steady_rate and steady_seconds:
            steady = await _steady_lag(
                sender,
                store,
                run,
                first=spans + baseline_spans,
                batch=batch,
                rate=steady_rate,
                seconds=steady_seconds,
                timeout_s=timeout_s,
            )
    rows, events = await asyncio.to_thread(FeedbackStore(lambda: store).count, "span")
    return TracesResult(spans, seconds, batch, baseline_spans, baseline_seconds, rows, events, steady, stages, batches)
