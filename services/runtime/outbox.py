"""The outbox relay: publishes events a service staged in its own database, in order, until the broker has them.

A service that must announce a change writes the event in the change's transaction (its outbox),
so a rolled-back change announces nothing and a committed one is never lost to a broker outage or a
crash. The relay is the same loop for every such service; only the storage differs, behind
`OutboxStorage` (the registry's SQLAlchemy table, claimed with `FOR UPDATE SKIP LOCKED` on
PostgreSQL; the trainer's SQLite table):

- a pass claims a batch of the oldest unsent events, publishes them in order through the event bus
  (`publish_envelope`: the staged envelope as it is, so a republished event keeps its event_id) and
  marks each sent once the broker acknowledged it;
- it runs when kicked (after a commit in this process), else every `interval_s` (another replica
  may have staged events) or only when kicked where `interval_s` is None (nothing else stages them);
  a failed pass is retried with exponential backoff;
- a publish that has not settled within `publish_timeout_s` fails the pass: its event stays unsent;
- stopping drains what is staged, for at most `drain_timeout_s`, before the broker is disconnected.

A crash between publishing and marking sent publishes the event again with the same event_id, and
consumers deduplicate by event_id: at-least-once delivery, made idempotent where it is consumed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from contracts.envelope import Envelope
from contracts.topics import EVENT_TYPES

log = logging.getLogger("flywheel.outbox")

# Longer than the producer's own request timeout: a publish that has not settled by then is abandoned
# with its batch, which stays unsent and is published again.
PUBLISH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class StagedEvent:
    """An event as it was staged: its whole envelope as JSON, so a republished one is identical."""

    event_id: str
    event_type: str
    envelope: str


class OutboxClaim(Protocol):
    """A batch of unsent events held by one relay pass."""

    @property
    def events(self) -> Sequence[StagedEvent]: ...

    def mark_sent(self, event: StagedEvent) -> None: ...


class OutboxStorage(Protocol):
    """Where a service's staged events wait. `claim` is entered in a worker thread and held while its events
    are published; leaving it normally keeps what was marked sent, leaving it by an exception may drop it."""

    def claim(self, limit: int) -> AbstractContextManager[OutboxClaim]: ...


class EnvelopePublisher(Protocol):
    def publish_envelope(self, envelope: Envelope[Any]) -> Awaitable[Any]: ...


class OutboxRelay:
    """Publishes a storage's staged events through the event bus, in order, and marks them sent."""

    def __init__(
        self,
        storage: OutboxStorage,
        bus: EnvelopePublisher,
        *,
        name: str = "outbox-relay",
        interval_s: float | None = 0.2,
        retry_initial_s: float | None = None,
        retry_max_s: float = 10.0,
        batch: int = 100,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
        drain_timeout_s: float = 5.0,
    ) -> None:
        self._storage = storage
        self._bus = bus
        self._name = name
        self._interval = interval_s
        self._retry_initial = retry_initial_s if retry_initial_s is not None else (interval_s or 0.5)
        self._retry_max = max(retry_max_s, self._retry_initial)
        self._batch = batch
        self._publish_timeout = publish_timeout_s
        self._drain_timeout = drain_timeout_s
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        # One pass at a time, across threads: a drain on stop must not race a pass whose task was
        # cancelled while its thread still publishes, nor the worker's own pass the relay loop's.
        self._batch_lock = threading.Lock()

    def kick(self) -> None:
        """Publish soon: called after a commit in this process (from the loop or from a thread), so events need not wait a poll."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or loop is running or loop.is_closed():
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def relay_once(self) -> int:
        """Publish one batch of pending events in order; how many were sent. A publish that fails raises its error."""
        pass_ = _Pass()
        try:
            return await asyncio.to_thread(self._relay_batch, asyncio.get_running_loop(), pass_)
        except asyncio.CancelledError:
            # A thread cannot be cancelled: tell it to stop, and end the publish it waits on, so it lets
            # its claim go now rather than after the publish timeout.
            pass_.abandon()
            raise

    def _relay_batch(self, loop: asyncio.AbstractEventLoop, pass_: _Pass) -> int:
        # The claim may hold a database transaction while its batch is published, so the pass runs in a
        # thread and publishes through the loop.
        with self._batch_lock, self._storage.claim(self._batch) as claim:
            for event in claim.events:
                payload_type = EVENT_TYPES[event.event_type]
                envelope = Envelope[payload_type].model_validate_json(event.envelope)  # type: ignore[valid-type]
                published = pass_.watch(
                    asyncio.run_coroutine_threadsafe(_awaited(self._bus.publish_envelope(envelope)), loop)
                )
                try:
                    published.result(self._publish_timeout)
                except TimeoutError:
                    published.cancel()
                    raise TimeoutError(
                        f"the broker did not acknowledge {event.event_type} {event.event_id} within {self._publish_timeout:.0f}s"
                    ) from None
                claim.mark_sent(event)
            return len(claim.events)

    async def run(self) -> None:
        delay = self._retry_initial
        while True:
            # Cleared before the pass, so a kick during it wakes the next one.
            self._wake.clear()
            try:
                sent = await self.relay_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the relay outlives a broker or database outage; the events wait in the storage
                log.warning(
                    "%s: could not publish staged events (%s: %s); retrying in %.1fs",
                    self._name,
                    type(error).__name__,
                    error,
                    delay,
                )
                await self._wait(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_initial
            if sent < self._batch:
                await self._wait(self._interval)

    async def _wait(self, timeout_s: float | None) -> None:
        if timeout_s is None:
            await self._wake.wait()
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        except TimeoutError:
            pass

    async def drain(self) -> None:
        """Publish every staged event now; raises what stops it."""
        while await self.relay_once() >= self._batch:
            pass

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self.run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        # What is staged but unsent goes out now rather than at the next start: the process stops its
        # services before it disconnects the broker. A broker that is down leaves it staged.
        try:
            await asyncio.wait_for(self.drain(), self._drain_timeout)
        except Exception as error:  # noqa: BLE001 - left in the outbox for the next start
            log.info(
                "%s: staged events not drained on stop (%s: %s); they go out at the next start",
                self._name,
                type(error).__name__,
                error,
            )


class _Pass:
    """One relay pass as its thread and the loop both see it: abandoned when the awaiting task is cancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._publishing: concurrent.futures.Future[Any] | None = None

    def watch(self, publishing: concurrent.futures.Future[Any]) -> concurrent.futures.Future[Any]:
        with self._lock:
            self._publishing = publishing
            if self._abandoned:
                publishing.cancel()
        return publishing

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._publishing is not None:
                self._publishing.cancel()


async def _awaited(publishing: Awaitable[Any]) -> Any:
    # run_coroutine_threadsafe takes a coroutine; a bus may hand back any awaitable.
    return await publishing
