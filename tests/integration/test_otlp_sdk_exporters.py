"""An app traced with the unmodified OpenTelemetry SDK sends its spans to Flywheel with OpenTelemetry's own
OTLP exporters, gRPC and HTTP, and they land once each in ClickHouse: the feedback service as `flywheel
run feedback` builds it (sink, OTLP doors on HTTP and gRPC) over the real broker and chDB. The gRPC
door's refusals (no key, a bad key, a role too low, a malformed, oversized or too-full export, a gzip
bomb, Kafka down) are answered with the codes OTLP prescribes, and publish nothing."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode, Tracer

from infra.processes import free_port
from contracts.http import Role
from services.feedback.app import create_app
from services.feedback.otlp_grpc import METHOD_PATH, OtlpGrpcServer, TraceExportServicer
from services.feedback.otlp_intake import TraceIntake
from services.feedback.settings import FeedbackSettings
from services.runtime.auth import Authenticator
from services.runtime.broker import EventBus, create_broker
from services.runtime.http import RefusalLog
from services.runtime.privacy import PrivacySettings, Redactor
from services.runtime.service import Runtime, build_process
from services.runtime.settings import FlywheelSettings
from tests.integration.test_otlp_intake import spans_on_the_topic
from tests.support import api_key, eventually, served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SESSION = "conv-1"
QUESTIONS = ("Is the X200 still under warranty?", "Order 1182 then?", "Can I return it instead?")


def intake_settings(**bounds: Any) -> FeedbackSettings:
    return FeedbackSettings(otlp_grpc_port=free_port(), batch_max_wait_ms=100, **bounds)


@asynccontextmanager
async def feedback_service(
    settings: FlywheelSettings, feedback: FeedbackSettings
) -> AsyncIterator[tuple[str, Runtime]]:
    """The feedback service as `flywheel run feedback` builds it, served; yields its URL and runtime."""
    app, runtime = build_process(
        settings,
        [functools.partial(create_app, settings=feedback, privacy=PrivacySettings())],
        title="flywheel-feedback",
    )
    async with served(app) as url:
        yield url, runtime


@asynccontextmanager
async def tracer(exporter: Any) -> AsyncIterator[tuple[Tracer, InMemorySpanExporter]]:
    """A tracer of an app as users set one up (batching processor, OTLP exporter), and a copy of every span
    it ended, which is what Flywheel must store. Shut down (flushed) off the event loop: the exporters block."""
    provider = TracerProvider(resource=Resource.create({"service.name": "rag-app"}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    ended = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(ended))
    try:
        yield provider.get_tracer("rag-app.pipeline"), ended
    finally:
        flushed = await asyncio.to_thread(provider.force_flush, 30_000)
        await asyncio.to_thread(provider.shutdown)
        assert flushed, "the exporter did not flush within 30 s"


def answer_turn(tracer: Tracer, question: str, turn: int) -> None:
    """One turn of a RAG pipeline: retrieval, a tool call, and two LLM calls (plan, then answer) under a chain,
    attributed as OpenInference and the GenAI conventions attribute them."""
    with tracer.start_as_current_span(
        "answer", attributes={"openinference.span.kind": "CHAIN", "session.id": SESSION, "input.value": question}
    ) as root:
        with tracer.start_as_current_span(
            "retrieve", attributes={"openinference.span.kind": "RETRIEVER", "input.value": question}
        ):
            pass
        with tracer.start_as_current_span(
            "execute_tool lookup_order",
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order"},
        ) as tool:
            if turn == 2:
                tool.set_status(Status(StatusCode.ERROR, "order service timed out"))
        for step in ("plan", "answer"):
            with tracer.start_as_current_span(
                f"chat smollm2 {step}",
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": "smollm2-135m-instruct",
                    "gen_ai.usage.input_tokens": 40 + turn,
                    "gen_ai.usage.output_tokens": 8,
                    "gen_ai.conversation.id": SESSION,
                },
            ):
                pass
        root.set_attribute("output.value", f"answer {turn}")


def tree(spans: Iterator[ReadableSpan] | list[ReadableSpan]) -> set[tuple[str, str, str | None, str]]:
    """(trace, span, parent, name) of each span, as the SDK knows them."""
    return {
        (
            format(span.context.trace_id, "032x"),
            format(span.context.span_id, "016x"),
            format(span.parent.span_id, "016x") if span.parent else None,
            span.name,
        )
        for span in spans
    }


async def stored(runtime: Runtime, sql: str) -> list[dict[str, Any]]:
    # The sink owns chDB in this process; the test reads through the same store.
    return await asyncio.to_thread(runtime.clickhouse().query, sql)


@pytest.mark.usefixtures("own_embedded_clickhouse")
async def test_sdk_exporters_over_grpc_and_http_land_every_span_once(settings: FlywheelSettings, topics: str) -> None:
    key = api_key(settings, Role.app)
    feedback = intake_settings()
    async with feedback_service(settings, feedback) as (url, runtime):
        grpc_exporter = GrpcSpanExporter(
            endpoint=f"http://127.0.0.1:{feedback.otlp_grpc_port}",
            insecure=True,
            headers={"authorization": f"Bearer {key}"},
        )
        http_exporter = HttpSpanExporter(endpoint=f"{url}/v1/traces", headers={"Authorization": f"Bearer {key}"})
        # The first two turns of the conversation are exported over gRPC, the third over HTTP, as two
        # processes of one app might.
        async with tracer(grpc_exporter) as (grpc_tracer, over_grpc):
            for turn, question in enumerate(QUESTIONS[:2], start=1):
                answer_turn(grpc_tracer, question, turn)
        async with tracer(http_exporter) as (http_tracer, over_http):
            answer_turn(http_tracer, QUESTIONS[2], 3)

        sent = tree(over_grpc.get_finished_spans()) | tree(over_http.get_finished_spans())
        assert len(sent) == 15

        async def all_stored() -> bool:
            return (await stored(runtime, "SELECT count() AS n FROM span"))[0]["n"] >= 15

        await eventually(all_stored, timeout_s=60, what="the sink storing the 15 spans")
        rows = await stored(
            runtime, "SELECT trace_id, span_id, parent_span_id, name, kind, status, error, session_id FROM span"
        )
        # Once each: the sink's exactly-once insert leaves no duplicate row, even before merges.
        assert len(rows) == 15
        assert {(row["trace_id"], row["span_id"], row["parent_span_id"], row["name"]) for row in rows} == sent
        kinds = {row["name"]: row["kind"] for row in rows}
        assert kinds == {
            "answer": "chain",
            "retrieve": "retrieval",
            "execute_tool lookup_order": "tool",
            "chat smollm2 plan": "llm",
            "chat smollm2 answer": "llm",
        }
        failed = [row for row in rows if row["status"] == "error"]
        assert [(row["name"], row["error"]) for row in failed] == [
            ("execute_tool lookup_order", "order service timed out")
        ]

        traces = await stored(
            runtime, "SELECT trace_id, span_count, llm_span_count, error_spans FROM trace_summary ORDER BY started_at"
        )
        assert [(row["span_count"], row["llm_span_count"]) for row in traces] == [(5, 2)] * 3
        assert [row["error_spans"] for row in traces] == [0, 1, 0]
        sessions = await stored(runtime, "SELECT session_id, traces, turns, span_count FROM session_summary")
        assert sessions == [{"session_id": SESSION, "traces": 3, "turns": 3, "span_count": 15}]


def export_call(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """TraceService/Export taking raw bytes, so malformed bodies can be sent."""
    return channel.unary_unary(
        METHOD_PATH, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString
    )


def export_of(count: int) -> bytes:
    export = ExportTraceServiceRequest()
    scope = export.resource_spans.add().scope_spans.add()
    for index in range(count):
        span = scope.spans.add()
        span.trace_id = bytes.fromhex("5bf92f3577b34da6a3ce929d0e0e4737")
        span.span_id = (index + 1).to_bytes(8, "big")
        span.name = "step"
        span.start_time_unix_nano = 1_733_450_000_000_000_000
        span.end_time_unix_nano = 1_733_450_000_100_000_000
    return export.SerializeToString()


async def refusal(call: grpc.aio.UnaryUnaryMultiCallable, body: bytes, **options: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(body, timeout=30, **options)
    return refused.value.code(), refused.value.details() or ""


@pytest.mark.usefixtures("own_embedded_clickhouse")
async def test_grpc_refusals_publish_nothing(settings: FlywheelSettings, topics: str) -> None:
    app_key, viewer_key = api_key(settings, Role.app), api_key(settings, Role.viewer)
    feedback = intake_settings(otlp_max_spans=50, otlp_max_inflated_bytes=1024 * 1024)
    as_app = (("authorization", f"Bearer {app_key}"),)
    async with (
        feedback_service(settings, feedback),
        grpc.aio.insecure_channel(f"127.0.0.1:{feedback.otlp_grpc_port}") as channel,
    ):
        call = export_call(channel)
        cases = {
            "no key": (await refusal(call, export_of(1)), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
            "a bad key": (
                await refusal(call, export_of(1), metadata=(("authorization", "Bearer fw_nope_nope"),)),
                grpc.StatusCode.UNAUTHENTICATED,
                "",
            ),
            "a viewer's key": (
                await refusal(call, export_of(1), metadata=(("authorization", f"Bearer {viewer_key}"),)),
                grpc.StatusCode.PERMISSION_DENIED,
                "test-viewer has role viewer; this needs app or higher",
            ),
            "garbage": (
                await refusal(call, b"\xff\xff\xff\xff", metadata=as_app),
                grpc.StatusCode.INVALID_ARGUMENT,
                "the body is not an OTLP ExportTraceServiceRequest in protobuf",
            ),
            "a truncated export": (
                await refusal(call, export_of(3)[:-7], metadata=as_app),
                grpc.StatusCode.INVALID_ARGUMENT,
                "the body is not an OTLP ExportTraceServiceRequest in protobuf",
            ),
            "too many spans": (
                await refusal(call, export_of(51), metadata=as_app),
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request carries 51 spans; at most 50 per request",
            ),
            # gRPC's own bound, checked before the servicer runs; compressed, it is checked once inflated.
            "an oversized message": (
                await refusal(call, b"\n" + b"\0" * (2 * 1024 * 1024), metadata=as_app),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "",
            ),
            "a gzip bomb": (
                await refusal(
                    call, export_of(1) + b"\0" * (8 * 1024 * 1024), metadata=as_app, compression=grpc.Compression.Gzip
                ),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "",
            ),
        }
        for case, ((code, details), expected_code, message) in cases.items():
            assert code == expected_code, (case, code, details)
            assert details.startswith(message), (case, details)
        # The channel and the door still work, and what it accepts is all that was published.
        accepted = await call(export_of(2), metadata=as_app, timeout=30)
        assert accepted == ExportTraceServiceResponse()
    published = await spans_on_the_topic(settings, 2)
    assert sorted(envelope.payload.span_id for envelope in published) == ["0000000000000001", "0000000000000002"]


async def test_kafka_not_taking_the_spans_is_unavailable_which_exporters_retry(settings: FlywheelSettings) -> None:
    key = api_key(settings, Role.app)
    feedback = intake_settings(otlp_publish_timeout_s=3)
    broker = create_broker(settings, client_id="otlp-grpc-door")  # never connected: every publish fails
    bus = EventBus(broker, producer="feedback", topic_prefix=settings.topic_prefix)
    door = OtlpGrpcServer(
        TraceExportServicer(TraceIntake(bus, Redactor(), feedback), Authenticator.for_settings(settings), RefusalLog()),
        host="127.0.0.1",
        port=feedback.otlp_grpc_port,
        max_message_bytes=feedback.otlp_max_inflated_bytes,
    )
    await door.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{door.port}") as channel:
            code, details = await refusal(
                export_call(channel), export_of(1), metadata=(("authorization", f"Bearer {key}"),)
            )
    finally:
        await door.stop()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith("Kafka did not take the spans within 3 s"), details


def test_an_occupied_port_stops_the_start_with_what_to_do(settings: FlywheelSettings) -> None:
    """A port another program holds without sharing it: the process does not start half-served."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        door = OtlpGrpcServer(
            TraceExportServicer(
                TraceIntake(
                    EventBus(create_broker(settings, client_id="x"), producer="feedback"),
                    Redactor(),
                    FeedbackSettings(),
                ),
                Authenticator.for_settings(settings),
                RefusalLog(),
            ),
            host="127.0.0.1",
            port=port,
            max_message_bytes=1024 * 1024,
        )
        with pytest.raises(RuntimeError, match="FLYWHEEL_FEEDBACK_OTLP_GRPC_PORT"):
            asyncio.run(door.start())
