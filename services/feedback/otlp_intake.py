"""What both OTLP doors do with a decoded export: bound it, map its spans, publish them, count them.
The HTTP door (api.py, `POST /v1/traces`) and the gRPC door (otlp_grpc.py) differ only in transport,
authentication and how they say no."""

from __future__ import annotations

import asyncio
import logging

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client import Counter

from contracts.events import SpanLogged
from services.feedback import otlp
from services.feedback.settings import FeedbackSettings
from services.runtime.broker import PUBLISH_FAILURES, EventBus
from services.runtime.privacy import Redactor

log = logging.getLogger("flywheel.feedback.otlp")

OTLP_SPANS = Counter(
    "flywheel_otlp_spans_total",
    "Spans received by the OTLP intake (POST /v1/traces and gRPC TraceService/Export), by transport and outcome: "
    "accepted (published) or rejected (partial success).",
    ["transport", "outcome"],
)


class BrokerUnavailable(RuntimeError):
    """Kafka did not take the spans in time; the exporter should retry (HTTP 503, gRPC UNAVAILABLE)."""


class TraceIntake:
    """Spans in, span.logged out: one instance serves both transports of a process."""

    def __init__(self, bus: EventBus, redactor: Redactor, settings: FeedbackSettings) -> None:
        self._bus = bus
        self._redactor = redactor
        self.settings = settings

    def check_size(self, request: ExportTraceServiceRequest) -> None:
        """TooLarge when the request carries more spans than one request may."""
        spans = otlp.count_spans(request)
        if spans > self.settings.otlp_max_spans:
            raise otlp.TooLarge(
                f"the request carries {spans} spans; at most {self.settings.otlp_max_spans} per request "
                "(lower the exporter's batch size, e.g. OTEL_BSP_MAX_EXPORT_BATCH_SIZE)"
            )

    def map(self, request: ExportTraceServiceRequest, principal: str) -> otlp.Mapped:
        """The request's spans checked, scrubbed and mapped (CPU work: callers run it off the event loop)."""
        self.check_size(request)
        # Spans of one request repeat their texts (a chain's input is its LLM call's, answers and system
        # prompts recur): each distinct text is scrubbed once per request.
        return otlp.map_request(request, principal=principal, redactor=self._redactor.remembering())

    async def publish(self, mapped: otlp.Mapped, *, transport: str) -> ExportTraceServiceResponse:
        """Publish the accepted spans and answer OTLP's response; BrokerUnavailable when Kafka does not take them."""
        timeout = self.settings.otlp_publish_timeout_s
        try:
            await asyncio.wait_for(_publish_spans(self._bus, mapped.spans), timeout)
        except PUBLISH_FAILURES as error:
            # Spans published before the failure are republished under the same event ids on the
            # exporter's retry, and consumers deduplicate them: none is stored twice.
            log.warning("OTLP spans not published: Kafka did not take them (%s)", type(error).__name__)
            raise BrokerUnavailable(
                f"Kafka did not take the spans within {timeout:g} s ({type(error).__name__}); retry later"
            ) from None
        OTLP_SPANS.labels(transport=transport, outcome="accepted").inc(len(mapped.spans))
        OTLP_SPANS.labels(transport=transport, outcome="rejected").inc(len(mapped.rejections))
        return mapped.response()


async def _publish_spans(bus: EventBus, spans: list[SpanLogged]) -> None:
    """Publish side by side (the producer batches them); on the first failure, or when the wait is cut
    short, the publishes still pending are cancelled rather than left running past the answer."""
    publishes = [asyncio.ensure_future(bus.publish(span, event_id=otlp.span_event_id(span))) for span in spans]
    try:
        await asyncio.gather(*publishes)
    except BaseException:
        for publish in publishes:
            publish.cancel()
        await asyncio.gather(*publishes, return_exceptions=True)
        raise
