"""The outbox relay with several registry replicas, and its last drain when a process stops.

Two relays on one database publish every committed event once and in commit order (PostgreSQL:
FOR UPDATE SKIP LOCKED, a relay never overtakes a batch another one holds; SQLite: one writer). A
change committed just before shutdown reaches Kafka during the stop, before the broker disconnects.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import select, text

from contracts.envelope import Envelope
from contracts.topics import topic_for
from services.registry.app import create_app
from services.registry.models import OutboxEvent
from services.registry.outbox import OutboxRelay
from services.registry.service import Registry
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.auth import registry_database_url
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from tests.integration.registry_support import database_url, registry  # noqa: F401 - fixtures
from tests.integration.test_event_bus import read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


class RecordingBus:
    """Stands in for Kafka where only who published what, in which order, matters."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish_envelope(self, envelope: Envelope) -> None:
        await asyncio.sleep(0.005)  # a publish takes a while: long enough for the relays to overlap
        self.published.append(str(envelope.event_id))


def outbox(store: RegistryStore) -> list[OutboxEvent]:
    with store.reading() as session:
        return list(session.scalars(select(OutboxEvent).order_by(OutboxEvent.id)))


async def test_two_relays_publish_each_event_once_in_commit_order(registry: Registry, database_url: str) -> None:  # noqa: F811
    for index in range(30):
        registry.prompts.publish_prompt("alice", name=f"p{index}", template="Answer {{ q }}")
    replica = RegistryStore(database_url)  # a second registry process: its own connections
    bus = RecordingBus()
    relays = [OutboxRelay(registry.store, bus, batch=4), OutboxRelay(replica, bus, batch=4)]

    async def relay_until_empty(relay: OutboxRelay) -> None:
        while any(row.sent_at is None for row in await asyncio.to_thread(outbox, registry.store)):
            if not await relay.relay_once():
                await asyncio.sleep(0.01)

    try:
        if registry.store.dialect == "postgresql":
            with registry.store.transaction() as session:
                # Another relay holds the oldest row: this one neither waits for it nor overtakes it.
                session.execute(text("SELECT id FROM outbox ORDER BY id LIMIT 1 FOR UPDATE"))
                assert await asyncio.wait_for(relays[1].relay_once(), 5) == 0
            assert bus.published == []
        await asyncio.wait_for(asyncio.gather(*(relay_until_empty(relay) for relay in relays)), 120)
    finally:
        replica.close()
    assert bus.published == [row.event_id for row in outbox(registry.store)]


async def test_a_change_committed_just_before_shutdown_is_published_during_stop(
    settings: FlywheelSettings, topics: str
) -> None:
    # The relay would not poll again for an hour: only the drain on stop can publish the change.
    registry = partial(create_app, settings=RegistrySettings(outbox_interval_s=3600))
    app, _ = build_process(settings, [registry], title="registry-stop-test")
    store = RegistryStore(registry_database_url(settings))
    try:
        async with app.router.lifespan_context(app):
            # A change made beside the running registry (as `flywheel registry` does): nothing kicks its relay.
            Registry(store, ArtifactStore(Path(settings.home) / "artifacts")).prompts.publish_prompt(
                "cli:ops", name="late", template="Hi {{ name }}"
            )
            await asyncio.sleep(0.5)
            assert [row.sent_at for row in outbox(store)] == [None]
        records = await read_all(
            settings.kafka_bootstrap or "", topic_for("prompt.published", topics), expected=1, timeout_s=15
        )
        assert [json.loads(record.value)["payload"]["prompt_name"] for record in records] == ["late"]
        (row,) = outbox(store)
        assert row.sent_at is not None and json.loads(records[0].value)["event_id"] == row.event_id
    finally:
        store.close()
