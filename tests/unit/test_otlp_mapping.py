"""OTLP spans onto span.logged (services/feedback/otlp.py): GenAI, OpenInference and OpenLLMetry attribute
sets, ids and times, scrubbing, what is cut and flagged, what rejects a span and how the answer says so,
and decoding (protobuf, OTLP/JSON with hex ids, gzip within a bound)."""

from __future__ import annotations

import base64
import gzip
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from contracts.events import SPAN_TEXT_MAX, SpanKind, SpanStatus
from services.feedback import otlp
from services.runtime.privacy import PrivacyPolicy, Redactor

TRACE = "0af7651916cd43dd8448eb211c80319c"
ROOT = "b7ad6b7169203331"
CHILD = "00f067aa0ba902b7"
START = 1_733_450_000_123_456_789  # 2024-12-06T01:53:20.123456789Z
END = START + 1_500_000_000


def value(plain: Any) -> AnyValue:
    """An AnyValue as an OpenTelemetry SDK encodes a Python attribute value."""
    if isinstance(plain, bool):
        return AnyValue(bool_value=plain)
    if isinstance(plain, int):
        return AnyValue(int_value=plain)
    if isinstance(plain, float):
        return AnyValue(double_value=plain)
    if isinstance(plain, list):
        return AnyValue(array_value=ArrayValue(values=[value(item) for item in plain]))
    if isinstance(plain, dict):
        return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=value(v)) for k, v in plain.items()]))
    return AnyValue(string_value=plain)


def span(
    attributes: dict[str, Any] | None = None,
    *,
    trace_id: str = TRACE,
    span_id: str = CHILD,
    parent: str | None = ROOT,
    name: str = "chat smollm2",
    start: int = START,
    end: int = END,
    status: Status | None = None,
    events: list[Span.Event] | None = None,
) -> Span:
    built = Span(
        trace_id=bytes.fromhex(trace_id),
        span_id=bytes.fromhex(span_id),
        parent_span_id=bytes.fromhex(parent) if parent else b"",
        name=name,
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        attributes=[KeyValue(key=key, value=value(item)) for key, item in (attributes or {}).items()],
        events=events or [],
    )
    if status is not None:
        built.status.CopyFrom(status)
    return built


def request(*spans: Span, service: str = "rag-app", scope: str = "openinference.instrumentation.openai"):
    built = ExportTraceServiceRequest()
    resource_spans = built.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name", value=value(service))
    resource_spans.resource.attributes.add(key="telemetry.sdk.language", value=value("python"))
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = scope
    scope_spans.spans.extend(spans)
    return built


def mapped(*spans: Span, redactor: Redactor | None = None, principal: str = "test-app") -> otlp.Mapped:
    return otlp.map_request(request(*spans), principal=principal, redactor=redactor or Redactor())


def one(attributes: dict[str, Any] | None = None, **options: Any):
    result = mapped(span(attributes, **options))
    assert not result.rejections, result.rejections
    return result.spans[0]


# ------------------------------------------------------------------------------------------ mapping


def test_a_genai_chat_span() -> None:
    messages = [{"role": "user", "parts": [{"type": "text", "content": "What is the warranty?"}]}]
    answer = [{"role": "assistant", "parts": [{"type": "text", "content": "Two years."}], "finish_reason": "stop"}]
    event = one(
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-2024-08-06",
            "gen_ai.usage.input_tokens": 31,
            "gen_ai.usage.output_tokens": 4,
            "gen_ai.conversation.id": "conv_42",
            "gen_ai.input.messages": messages,
            "gen_ai.output.messages": json.dumps(answer),
            "gen_ai.request.temperature": 0.2,
            "server.port": 443,
            "gen_ai.response.finish_reasons": ["stop"],
        }
    )
    assert event.kind is SpanKind.llm
    assert event.model_name == "gpt-4o-2024-08-06"
    assert (event.prompt_tokens, event.completion_tokens) == (31, 4)
    assert event.session_id == "conv_42"
    assert json.loads(event.input_text) == messages  # a structured attribute arrives as JSON text
    assert json.loads(event.output_text) == answer
    assert event.service_name == "rag-app"
    assert event.principal == "test-app"
    # What no field took stays an attribute, as text; the operation too, which says more than the kind.
    assert event.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.request.temperature": "0.2",
        "server.port": "443",
        "gen_ai.response.finish_reasons": '["stop"]',
        "otel.scope.name": "openinference.instrumentation.openai",
    }
    assert event.truncated is False


