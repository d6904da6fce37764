"""`inference.logged` goes out through a bounded in-memory buffer drained by a background task.

A response never waits for Kafka and never fails because of it: `offer` is a non-blocking put. When
the buffer is full the event is dropped, but counted (`flywheel_serving_inference_log_total{outcome=
"dropped"}`) and logged with its inference id; a publish that keeps failing after retries is
counted and logged the same way. Nothing disappears without a trace.

Each event is scrubbed (services/runtime/privacy.py) before it is published, off the request path:
prompts, answers, messages, errors, user ids and metadata reach the topic redacted or hashed, never
raw. An event that cannot be scrubbed is dropped and counted as failed, never published as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Counter, Gauge

from contracts.events import InferenceLogged
from services.runtime.broker import EventBus
from services.runtime.privacy import Redactor

log = logging.getLogger("flywheel.serving.inference_log")

INFERENCE_LOG = Counter(
    "flywheel_serving_inference_log_total",
    "inference.logged events by outcome: queued, published, dropped (buffer full), failed (publish retries spent).",
    ["outcome"],
)
INFERENCE_LOG_DEPTH = Gauge("flywheel_serving_inference_log_depth", "inference.logged events waiting in the buffer.")


class InferenceLogBuffer:
    def __init__(
        self, bus: EventBus, *, capacity: int, redactor: Redactor | None = None, publish_attempts: int = 3
    ) -> None:
        """`redactor`: what scrubs events before they leave; by default the built-in policies (text
        redacted, user ids hashed without a salt)."""
        self._bus = bus
        self._redactor = redactor or Redactor()
        self._queue: asyncio.Queue[tuple[InferenceLogged, str | None]] = asyncio.Queue(maxsize=capacity)
        self._attempts = publish_attempts
        self._task: asyncio.Task[None] | None = None

    def offer(self, event: InferenceLogged, *, correlation_id: str | None = None) -> bool:
        """Queue an event without waiting; False (counted and logged) when the buffer is full."""
        try:
            self._queue.put_nowait((event, correlation_id))
        except asyncio.QueueFull:
            INFERENCE_LOG.labels("dropped").inc()
            log.warning(
                "inference log buffer full (%d): dropped inference.logged for %s",
                self._queue.maxsize,
                event.inference_id,
            )
            return False
        INFERENCE_LOG.labels("queued").inc()
        INFERENCE_LOG_DEPTH.set(self._queue.qsize())
        return True

    async def start(self) -> None:
        self._task = asyncio.create_task(self._drain(), name="inference-log")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Publish what is queued (up to `timeout_s`), then stop; what is left is counted as dropped."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        while not self._queue.empty():
            event, _ = self._queue.get_nowait()
            INFERENCE_LOG.labels("dropped").inc()
            log.warning("stopping: inference.logged for %s not published", event.inference_id)

    async def _drain(self) -> None:
        while True:
            event, correlation_id = await self._queue.get()
            try:
                await self._publish(event, correlation_id)
            finally:
                self._queue.task_done()
                INFERENCE_LOG_DEPTH.set(self._queue.qsize())

    async def _publish(self, event: InferenceLogged, correlation_id: str | None) -> None:
        try:
            event = await asyncio.to_thread(self._redactor.scrub_inference, event)
        except Exception:  # noqa: BLE001 - an event that cannot be scrubbed must not be published raw
            INFERENCE_LOG.labels("failed").inc()
            log.exception("inference.logged for %s not published: scrubbing it failed", event.inference_id)
            return
        for attempt in range(1, self._attempts + 1):
            try:
                await self._bus.publish(event, correlation_id=correlation_id)
                INFERENCE_LOG.labels("published").inc()
                return
            except Exception as error:  # noqa: BLE001 - any broker failure is retried, then counted
                if attempt == self._attempts:
                    INFERENCE_LOG.labels("failed").inc()
                    log.error(
                        "inference.logged for %s not published after %d attempts: %s",
                        event.inference_id,
                        attempt,
                        error,
                    )
                    return
                await asyncio.sleep(0.2 * 2**attempt)
