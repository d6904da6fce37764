"""The OTLP/HTTP trace intake (`POST /v1/traces` of the feedback service) served over real HTTP by uvicorn,
publishing to the real broker: OTLP/protobuf (gzip) and OTLP/JSON requests built as exporters build them,
sent to the feedback service as `flywheel run feedback` builds it, their span.logged records read back
from the topic field by field; partial success, and refusals (401, 403, 413, 400, 415, 503) that
publish nothing, against the door alone."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from contracts.envelope import Envelope
from contracts.events import SpanKind, SpanLogged, SpanStatus
from contracts.http import Role
from contracts.topics import topic_for
from services.feedback import otlp
from services.feedback.api import create_otlp_router, otlp_body_limits
from services.feedback.otlp_intake import TraceIntake
from services.feedback.settings import FeedbackSettings
from services.runtime.auth import Authenticator
from services.runtime.broker import EventBus, create_broker
from services.runtime.http import create_http_app
from services.runtime.privacy import Redactor
from services.runtime.settings import FlywheelSettings
from tests.integration.test_event_bus import read_all
from tests.support import api_key, served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Small bounds, so the refusals are cheap to provoke.
LIMITS = FeedbackSettings(
    otlp_max_body_bytes=256 * 1024, otlp_max_inflated_bytes=1024 * 1024, otlp_max_spans=50, otlp_publish_timeout_s=5
)
RAG_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CHAT_TRACE = "5bf92f3577b34da6a3ce929d0e0e4737"
ROOT, RETRIEVE, TOOL, LLM = "00f067aa0ba902b7", "1111111111111111", "2222222222222222", "3333333333333333"
T0 = 1_733_450_000_000_000_000  # 2024-12-06T01:53:20Z, in nanoseconds
AT = datetime(2024, 12, 6, 1, 53, 20, tzinfo=UTC)
PROTOBUF_GZIP = {"Content-Type": otlp.PROTOBUF, "Content-Encoding": "gzip"}


def ms(count: int) -> int:
    return count * 1_000_000


def attributes(**values: Any) -> list[KeyValue]:
    def any_value(value: Any) -> AnyValue:
        if isinstance(value, int):
            return AnyValue(int_value=value)
        if isinstance(value, float):
            return AnyValue(double_value=value)
        return AnyValue(string_value=value)

    return [KeyValue(key=key.replace("__", "."), value=any_value(value)) for key, value in values.items()]


def step(span_id: str, parent: str | None, name: str, start_ms: int, end_ms: int, **values: Any) -> Span:
    return Span(
        trace_id=bytes.fromhex(RAG_TRACE),
        span_id=bytes.fromhex(span_id),
        parent_span_id=bytes.fromhex(parent) if parent else b"",
        name=name,
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=T0 + ms(start_ms),
        end_time_unix_nano=T0 + ms(end_ms),
        attributes=attributes(**values),
    )


def rag_trace() -> ExportTraceServiceRequest:
    """A chain with a retrieval, a tool call and an LLM call under it, as OpenInference and GenAI instrumentations emit them."""
    tool = step(
        TOOL,
        ROOT,
        "execute_tool lookup_order",
        130,
        180,
        gen_ai__operation__name="execute_tool",
        gen_ai__tool__name="lookup_order",
    )
    tool.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="order service timed out"))
    export = ExportTraceServiceRequest()
    resource_spans = export.resource_spans.add()
    resource_spans.resource.attributes.extend(attributes(service__name="rag-app"))
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "rag-app.pipeline"
    scope_spans.spans.extend(
        [
            step(
                ROOT,
                None,
                "rag answer",
                0,
                900,
                openinference__span__kind="CHAIN",
                input__value="What is the warranty on the X200?",
                output__value="Two years.",
                session__id="session-1",
                user__id="user-7",
            ),
            step(
                RETRIEVE,
                ROOT,
                "retrieve",
                10,
                120,
                openinference__span__kind="RETRIEVER",
                input__value="warranty X200",
                retrieval__documents__0__document__content="X200 warranty: 2 years",
                retrieval__documents__0__document__score=0.92,
            ),
            tool,
            step(
                LLM,
                ROOT,
                "chat smollm2",
                200,
                880,
                gen_ai__operation__name="chat",
                gen_ai__request__model="smollm2-135m-instruct",
                gen_ai__usage__input_tokens=48,
                gen_ai__usage__output_tokens=6,
                gen_ai__input__messages='[{"role":"user","content":"What is the warranty on the X200?"}]',
                gen_ai__output__messages='[{"role":"assistant","content":"Two years."}]',
                gen_ai__conversation__id="session-1",
                flywheel__inference_id="chatcmpl-abc123",
                flywheel__adapter_version=2,
            ),
        ]
    )
    return export


def expected_rag_spans() -> dict[str, dict[str, Any]]:
    common = {
        "trace_id": RAG_TRACE,
        "service_name": "rag-app",
        "principal": "test-app",
        "truncated": False,
        "status": SpanStatus.unset,
        "error": None,
        "model_name": None,
        "adapter_version": None,
        "inference_id": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": None,
        "input_text": "",
        "output_text": "",
        "user_id": None,
        "session_id": None,
        "parent_span_id": ROOT,
    }
    scope = {"otel.scope.name": "rag-app.pipeline"}

    def at(offset_ms: int) -> datetime:
        return AT + timedelta(milliseconds=offset_ms)

    return {
        ROOT: {
            **common,
            "span_id": ROOT,
            "parent_span_id": None,
            "name": "rag answer",
            "kind": SpanKind.chain,
            "started_at": at(0),
            "ended_at": at(900),
            "input_text": "What is the warranty on the X200?",
            "output_text": "Two years.",
            "session_id": "session-1",
            "user_id": Redactor().scrub_user("user-7"),
            "attributes": scope,
        },
        RETRIEVE: {
            **common,
            "span_id": RETRIEVE,
            "name": "retrieve",
            "kind": SpanKind.retrieval,
            "started_at": at(10),
            "ended_at": at(120),
            "input_text": "warranty X200",
            "attributes": {
                "retrieval.documents.0.document.content": "X200 warranty: 2 years",
                "retrieval.documents.0.document.score": "0.92",
                **scope,
            },
        },
        TOOL: {
            **common,
            "span_id": TOOL,
            "name": "execute_tool lookup_order",
            "kind": SpanKind.tool,
            "started_at": at(130),
            "ended_at": at(180),
            "status": SpanStatus.error,
            "error": "order service timed out",
            "attributes": {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order", **scope},
        },
        LLM: {
            **common,
            "span_id": LLM,
            "name": "chat smollm2",
            "kind": SpanKind.llm,
            "started_at": at(200),
            "ended_at": at(880),
            "model_name": "smollm2-135m-instruct",
            "prompt_tokens": 48,
            "completion_tokens": 6,
            "input_text": '[{"role":"user","content":"What is the warranty on the X200?"}]',
            "output_text": '[{"role":"assistant","content":"Two years."}]',
            "session_id": "session-1",
            "inference_id": "chatcmpl-abc123",
            "adapter_version": 2,
            "attributes": {"gen_ai.operation.name": "chat", **scope},
        },
    }


def chat_json(*spans: dict[str, Any]) -> bytes:
    """An OTLP/JSON request as an exporter writes it: hex ids, lowerCamelCase, 64-bit integers as strings."""
    return json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "support-bot"}}]},
                    "scopeSpans": [{"scope": {"name": "openinference.instrumentation.openai"}, "spans": list(spans)}],
                }
            ]
        }
    ).encode()


def chat_span(span_id: str, *, start_ms: int = 0, end_ms: int = 250, name: str = "ChatCompletion") -> dict[str, Any]:
    return {
        "traceId": CHAT_TRACE,
        "spanId": span_id,
        "name": name,
        "kind": 3,
        "startTimeUnixNano": str(T0 + ms(start_ms)),
        "endTimeUnixNano": str(T0 + ms(end_ms)),
        "attributes": [
            {"key": "openinference.span.kind", "value": {"stringValue": "LLM"}},
            {"key": "llm.model_name", "value": {"stringValue": "gpt-4o-mini"}},
            {"key": "llm.token_count.prompt", "value": {"intValue": "20"}},
            {"key": "llm.token_count.completion", "value": {"intValue": "7"}},
            {"key": "llm.cost.total", "value": {"doubleValue": 0.0003}},
            {"key": "input.value", "value": {"stringValue": "Write to ann.lee@example.org"}},
            {"key": "output.value", "value": {"stringValue": "Sent."}},
            {"key": "session.id", "value": {"stringValue": "chat-9"}},
            {"key": "llm.invocation_parameters", "value": {"stringValue": '{"temperature": 0}'}},
        ],
        "status": {"code": 1},
    }


@asynccontextmanager
async def otlp_door(settings: FlywheelSettings, *, connected: bool = True) -> AsyncIterator[str]:
    """The OTLP door alone, publishing through a broker that is connected (or, with `connected=False`,
    never reached: every publish fails as with Kafka down), with the feedback service's body limit."""
    broker = create_broker(settings, client_id="otlp-door")
    bus = EventBus(broker, producer="feedback", topic_prefix=settings.topic_prefix)
    app = create_http_app(
        "flywheel-feedback",
        routers=[create_otlp_router(TraceIntake(bus, Redactor(), LIMITS), Authenticator.for_settings(settings))],
        body_limits=otlp_body_limits(LIMITS),
    )
    if connected:
        await broker.connect()
    try:
        async with served(app) as url:
            yield url
    finally:
        if connected:
            await broker.stop()