def test_an_openinference_llm_span() -> None:
    event = one(
        {
            "openinference.span.kind": "LLM",
            "llm.model_name": "smollm2-135m-instruct",
            "llm.token_count.prompt": 12,
            "llm.token_count.completion": 30,
            "llm.token_count.total": 42,
            "llm.cost.total": 0.0042,
            "input.value": '{"messages": [{"role": "user", "content": "Hi"}]}',
            "input.mime_type": "application/json",
            "output.value": "Hello!",
            "session.id": "session-7",
            "user.id": "ann",
            "flywheel.inference_id": "chatcmpl-42",
            "flywheel.adapter_version": 3,
            "metadata": {"tenant": "acme", "tier": 2},
        }
    )
    assert event.kind is SpanKind.llm
    assert event.model_name == "smollm2-135m-instruct"
    assert (event.prompt_tokens, event.completion_tokens, event.cost_usd) == (12, 30, 0.0042)
    assert event.input_text == '{"messages": [{"role": "user", "content": "Hi"}]}'
    assert event.output_text == "Hello!"
    assert (event.session_id, event.inference_id, event.adapter_version) == ("session-7", "chatcmpl-42", 3)
    assert event.user_id is not None and event.user_id.startswith("[USER:")  # hashed, as the gateway's are
    assert event.attributes == {
        "llm.token_count.total": "42",
        "input.mime_type": "application/json",
        "metadata": '{"tenant":"acme","tier":2}',
        "otel.scope.name": "openinference.instrumentation.openai",
    }


@pytest.mark.parametrize(
    ("attribute", "sent", "kind"),
    [
        ("openinference.span.kind", "LLM", SpanKind.llm),
        ("openinference.span.kind", "RETRIEVER", SpanKind.retrieval),
        ("openinference.span.kind", "TOOL", SpanKind.tool),
        ("openinference.span.kind", "CHAIN", SpanKind.chain),
        ("openinference.span.kind", "AGENT", SpanKind.agent),
        ("openinference.span.kind", "EMBEDDING", SpanKind.embedding),
        ("openinference.span.kind", "RERANKER", SpanKind.reranker),
        ("openinference.span.kind", "GUARDRAIL", SpanKind.guardrail),
        ("openinference.span.kind", "EVALUATOR", SpanKind.evaluator),
        ("openinference.span.kind", "PROMPT", SpanKind.unknown),
        ("gen_ai.operation.name", "chat", SpanKind.llm),
        ("gen_ai.operation.name", "text_completion", SpanKind.llm),
        ("gen_ai.operation.name", "generate_content", SpanKind.llm),
        ("gen_ai.operation.name", "embeddings", SpanKind.embedding),
        ("gen_ai.operation.name", "execute_tool", SpanKind.tool),
        ("gen_ai.operation.name", "invoke_agent", SpanKind.agent),
        ("gen_ai.operation.name", "create_agent", SpanKind.agent),
        ("gen_ai.operation.name", "something_new", SpanKind.unknown),
        ("traceloop.span.kind", "workflow", SpanKind.chain),
        ("llm.request.type", "embedding", SpanKind.embedding),
        ("http.method", "GET", SpanKind.unknown),
    ],
)
def test_the_kind_of_a_span(attribute: str, sent: str, kind: SpanKind) -> None:
    assert one({attribute: sent}).kind is kind


