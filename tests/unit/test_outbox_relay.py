"""The runtime's outbox relay over a real SQLite outbox: order, marking sent, a publish that never settles,
a kick from a worker thread, retrying through an outage without a kick, and the drain on stop. The bus
records what it is handed (Kafka is not under test here; the registry's and the trainer's relay tests
use the real broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from contracts.envelope import Envelope, wrap
from contracts.events import PromptPublished
from services.runtime.outbox import OutboxClaim, OutboxRelay, StagedEvent
from services.runtime.sqlite import Migration, SqliteDatabase

pytestmark = pytest.mark.unit

SCHEMA = Migration(
    1,
    "outbox",
    "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE, event_type TEXT, envelope TEXT, sent INTEGER DEFAULT 0);",
)


class SqliteOutbox:
    """A storage as a service writes one: rows staged in SQLite, each marked sent once acknowledged."""

    def __init__(self, path: Path) -> None:
        self.db = SqliteDatabase(path, [SCHEMA])

    def stage(self, name: str) -> str:
        envelope = wrap(
            PromptPublished(prompt_name=name, version=1, template="Hi {{ who }}", variables=["who"], actor="test"),
            producer="test",
        )
        self.db.execute(
            "INSERT INTO outbox (event_id, event_type, envelope) VALUES (?, ?, ?)",
            (str(envelope.event_id), envelope.event_type, envelope.model_dump_json()),
        )
        return str(envelope.event_id)

    def unsent(self) -> list[str]:
        return [event_id for (event_id,) in self.db.rows("SELECT event_id FROM outbox WHERE sent = 0 ORDER BY seq")]

    @contextmanager
    def claim(self, limit: int) -> Iterator[OutboxClaim]:
        rows = self.db.rows(
            "SELECT event_id, event_type, envelope FROM outbox WHERE sent = 0 ORDER BY seq LIMIT ?", (limit,)
        )
        yield _Claim(self.db, [StagedEvent(*row) for row in rows])


class _Claim:
    def __init__(self, db: SqliteDatabase, events: list[StagedEvent]) -> None:
        self.db = db
        self.events = events

    def mark_sent(self, event: StagedEvent) -> None:
        self.db.execute("UPDATE outbox SET sent = 1 WHERE event_id = ?", (event.event_id,))


class RecordingBus:
    def __init__(self, *, failures: int = 0, hang: bool = False) -> None:
        self.published: list[str] = []
        self.failures = failures
        self.hang = hang

    async def publish_envelope(self, envelope: Envelope[Any]) -> None:
        if self.hang:
            await asyncio.Event().wait()  # a broker that never acknowledges
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker down")
        self.published.append(str(envelope.event_id))


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[SqliteOutbox]:
    storage = SqliteOutbox(tmp_path / "outbox.db")
    yield storage
    storage.db.close()


async def eventually(condition: Any, timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_pass_publishes_in_staged_order_in_batches_and_marks_each_sent(outbox: SqliteOutbox) -> None:
    staged = [outbox.stage(f"p{index}") for index in range(5)]
    bus = RecordingBus()
    relay = OutboxRelay(outbox, bus, batch=2)
    assert await relay.relay_once() == 2
    assert bus.published == staged[:2] and outbox.unsent() == staged[2:]
    await relay.drain()
    assert bus.published == staged and outbox.unsent() == []
    assert await relay.relay_once() == 0 and bus.published == staged


async def test_a_publish_the_broker_never_acknowledges_fails_the_pass_and_stays_unsent(outbox: SqliteOutbox) -> None:
    event_id = outbox.stage("stuck")
    relay = OutboxRelay(outbox, RecordingBus(hang=True), publish_timeout_s=0.3)
    with pytest.raises(TimeoutError, match=f"did not acknowledge prompt.published {event_id}"):
        await asyncio.wait_for(relay.relay_once(), 10)
    assert outbox.unsent() == [event_id]
    bus = RecordingBus()
    assert await OutboxRelay(outbox, bus).relay_once() == 1
    assert bus.published == [event_id] and outbox.unsent() == []


async def test_a_kick_from_a_worker_thread_publishes_without_waiting_for_the_poll(outbox: SqliteOutbox) -> None:
    bus = RecordingBus()
    relay = OutboxRelay(outbox, bus, interval_s=3600)  # it would not poll again within the test
    await relay.start()
    try:
        await asyncio.sleep(0.2)  # its first pass found nothing; it now waits for a kick or the hour

        def commit_and_kick() -> str:
            event_id = outbox.stage("kicked")
            relay.kick()
            return event_id

        event_id = await asyncio.to_thread(commit_and_kick)
        await eventually(lambda: bus.published == [event_id], 5, "the kicked event")
    finally:
        await relay.stop()
    assert outbox.unsent() == []


async def test_a_relay_that_only_wakes_when_kicked_still_retries_through_an_outage(outbox: SqliteOutbox) -> None:
    event_id = outbox.stage("after-outage")
    bus = RecordingBus(failures=3)
    relay = OutboxRelay(outbox, bus, interval_s=None, retry_initial_s=0.05, retry_max_s=0.2)
    await relay.start()
    try:
        await eventually(lambda: bus.published == [event_id], 10, "the event once the broker is back")
    finally:
        await relay.stop()
    assert bus.failures == 0 and outbox.unsent() == []


async def test_stop_drains_what_was_staged_after_the_last_pass(outbox: SqliteOutbox) -> None:
    bus = RecordingBus()
    relay = OutboxRelay(outbox, bus, interval_s=3600, batch=2)
    await relay.start()
    await asyncio.sleep(0.2)
    staged = [outbox.stage(f"late{index}") for index in range(5)]  # nothing kicks the relay
    await relay.stop()
    assert bus.published == staged and outbox.unsent() == []


async def test_stop_with_the_broker_down_leaves_the_events_staged_within_its_drain_time(outbox: SqliteOutbox) -> None:
    event_id = outbox.stage("kept")
    bus = RecordingBus(hang=True)
    relay = OutboxRelay(outbox, bus, interval_s=None, publish_timeout_s=30, drain_timeout_s=0.5)
    await asyncio.wait_for(relay.stop(), 10)
    assert outbox.unsent() == [event_id] and bus.published == []
    # The abandoned pass let its claim go at once, not after the 30 s publish timeout: the next pass runs now.
    bus.hang = False
    assert await asyncio.wait_for(relay.relay_once(), 5) == 1
    assert bus.published == [event_id] and outbox.unsent() == []
