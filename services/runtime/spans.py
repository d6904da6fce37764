"""A service's own spans, as span.logged events: the event id that makes a republished span one stored
span, and the trace of one retraining.

A retraining is followed by its correlation id (the Envelope's, from the alert's training.requested to
the adapter's evaluation): every service on its path derives the same trace id and the same root span id
from it, so their spans land in one trace without any service asking another, or importing it.

    retraining <model>            chain      monitor    the alert until training.requested (the root)
    ├─ train <job id>             chain      trainer    the training job, from its start to its end
    └─ evaluate <evaluation id>   evaluator  evaluator  scoring both targets and the gate's verdict

Work that was not requested by the monitor (a job posted to the trainer's door, an evaluation asked for
by an operator) is correlated by its own job or evaluation id, so it is a trace of its own whose root is
never stored: the readers show its spans under a parent that is missing, as for any remote parent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contracts.events import SpanKind, SpanLogged, SpanStatus

log = logging.getLogger("flywheel.spans")

# The gateway's namespace, kept for every service's own spans: event ids of spans already stored stay the same.
SERVICE_SPAN_NAMESPACE = uuid.UUID("3b0d8f44-6f5e-4c1e-9a63-2f0a4c7d9e15")
# Trace and span ids of retrainings; changing it would split a retraining in flight across two traces.
RETRAINING_NAMESPACE = uuid.UUID("8c2e5f7a-1d4b-5e93-b6a0-4f3c2d1e9b87")
ROOT_STEP = "retraining"
ERROR_MAX = 8000
# A worker publishes its job's span after the job's own events, then takes the next job: a broker that is
# down costs each job this much at most (a send cut short may still land; its event id dedupes it).
PUBLISH_TIMEOUT_S = 10.0

# Any of the services' publishers: the bus's publish(payload, correlation_id=..., event_id=...).
Publish = Callable[..., Awaitable[Any]]


def span_event_id(namespace: uuid.UUID, *parts: object) -> uuid.UUID:
    """The event id a span is published under, a function of `parts` (the ids that make it one span):
    a span published again after a timed-out attempt that Kafka did take is the same event, stored once."""
    return uuid.uuid5(namespace, "/".join(str(part) for part in parts))


def service_span_event_id(span: SpanLogged) -> uuid.UUID:
    """The event id of a span a service emits itself: one per trace and span."""
    return span_event_id(SERVICE_SPAN_NAMESPACE, span.trace_id, span.span_id)


@dataclass(frozen=True)
class RetrainingTrace:
    """The trace of the retraining `correlation_id` names: its trace id, and one span id per step."""

    correlation_id: str

    @property
    def trace_id(self) -> str:
        # A version-5 UUID has a fixed non-zero nibble, so the id is never the all-zero invalid trace id.
        return uuid.uuid5(RETRAINING_NAMESPACE, f"trace/{self.correlation_id}").hex

    @property
    def root_span_id(self) -> str:
        return self.span_id(ROOT_STEP)

    def span_id(self, step: str) -> str:
        """The span id of one step (`training/<job id>`): the same step, the same span, wherever it is emitted."""
        return uuid.uuid5(RETRAINING_NAMESPACE, f"span/{self.correlation_id}/{step}").hex[:16]

    def span(
        self,
        step: str,
        *,
        name: str,
        kind: SpanKind,
        service_name: str,
        started_at: datetime,
        ended_at: datetime,
        error: str | None = None,
        attributes: dict[str, str] | None = None,
        **fields: Any,
    ) -> SpanLogged:
        """The span of `step`, a child of the root span unless it is the root."""
        root = step == ROOT_STEP
        return SpanLogged(
            trace_id=self.trace_id,
            span_id=self.span_id(step),
            parent_span_id=None if root else self.root_span_id,
            name=name[:256],
            kind=kind,
            service_name=service_name,
            started_at=started_at,
            ended_at=max(ended_at, started_at),
            status=SpanStatus.ok if error is None else SpanStatus.error,
            error=None if error is None else (error or "error")[:ERROR_MAX],
            attributes={"flywheel.correlation_id": self.correlation_id, **(attributes or {})},
            **fields,
        )


async def publish_span(
    publish: Publish, span: SpanLogged, *, correlation_id: str | None, timeout_s: float = PUBLISH_TIMEOUT_S
) -> None:
    """Publish a service's span, best effort: a trace missing a span must never fail the job it describes,
    nor hold its worker for long while the broker is down."""
    try:
        async with asyncio.timeout(timeout_s):
            await publish(span, correlation_id=correlation_id, event_id=service_span_event_id(span))
    except Exception as error:  # noqa: BLE001 - the job's own events carry its outcome; its span only shows it
        log.warning("span %s of trace %s not published (%s: %s)", span.name, span.trace_id, type(error).__name__, error)