def test_openinference_decides_the_kind_before_genai() -> None:
    event = one({"openinference.span.kind": "AGENT", "gen_ai.operation.name": "chat"})
    assert event.kind is SpanKind.agent
    assert "openinference.span.kind" not in event.attributes  # the kind says all of it
    # An OpenInference kind Flywheel has no name for is kept as sent.
    assert one({"openinference.span.kind": "PROMPT"}).attributes["openinference.span.kind"] == "PROMPT"


def test_older_genai_and_openllmetry_attributes() -> None:
    older = one({"gen_ai.prompt": "Summarise this", "gen_ai.completion": "Done.", "gen_ai.usage.prompt_tokens": 5})
    assert (older.input_text, older.output_text, older.prompt_tokens) == ("Summarise this", "Done.", 5)

    indexed = one(
        {
            "llm.request.type": "chat",
            "gen_ai.prompt.1.role": "user",
            "gen_ai.prompt.1.content": "Hi",
            "gen_ai.prompt.0.role": "system",
            "gen_ai.prompt.0.content": "Be brief.",
            "gen_ai.completion.0.role": "assistant",
            "gen_ai.completion.0.content": "Hello.",
            "gen_ai.usage.completion_tokens": 2,
        }
    )
    assert indexed.kind is SpanKind.llm
    assert json.loads(indexed.input_text) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert json.loads(indexed.output_text) == [{"role": "assistant", "content": "Hello."}]
    assert indexed.completion_tokens == 2
    assert not any(key.startswith(("gen_ai.prompt", "gen_ai.completion")) for key in indexed.attributes)

    events = [
        Span.Event(name="gen_ai.content.prompt", attributes=[KeyValue(key="gen_ai.prompt", value=value("Q?"))]),
        Span.Event(name="gen_ai.content.completion", attributes=[KeyValue(key="gen_ai.completion", value=value("A."))]),
    ]
    from_events = one({"gen_ai.operation.name": "chat"}, events=events)
    assert (from_events.input_text, from_events.output_text) == ("Q?", "A.")


def test_ids_and_times() -> None:
    root = one(span_id=ROOT, parent=None, name="rag pipeline")
    assert (root.trace_id, root.span_id, root.parent_span_id) == (TRACE, ROOT, None)
    child = one()
    assert (child.span_id, child.parent_span_id) == (CHILD, ROOT)
    # Nanoseconds to UTC, kept to the microsecond.
    assert child.started_at == datetime(2024, 12, 6, 1, 53, 20, 123456, tzinfo=UTC)
    assert child.ended_at == datetime(2024, 12, 6, 1, 53, 21, 623456, tzinfo=UTC)


def test_status_and_error() -> None:
    assert one().status is SpanStatus.unset and one().error is None
    ok = one(status=Status(code=Status.STATUS_CODE_OK, message="ignored unless an error"))
    assert (ok.status, ok.error) == (SpanStatus.ok, None)
    failed = one(status=Status(code=Status.STATUS_CODE_ERROR, message="tool timed out"))
    assert (failed.status, failed.error) == (SpanStatus.error, "tool timed out")
    exception = Span.Event(
        name="exception",
        attributes=[
            KeyValue(key="exception.type", value=value("TimeoutError")),
            KeyValue(key="exception.message", value=value("search took 30 s")),
        ],
    )
    raised = one(status=Status(code=Status.STATUS_CODE_ERROR), events=[exception])
    assert (raised.status, raised.error) == (SpanStatus.error, "TimeoutError: search took 30 s")