async def spans_on_the_topic(settings: FlywheelSettings, count: int) -> list[Envelope[SpanLogged]]:
    """Every span.logged record of the test's topic. The door publishes before it answers, so they are all
    there already: one more than `count` is waited for, briefly, so that an extra one would be seen."""
    topic = topic_for(SpanLogged, settings.topic_prefix)
    records = await read_all(settings.resolved_kafka_bootstrap(), topic, expected=count + 1, timeout_s=6)
    envelopes = [Envelope[SpanLogged].model_validate_json(record.value) for record in records]
    for record, envelope in zip(records, envelopes, strict=True):
        assert record.key.decode() == envelope.payload.trace_id  # keyed by trace: one trace, one partition
    assert len(envelopes) == count, [envelope.payload.span_id for envelope in envelopes]
    return envelopes


def by_span(envelopes: list[Envelope[SpanLogged]]) -> dict[str, Envelope[SpanLogged]]:
    return {envelope.payload.span_id: envelope for envelope in envelopes}


def status_of(response: httpx.Response) -> tuple[int, str]:
    """(status, Status.message) of a refusal, decoded as the encoding it declares."""
    media_type = response.headers["content-type"].split(";")[0]
    if media_type == otlp.PROTOBUF:
        status = otlp.RpcStatus()
        status.ParseFromString(response.content)
        return response.status_code, status.message
    assert media_type == otlp.JSON, response.headers
    return response.status_code, response.json()["message"]


