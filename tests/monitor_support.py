"""Shared pieces of the monitor's tests: the registry's real door in process, the feedback sink on the
real broker, reading a topic from its start, and the traffic the tests feed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from faststream.kafka import KafkaBroker

from contracts.events import FeedbackReceived, InferenceLogged, InferenceStatus, Thumbs
from contracts.http import Role
from contracts.topics import topic_for
from services.feedback.handlers import BATCH_HANDLERS, GROUP
from services.runtime.privacy import Redactor
from services.runtime.registry_client import RegistryClient
from services.feedback.service import Sink
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.monitor.store import MonitorStore
from services.registry.api import create_router as registry_router
from services.registry.service import Registry
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.auth import Authenticator, KeyStore, LocalKeys
from services.runtime.broker import EventBus, create_broker
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.consumer import DeadLetters
from services.runtime.http import create_http_app
from services.runtime.service import subscribe_batches
from services.runtime.settings import FlywheelSettings
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.registry_support import seed_production_and_approved_candidate
from tests.support import eventually as shared_eventually

MODEL = "smollm2"
PER_ARM = 120

# A monitor tick spans Kafka, the sink and ClickHouse: a longer wait, polled less often.
eventually = partial(shared_eventually, timeout_s=90.0, interval_s=0.2)


class RegistryDoorFixture:
    """The registry's real HTTP door over an in-process transport, with an operator key for the monitor."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
        self.store.migrate()
        self.registry = Registry(self.store, ArtifactStore(tmp_path / "artifacts"))
        keys = KeyStore(self.store.engine)
        self.auth = Authenticator(keys)
        # As the registry built in a process does: the other doors of this process check keys against its store.
        LocalKeys.register(self.store.url, keys)
        self.operator_key, _ = keys.create(principal="service:monitor", role=Role.operator, created_by="test")
        # The process's own app: it answers the registry's refusals (domain errors) as the registry's process does.
        self.app = create_http_app("registry", routers=[registry_router(self.registry, self.auth)])
        self.transport = httpx.ASGITransport(app=self.app)

    def door(self) -> RegistryClient:
        return RegistryClient("http://registry", self.operator_key, transport=self.transport)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=self.transport,
            base_url="http://registry",
            headers={"Authorization": f"Bearer {self.operator_key}"},
        )


@asynccontextmanager
async def running_sink(
    settings: FlywheelSettings, clickhouse: ClickHouseStore, *, also: Callable[[KafkaBroker], None] | None = None
) -> AsyncIterator[EventBus]:
    """The feedback sink consuming the real broker into `clickhouse`; `also` subscribes more handlers before the start."""
    broker = create_broker(settings, client_id="monitor-test")
    sink = Sink(FeedbackStore(lambda: clickhouse), Redactor())
    sink_settings = FeedbackSettings(batch_max_records=500, batch_max_wait_ms=100, batch_min_bytes=1)
    subscribe_batches(
        broker,
        BATCH_HANDLERS,
        sink,
        group=GROUP,
        dead_letters=DeadLetters(broker),
        topic_prefix=settings.topic_prefix,
        max_retries=1,
        **sink_settings.batch_options(),
    )
    if also is not None:
        also(broker)
    async with broker:
        await broker.start()
        yield EventBus(broker, producer="test", topic_prefix=settings.topic_prefix)


async def published_and_stored(
    bus: EventBus, clickhouse: ClickHouseStore, inferences: list[InferenceLogged], feedback: list
) -> None:
    """Publish the traffic and wait until the sink has stored every piece of feedback joined to its inference."""
    await asyncio.gather(*(bus.publish(event) for event in inferences))
    await asyncio.gather(*(bus.publish(event) for event in feedback))
    await eventually(
        lambda: (
            clickhouse.query("SELECT count() AS n FROM feedback_with_inference WHERE inference_stored")[0]["n"]
            >= len(feedback)
        ),
        what="sink stored traffic",
    )


async def read_topic(settings: FlywheelSettings, event: type, *, expect: int, wait_s: float = 5.0) -> list[dict]:
    """Every record on `event`'s topic (from the start), waiting until more than `expect` arrived or `wait_s` passed."""
    consumer = AIOKafkaConsumer(
        topic_for(event, settings.topic_prefix),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[dict] = []
    try:
        deadline = asyncio.get_running_loop().time() + wait_s
        while asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            records += [json.loads(message.value) for batch in batches.values() for message in batch]
            if len(records) > expect:
                break
    finally:
        await consumer.stop()
    return records


def seed_two_versions(door: RegistryDoorFixture, tmp_path: Path) -> None:
    """smollm2 v1 in production, v2 passed the gate, is approved and waits in staging (its approval waits for its canary)."""
    seed_production_and_approved_candidate(door.registry, tmp_path, MODEL)


def arm_traffic(
    version: int, *, down_every: int, error_every: int | None, latency_ms: float, hallucinating: bool
) -> tuple[list[InferenceLogged], list[FeedbackReceived]]:
    inferences, feedback = [], []
    for i in range(PER_ARM):
        product = i % 12
        question = f"Context: product {product} comes with a 2-year warranty and free repairs. Question: how long is the warranty on product {product}?"
        answer = (
            f"Product {product} has a {5 + i % 4}-week warranty, I think."
            if hallucinating
            else f"Product {product} comes with a 2-year warranty."
        )
        failed = error_every is not None and i % error_every == 0
        inference_id = f"inf-{uuid.uuid4().hex[:12]}"
        inferences.append(
            InferenceLogged(
                inference_id=inference_id,
                model_name=MODEL,
                adapter_version=version,
                route="canary" if version > 1 else "production",
                input_text=question,
                output_text="" if failed else answer,
                prompt_tokens=30,
                completion_tokens=0 if failed else 10,
                latency_total_ms=latency_ms + i % 50,
                status=InferenceStatus.error if failed else InferenceStatus.ok,
                error="upstream timeout" if failed else None,
            )
        )
        down = i % down_every == 0
        feedback.append(
            FeedbackReceived(
                inference_id=inference_id, thumbs=Thumbs.down if down else Thumbs.up, rating=1 if down else 4 + i % 2
            )
        )
    return inferences, feedback


@pytest.fixture
def clickhouse(chdb_target: ClickHouseTarget) -> ClickHouseStore:
    """The session's embedded ClickHouse, migrated (chDB allows one data directory per process)."""
    store = chdb_target.open()
    store.migrate()
    return store


@pytest.fixture
def monitor_store(chdb_target: ClickHouseTarget, clickhouse: ClickHouseStore) -> MonitorStore:
    readonly = chdb_target.open(readonly=True)
    return MonitorStore(lambda: clickhouse, lambda: readonly)