def test_personal_data_is_scrubbed_before_publishing() -> None:
    event = one(
        {
            "input.value": "My card is 4242 4242 4242 4242, mail ann.lee@example.org",
            "output.value": "Use key sk-proj-Qw3rTy7uIo9pAs1dFg5hJk2lZx8cVb4n",
            "user.id": "ann.lee@example.org",
            "customer_id": "C-1",
            "note": "call +44 20 7946 0958",
        },
        status=Status(code=Status.STATUS_CODE_ERROR, message="rejected for ann.lee@example.org"),
    )
    assert "4242" not in event.input_text and "ann.lee" not in event.input_text
    assert "sk-proj" not in event.output_text
    assert event.user_id is not None and "ann" not in event.user_id
    assert event.error is not None and "ann.lee" not in event.error
    assert event.attributes["customer_id"].startswith("[USER:")  # an identity key, replaced whole
    assert "7946" not in event.attributes["note"]
    # With privacy off, nothing changes.
    raw = mapped(span({"input.value": "ann.lee@example.org"}), redactor=Redactor(PrivacyPolicy.off)).spans[0]
    assert raw.input_text == "ann.lee@example.org"


def test_the_principal_is_the_key_s_never_the_payload_s() -> None:
    event = mapped(span({"principal": "someone-else", "flywheel.principal": "admin"}), principal="shop-app").spans[0]
    assert event.principal == "shop-app"
    assert event.attributes["principal"] == "someone-else"


# ------------------------------------------------------------------------------------------ bounds


def test_long_text_is_cut_and_flagged() -> None:
    event = one({"input.value": "a" * (SPAN_TEXT_MAX + 10), "output.value": "fine"})
    assert len(event.input_text) == SPAN_TEXT_MAX and event.output_text == "fine"
    assert event.truncated is True
    long_name = one(name="n" * 300)
    assert len(long_name.name) == otlp.MAX_NAME and long_name.truncated
    # Scrubbing that lengthens a text already at the bound does not pass the bound.
    near = one({"input.value": "a" * (SPAN_TEXT_MAX - 10) + " b@c.io"})
    assert len(near.input_text) <= SPAN_TEXT_MAX


def test_attributes_are_bounded() -> None:
    many = one({f"custom.{index:03}": index for index in range(200)})
    assert len(many.attributes) == otlp.MAX_ATTRIBUTES  # 127 customs and otel.scope.name
    assert many.attributes["custom.000"] == "0" and "custom.199" not in many.attributes
    assert many.truncated

    long = one({"k" * 300: "v" * 5000})
    ((key, kept),) = [(key, item) for key, item in long.attributes.items() if key != "otel.scope.name"]
    assert (len(key), len(kept)) == (otlp.MAX_ATTRIBUTE_KEY, otlp.MAX_ATTRIBUTE_VALUE)
    assert long.truncated

    wide = one({f"big.{index}": "x" * 4000 for index in range(20)})
    assert sum(len(k) + len(v) for k, v in wide.attributes.items()) <= otlp.MAX_ATTRIBUTE_CHARS
    assert wide.truncated


def test_a_span_too_large_for_one_record_is_rejected() -> None:
    # Control characters take six bytes each in JSON: within every text bound, over one Kafka record.
    noise = "\x01" * SPAN_TEXT_MAX
    pads = {f"pad.{index}": "\x01" * 4000 for index in range(7)}
    result = mapped(span({"input.value": noise, "output.value": noise, **pads}))
    (rejection,) = result.rejections
    assert "once encoded" in rejection.reason


# ------------------------------------------------------------------------------------------ rejections