async def test_protobuf_and_json_traces_land_on_the_topic_field_by_field(
    settings: FlywheelSettings, topics: str
) -> None:
    key = api_key(settings, Role.app)
    async with (
        otlp_door(settings) as url,
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client,
    ):
        rag = await client.post(
            "/v1/traces", content=gzip.compress(rag_trace().SerializeToString()), headers=PROTOBUF_GZIP
        )
        assert rag.status_code == 200, rag.content
        assert rag.headers["content-type"] == otlp.PROTOBUF
        answer = ExportTraceServiceResponse()
        answer.ParseFromString(rag.content)
        assert answer == ExportTraceServiceResponse()  # full success: nothing rejected, nothing to warn of

        chat = await client.post(
            "/v1/traces", content=chat_json(chat_span("aaaaaaaaaaaaaaaa")), headers={"Content-Type": otlp.JSON}
        )
        assert chat.status_code == 200, chat.text
        assert chat.headers["content-type"] == otlp.JSON and chat.json() == {}

    published = by_span(await spans_on_the_topic(settings, 5))
    assert set(published) == {ROOT, RETRIEVE, TOOL, LLM, "aaaaaaaaaaaaaaaa"}
    for span_id, expected in expected_rag_spans().items():
        assert published[span_id].payload.model_dump() == expected, span_id
    for envelope in published.values():
        assert envelope.event_type == "span.logged" and envelope.producer == "feedback"
        assert envelope.event_id == otlp.span_event_id(envelope.payload)

    llm = published["aaaaaaaaaaaaaaaa"].payload
    assert llm.model_dump() == {
        "trace_id": CHAT_TRACE,
        "span_id": "aaaaaaaaaaaaaaaa",
        "parent_span_id": None,
        "session_id": "chat-9",
        "name": "ChatCompletion",
        "kind": SpanKind.llm,
        "service_name": "support-bot",
        "started_at": AT,
        "ended_at": AT + timedelta(milliseconds=250),
        "status": SpanStatus.ok,
        "error": None,
        "model_name": "gpt-4o-mini",
        "adapter_version": None,
        "inference_id": None,
        "prompt_tokens": 20,
        "completion_tokens": 7,
        "cost_usd": 0.0003,
        "input_text": "Write to [EMAIL]",  # scrubbed at the door: raw personal data never sits in the topic
        "output_text": "Sent.",
        "truncated": False,
        "user_id": None,
        "principal": "test-app",
        "attributes": {
            "llm.invocation_parameters": '{"temperature": 0}',
            "otel.scope.name": "openinference.instrumentation.openai",
        },
    }


