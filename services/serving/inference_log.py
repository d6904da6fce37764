"""`inference.logged`, and the gateway's span.logged of the same call, go out through a bounded in-memory
buffer drained by a background task.

A response never waits for Kafka and never fails because of it: `offer` is a non-blocking put. When
the buffer is full the event is dropped, but counted (`flywheel_serving_inference_log_total{outcome=
"dropped"}`) and logged with its inference id; a publish that keeps failing after retries is
counted and logged the same way. Nothing disappears without a trace.

Each event is scrubbed (services/runtime/privacy.py) before it is published, off the request path:
prompts, answers, messages, errors, user ids and metadata reach the topic redacted or hashed, never
raw. An event that cannot be scrubbed is dropped and counted as failed, never published as it is.

A call's spans travel with its inference as one entry: the buffer's capacity counts calls, a full
buffer drops a call whole (its spans counted on their own metric), and a call's events are published
side by side, so the spans cost the drain one broker round trip per call, not one per span. Each
event keeps one event id across its publish attempts, so an attempt Kafka took but did not confirm
in time is stored once by the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from contracts.events import SPAN_TEXT_MAX, InferenceLogged, SpanLogged
from contracts.envelope import Payload
from services.runtime.broker import EventBus
from services.runtime.privacy import Redactor
from services.runtime.spans import service_span_event_id
from services.serving.spans import ERROR_MAX, NAME_MAX

log = logging.getLogger("flywheel.serving.inference_log")

INFERENCE_LOG = Counter(
    "flywheel_serving_inference_log_total",
    "inference.logged events by outcome: queued, published, dropped (buffer full), failed (publish retries spent).",
    ["outcome"],
)
INFERENCE_LOG_DEPTH = Gauge("flywheel_serving_inference_log_depth", "inference.logged events waiting in the buffer.")
SPAN_LOG = Counter(
    "flywheel_serving_span_log_total",
    "The gateway's span.logged events by outcome: queued, published, dropped (buffer full), failed (scrubbing failed or publish retries spent).",
    ["outcome"],
)


@dataclass(frozen=True)
class _Entry:
    """One call's events: its inference and the gateway's spans of it."""

    inference: InferenceLogged
    spans: Sequence[SpanLogged]
    correlation_id: str | None


class InferenceLogBuffer:
    def __init__(
        self, bus: EventBus, *, capacity: int, redactor: Redactor | None = None, publish_attempts: int = 3
    ) -> None:
        """`redactor`: what scrubs events before they leave; by default the built-in policies (text
        redacted, user ids hashed without a salt)."""
        self._bus = bus
        self._redactor = redactor or Redactor()
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue(maxsize=capacity)
        self._attempts = publish_attempts
        self._task: asyncio.Task[None] | None = None

    def offer(
        self, event: InferenceLogged, *, correlation_id: str | None = None, spans: Sequence[SpanLogged] = ()
    ) -> bool:
        """Queue a call's inference and spans without waiting; False (counted and logged) when the buffer is full."""
        try:
            self._queue.put_nowait(_Entry(event, spans, correlation_id))
        except asyncio.QueueFull:
            INFERENCE_LOG.labels("dropped").inc()
            SPAN_LOG.labels("dropped").inc(len(spans))
            log.warning(
                "inference log buffer full (%d): dropped inference.logged and %d span(s) for %s",
                self._queue.maxsize,
                len(spans),
                event.inference_id,
            )
            return False
        INFERENCE_LOG.labels("queued").inc()
        SPAN_LOG.labels("queued").inc(len(spans))
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
            entry = self._queue.get_nowait()
            INFERENCE_LOG.labels("dropped").inc()
            SPAN_LOG.labels("dropped").inc(len(entry.spans))
            log.warning("stopping: inference.logged for %s not published", entry.inference.inference_id)

    async def _drain(self) -> None:
        while True:
            entry = await self._queue.get()
            try:
                await self._publish(entry)
            finally:
                self._queue.task_done()
                INFERENCE_LOG_DEPTH.set(self._queue.qsize())

    async def _publish(self, entry: _Entry) -> None:
        inference_id = entry.inference.inference_id
        try:
            event = await asyncio.to_thread(self._redactor.scrub_inference, entry.inference)
        except Exception:  # noqa: BLE001 - an event that cannot be scrubbed must not be published raw
            INFERENCE_LOG.labels("failed").inc()
            SPAN_LOG.labels("failed").inc(len(entry.spans))
            log.exception("inference.logged for %s not published: scrubbing it failed", inference_id)
            return
        try:
            spans = await asyncio.to_thread(lambda: [_fit(self._redactor.scrub_span(span)) for span in entry.spans])
        except Exception:  # noqa: BLE001 - as above; the inference itself still goes out
            SPAN_LOG.labels("failed").inc(len(entry.spans))
            log.exception("span.logged for %s not published: scrubbing them failed", inference_id)
            spans = []
        await asyncio.gather(
            self._publish_one(event, uuid.uuid4(), entry.correlation_id, inference_id),
            *(
                self._publish_one(span, service_span_event_id(span), entry.correlation_id, inference_id)
                for span in spans
            ),
        )

    async def _publish_one(
        self, event: Payload, event_id: uuid.UUID, correlation_id: str | None, inference_id: str
    ) -> None:
        outcomes = INFERENCE_LOG if isinstance(event, InferenceLogged) else SPAN_LOG
        for attempt in range(1, self._attempts + 1):
            try:
                await self._bus.publish(event, correlation_id=correlation_id, event_id=event_id)
                outcomes.labels("published").inc()
                return
            except Exception as error:  # noqa: BLE001 - any broker failure is retried, then counted
                if attempt == self._attempts:
                    outcomes.labels("failed").inc()
                    log.error(
                        "%s for %s not published after %d attempts: %s",
                        event.event_type,
                        inference_id,
                        attempt,
                        error,
                    )
                    return
                await asyncio.sleep(0.2 * 2**attempt)


def _fit(span: SpanLogged) -> SpanLogged:
    """The span within the contract's bounds after scrubbing, which can lengthen a text (`a@b.c` -> `[EMAIL]`):
    a span over them would be refused by every consumer that reads it back."""
    cut = {
        "name": span.name[:NAME_MAX],
        "error": span.error[:ERROR_MAX] if span.error is not None else None,
        "input_text": span.input_text[:SPAN_TEXT_MAX],
        "output_text": span.output_text[:SPAN_TEXT_MAX],
    }
    if all(getattr(span, field) == value for field, value in cut.items()):
        return span
    texts_cut = (cut["input_text"], cut["output_text"]) != (span.input_text, span.output_text)
    return span.model_copy(update={**cut, "truncated": span.truncated or texts_cut})