def bad_id(span_: Span, field: str, raw: bytes) -> Span:
    setattr(span_, field, raw)
    return span_


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (
            bad_id(span(), "trace_id", b"\x01" * 8),
            "trace_id must be 16 bytes (32 hex digits in OTLP/JSON); got 8 bytes",
        ),
        (bad_id(span(), "trace_id", b"\x00" * 16), "trace_id is all zero"),
        (bad_id(span(), "span_id", b""), "span_id must be 8 bytes (16 hex digits in OTLP/JSON); got 0 bytes"),
        (bad_id(span(), "parent_span_id", b"\x00" * 8), "parent_span_id is all zero"),
        (span(name=""), "the span has no name"),
        (span(start=0), "start_time_unix_nano is missing"),
        (span(end=0), "end_time_unix_nano is missing"),
        (span(end=START - 1), "end_time_unix_nano is before start_time_unix_nano"),
        (span(start=2**63, end=2**63 + 5), "start_time_unix_nano 9223372036854775808 is past 2262-04-11"),
        (span({"session.id": "user 42 chat"}), "session.id 'user 42 chat' is malformed"),
        (span({"gen_ai.conversation.id": "x" * 129}), "gen_ai.conversation.id 'xxxx"),
        (span({"flywheel.inference_id": "../etc"}), "flywheel.inference_id '../etc' is malformed"),
        (
            span({"gen_ai.usage.input_tokens": -3}),
            "gen_ai.usage.input_tokens must be a whole number from 0 to 4294967295; got '-3'",
        ),
        (span({"gen_ai.usage.output_tokens": 2**32}), "gen_ai.usage.output_tokens must be a whole number from 0"),
        (span({"llm.token_count.prompt": "9" * 5000}), "llm.token_count.prompt must be a whole number from 0"),
        (span({"flywheel.adapter_version": 2**40}), "flywheel.adapter_version must be a whole number from 0"),
        (span({"llm.token_count.completion": "many"}), "llm.token_count.completion must be a whole number"),
        (span({"llm.cost.total": -0.5}), "llm.cost.total must be a number of US dollars, 0 or more"),
        (span({"flywheel.adapter_version": 0}), "flywheel.adapter_version must be a version number, 1 or more"),
    ],
)
def test_a_span_that_cannot_be_accepted_is_rejected_with_its_reason(broken: Span, reason: str) -> None:
    good = span(span_id=ROOT, parent=None, name="root")
    result = mapped(good, broken)
    assert [event.span_id for event in result.spans] == [ROOT]  # the good span of the same request is kept
    (rejection,) = result.rejections
    assert rejection.reason.startswith(reason), rejection.reason


def test_a_repeated_span_id_is_rejected() -> None:
    result = mapped(span(), span(name="again"))
    assert [event.name for event in result.spans] == ["chat smollm2"]
    assert result.rejections[0].reason == "the span id repeats an earlier span of the same trace in this request"


def test_the_answer_counts_rejections_and_says_why() -> None:
    result = mapped(span(span_id=ROOT, parent=None), span(end=START - 1), span(span_id="1111111111111111", name=""))
    response = result.response()
    assert response.partial_success.rejected_spans == 2
    assert response.partial_success.error_message == (
        "2 of 3 spans rejected, the others accepted: "
        f"span {CHILD} of trace {TRACE}: end_time_unix_nano is before start_time_unix_nano; "
        f"span 1111111111111111 of trace {TRACE}: the span has no name"
    )
    many = mapped(*(span(span_id=f"{index + 1:016x}", name="") for index in range(15)))
    message = many.response().partial_success.error_message
    assert message.startswith("15 of 15 spans rejected") and message.endswith("; and 5 more")
    # Nothing rejected, nothing cut: the empty answer OTLP calls full success.
    assert mapped(span()).response() == ExportTraceServiceResponse()
    warned = mapped(span({"input.value": "a" * (SPAN_TEXT_MAX + 1)})).response().partial_success
    assert warned.rejected_spans == 0 and warned.error_message.startswith("all 1 spans accepted; 1 had text cut")


def test_event_ids_are_derived_from_the_span_and_its_sender() -> None:
    first, again = one(), one()
    assert otlp.span_event_id(first) == otlp.span_event_id(again)
    other_app = mapped(span(), principal="other-app").spans[0]
    assert otlp.span_event_id(other_app) != otlp.span_event_id(first)
    assert otlp.span_event_id(one(span_id=ROOT, parent=None)) != otlp.span_event_id(first)


# ------------------------------------------------------------------------------------------ decoding