async def test_partial_success_publishes_the_good_spans_and_says_why_of_the_bad(
    settings: FlywheelSettings, topics: str
) -> None:
    key = api_key(settings, Role.app)
    body = chat_json(
        chat_span("aaaaaaaaaaaaaaaa"),
        chat_span("bbbbbbbbbbbbbbbb", start_ms=300, end_ms=100, name="ends before it starts"),
        chat_span("cccccccccccccccc", start_ms=400, end_ms=500, name="second turn"),
    )
    async with otlp_door(settings) as url, httpx.AsyncClient(base_url=url) as client:
        answer = await client.post(
            "/v1/traces",
            content=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json; charset=utf-8"},
        )
    assert answer.status_code == 200, answer.text
    partial = answer.json()["partialSuccess"]
    assert int(partial["rejectedSpans"]) == 1  # int64: a string in OTLP/JSON
    assert partial["errorMessage"] == (
        "1 of 3 spans rejected, the others accepted: "
        f"span bbbbbbbbbbbbbbbb of trace {CHAT_TRACE}: end_time_unix_nano is before start_time_unix_nano"
    )
    published = by_span(await spans_on_the_topic(settings, 2))
    assert sorted(published) == ["aaaaaaaaaaaaaaaa", "cccccccccccccccc"]
    assert published["cccccccccccccccc"].payload.name == "second turn"


async def chunks(body: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    """A body sent chunked, without Content-Length: only counting what streams in can stop it."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_refused_requests_publish_nothing(settings: FlywheelSettings, topics: str) -> None:
    keys = {role: api_key(settings, role) for role in (Role.app, Role.viewer, Role.operator, Role.reviewer)}
    protobuf = gzip.compress(rag_trace().SerializeToString())
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # ~64 KiB sent, 64 MiB once inflated
    too_many = ExportTraceServiceRequest()
    too_many.resource_spans.add().scope_spans.add().spans.extend(
        step(f"{index + 1:016x}", None, "s", 0, 1) for index in range(LIMITS.otlp_max_spans + 1)
    )
    as_app = {"Authorization": f"Bearer {keys[Role.app]}"}

    async with otlp_door(settings) as url, httpx.AsyncClient(base_url=url) as client:
        cases: dict[str, tuple[httpx.Response, int, str]] = {
            "no key": (
                await client.post("/v1/traces", content=protobuf, headers=PROTOBUF_GZIP),
                401,
                "missing API key: send `Authorization: Bearer <key>`",
            ),
            "a key that is not one": (
                await client.post(
                    "/v1/traces", content=protobuf, headers={**PROTOBUF_GZIP, "Authorization": "Bearer fw_nope_nope"}
                ),
                401,
                "",
            ),
            **{
                f"a {role.value} key": (
                    await client.post(
                        "/v1/traces",
                        content=protobuf,
                        headers={**PROTOBUF_GZIP, "Authorization": f"Bearer {keys[role]}"},
                    ),
                    403,
                    f"test-{role.value} has role {role.value}; this needs app or higher",
                )
                for role in (Role.viewer, Role.operator, Role.reviewer)
            },
            "a gzip bomb": (
                await client.post("/v1/traces", content=bomb, headers={**PROTOBUF_GZIP, **as_app}),
                413,
                "the gzip body inflates past 1048576 bytes, the limit of this door; nothing was stored",
            ),
            "a body streamed past the cap": (
                await client.post(
                    "/v1/traces",
                    content=chunks(b"\0" * (LIMITS.otlp_max_body_bytes + 1)),
                    headers={"Content-Type": otlp.PROTOBUF, **as_app},
                ),
                413,
                "request body passed 262144 bytes",
            ),
            "too many spans": (
                await client.post(
                    "/v1/traces",
                    content=too_many.SerializeToString(),
                    headers={"Content-Type": otlp.PROTOBUF, **as_app},
                ),
                413,
                "the request carries 51 spans; at most 50 per request",
            ),
            "garbage protobuf": (
                await client.post(
                    "/v1/traces",
                    content=b"\x0a\xff\xff\xff\xff\x0fgarbage",
                    headers={"Content-Type": otlp.PROTOBUF, **as_app},
                ),
                400,
                "the body is not an OTLP ExportTraceServiceRequest in protobuf",
            ),
            "garbage JSON": (
                await client.post(
                    "/v1/traces", content=b'{"resourceSpans": 7}', headers={"Content-Type": otlp.JSON, **as_app}
                ),
                400,
                "the body is not an OTLP/JSON ExportTraceServiceRequest",
            ),
            "garbage gzip": (
                await client.post("/v1/traces", content=b"not gzip at all", headers={**PROTOBUF_GZIP, **as_app}),
                400,
                "the body is not valid gzip",
            ),
            "an unsupported type": (
                await client.post("/v1/traces", content=b"spans", headers={"Content-Type": "text/plain", **as_app}),
                415,
                "Content-Type text/plain is not OTLP: send application/x-protobuf or application/json",
            ),
            "an unsupported encoding": (
                await client.post(
                    "/v1/traces", content=protobuf, headers={**PROTOBUF_GZIP, "Content-Encoding": "br", **as_app}
                ),
                415,
                "Content-Encoding br is not supported: send gzip or none",
            ),
        }
        # A body declared over the cap is refused by the process's body limit before the door runs.
        declared = await client.post(
            "/v1/traces",
            content=b"\0" * (LIMITS.otlp_max_body_bytes + 1),
            headers={"Content-Type": otlp.PROTOBUF, **as_app},
        )
        assert declared.status_code == 413

        for case, (response, status, message) in cases.items():
            answered, said = status_of(response)
            assert answered == status, (case, response.content)
            assert said.startswith(message), (case, said)
            # The OTLP encoding of the request, JSON for one in neither.
            assert response.headers["content-type"] == (
                otlp.JSON if case in ("an unsupported type", "garbage JSON") else otlp.PROTOBUF
            ), case

        assert await spans_on_the_topic(settings, 0) == []
        # The topic is read as it should be: an accepted request right after is there, alone.
        accepted = await client.post(
            "/v1/traces",
            content=chat_json(chat_span("dddddddddddddddd")),
            headers={"Content-Type": otlp.JSON, **as_app},
        )
        assert accepted.status_code == 200, accepted.text
    assert list(by_span(await spans_on_the_topic(settings, 1))) == ["dddddddddddddddd"]


async def test_kafka_not_taking_the_spans_is_a_retryable_503(settings: FlywheelSettings) -> None:
    key = api_key(settings, Role.app)
    async with otlp_door(settings, connected=False) as url, httpx.AsyncClient(base_url=url) as client:
        answer = await client.post(
            "/v1/traces",
            content=chat_json(chat_span("aaaaaaaaaaaaaaaa")),
            headers={"Authorization": f"Bearer {key}", "Content-Type": otlp.JSON},
        )
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    assert answer.json()["message"].startswith("Kafka did not take the spans within 5 s (IncorrectState); retry later")