def otlp_json(export: ExportTraceServiceRequest) -> dict[str, Any]:
    """OTLP/JSON as an exporter writes it: protobuf's JSON mapping, with ids in hex rather than base64."""
    document = json_format.MessageToDict(export)
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for item in scope_spans["spans"]:
                for name in ("traceId", "spanId", "parentSpanId"):
                    if name in item:
                        item[name] = base64.b64decode(item[name]).hex()
    return document


def test_protobuf_and_json_decode_to_the_same_request() -> None:
    export = request(span({"openinference.span.kind": "TOOL", "tool.name": "search"}), span(span_id=ROOT, parent=None))
    assert otlp.decode(export.SerializeToString(), otlp.PROTOBUF) == export
    document = otlp_json(export)
    assert document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] == TRACE
    document["resourceSpans"][0]["futureField"] = {"ignored": True}  # unknown fields are ignored, as OTLP says
    assert otlp.decode(json.dumps(document).encode(), otlp.JSON) == export


def test_an_id_that_is_not_hex_rejects_its_span_only() -> None:
    document = otlp_json(request(span(), span(span_id=ROOT, parent=None)))
    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[0]["spanId"] = "not-hex-at-all!!"
    result = otlp.map_request(otlp.decode(json.dumps(document).encode(), otlp.JSON), principal="a", redactor=Redactor())
    assert [event.span_id for event in result.spans] == [ROOT]
    assert result.rejections[0].reason == "span_id must be 8 bytes (16 hex digits in OTLP/JSON); got 0 bytes"


@pytest.mark.parametrize(
    ("body", "media_type", "message"),
    [
        (b"\x0a\xff\xff\xff\xff\x0f", otlp.PROTOBUF, "the body is not an OTLP ExportTraceServiceRequest in protobuf"),
        (b"{not json", otlp.JSON, "the body is not JSON"),
        (b"[1, 2]", otlp.JSON, "the body is not an OTLP/JSON ExportTraceServiceRequest: a JSON object is expected"),
        (b'{"resourceSpans": "many"}', otlp.JSON, "the body is not an OTLP/JSON ExportTraceServiceRequest ("),
        (b"[" * 100_000 + b"]" * 100_000, otlp.JSON, "the body is not JSON"),
    ],
)
def test_an_undecodable_body_says_what_is_wrong(body: bytes, media_type: str, message: str) -> None:
    with pytest.raises(otlp.Undecodable) as refused:
        otlp.decode(body, media_type)
    assert str(refused.value).startswith(message)


def test_gzip_is_inflated_within_its_bound() -> None:
    payload = request(span()).SerializeToString()
    assert otlp.inflate(gzip.compress(payload), 10_000) == payload
    # Concatenated members are one body, as gzip itself reads them.
    assert otlp.inflate(gzip.compress(payload[:20]) + gzip.compress(payload[20:]), 10_000) == payload
    bomb = gzip.compress(b"\0" * 50_000_000)
    assert len(bomb) < 100_000
    with pytest.raises(otlp.TooLarge, match="the gzip body inflates past 1000000 bytes"):
        otlp.inflate(bomb, 1_000_000)
    with pytest.raises(otlp.Undecodable, match="truncated"):
        otlp.inflate(gzip.compress(payload)[:-12], 10_000)
    with pytest.raises(otlp.Undecodable, match="not valid gzip"):
        otlp.inflate(b"plain text, not gzip", 10_000)


def test_failures_are_google_rpc_status_in_the_request_s_encoding() -> None:
    assert json.loads(otlp.failure(400, "bad body", otlp.JSON)) == {"code": 3, "message": "bad body"}
    status = otlp.RpcStatus()
    status.ParseFromString(otlp.failure(413, "too large", otlp.PROTOBUF))
    assert (status.code, status.message) == (8, "too large")
    # Byte for byte what google.rpc.Status encodes: field 1 (code) varint, field 2 (message) string.
    assert otlp.failure(401, "no key", otlp.PROTOBUF) == b"\x08\x10\x12\x06no key"
