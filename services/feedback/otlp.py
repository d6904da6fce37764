"""OpenTelemetry traces in Flywheel's terms: the body of `POST /v1/traces` decoded (OTLP/protobuf or
OTLP/JSON, gzip inflated within a bound), each span checked and mapped onto `span.logged`, and the
answers OTLP prescribes. No I/O here: the door (api.py) reads the body, publishes and answers.

What a span becomes (docs/how-to/send-traces.md says it for users):
- ids bytes -> lowercase hex; times (unix nanoseconds) -> UTC; resource `service.name` -> service_name;
  status code -> status, its message (else the last exception event's) -> error when the status is error;
- kind from OpenInference `openinference.span.kind`, else the GenAI conventions' `gen_ai.operation.name`,
  else OpenLLMetry's `traceloop.span.kind` / `llm.request.type`, else unknown;
- model, tokens, cost, input, output, session and user from the GenAI, OpenInference and OpenLLMetry
  attributes (KEYS below, first present wins), `flywheel.inference_id` / `flywheel.adapter_version`;
- every other attribute flattened to a string (arrays and maps as JSON) into `attributes`.

What does not fit follows two rules. An id that breaks its form (trace, span, parent, session, inference
id), a missing name or time, an end before the start, or a count that is not a whole number rejects
the span: the rest of the request is accepted and the answer's partial success says which span and
why. Free text over its bound (name, model, input, output, error, attribute keys and values, more
attributes than are kept) is cut and the span flagged `truncated`: a step is not lost for a long prompt.

Text is scrubbed of personal data and secrets here, before it is published, as the feedback door does:
raw personal data never sits in the topic.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from pydantic import ValidationError

from contracts.events import SPAN_TEXT_MAX, SpanKind, SpanLogged, SpanStatus
from contracts.ids import INFERENCE_ID_MAX_LENGTH, INFERENCE_ID_PATTERN
from services.runtime import spans as service_spans
from services.runtime.privacy import Redactor

PROTOBUF = "application/x-protobuf"
JSON = "application/json"

MAX_ATTRIBUTES = 128
MAX_ATTRIBUTE_KEY = 256
MAX_ATTRIBUTE_VALUE = 4096
# All attributes of a span together, keys and values, in characters: with the texts, a span stays well
# within one Kafka record (1 MiB by default) whatever its content.
MAX_ATTRIBUTE_CHARS = 32_000
MAX_NAME = 256  # the contract's bounds on name, service name, model and user id
MAX_ERROR = 8000
# A span whose record would still pass this once encoded (text of escaped control characters) is refused
# rather than left to fail at the broker, which would refuse the whole request again on every retry.
MAX_SPAN_BYTES = 900_000
# Text is scrubbed with this much past its cut, so a secret or an email straddling the cut is found whole.
SCRUB_MARGIN = 4096
# The latest time OpenTelemetry SDKs can express (signed 64-bit nanoseconds): 2262-04-11.
LATEST_NANOS = 2**63 - 1
MAX_REASONS_LISTED = 10
# Token counts and adapter versions are stored as 32-bit unsigned integers: a larger one would fail the
# sink's whole batch, so it rejects its span here.
LARGEST_COUNT = 2**32 - 1

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SESSION_ID = re.compile(INFERENCE_ID_PATTERN)
# Event ids derived from the span itself: a request retried after a partial publish republishes the
# same events, which consumers deduplicate, instead of storing its spans twice.
SPAN_EVENT_NAMESPACE = uuid.UUID("6f1d4c1e-3a0b-5c57-9a7e-2f8d6b1c0e11")

OPENINFERENCE_KINDS = {
    "LLM": SpanKind.llm,
    "RETRIEVER": SpanKind.retrieval,
    "TOOL": SpanKind.tool,
    "CHAIN": SpanKind.chain,
    "AGENT": SpanKind.agent,
    "EMBEDDING": SpanKind.embedding,
    "RERANKER": SpanKind.reranker,
    "GUARDRAIL": SpanKind.guardrail,
    "EVALUATOR": SpanKind.evaluator,
}
GENAI_OPERATIONS = {
    "chat": SpanKind.llm,
    "text_completion": SpanKind.llm,
    "generate_content": SpanKind.llm,
    "embeddings": SpanKind.embedding,
    "execute_tool": SpanKind.tool,
    "invoke_agent": SpanKind.agent,
    "create_agent": SpanKind.agent,
}
# OpenLLMetry (traceloop): its workflow and task decorators, and the request type of its LLM spans.
TRACELOOP_KINDS = {"workflow": SpanKind.chain, "task": SpanKind.chain, "agent": SpanKind.agent, "tool": SpanKind.tool}
LLM_REQUEST_TYPES = {
    "chat": SpanKind.llm,
    "completion": SpanKind.llm,
    "embedding": SpanKind.embedding,
    "rerank": SpanKind.reranker,
}

# Where each field is read from, first present wins: GenAI semantic conventions, OpenInference, OpenLLMetry.
KEYS = {
    "model_name": ("gen_ai.response.model", "gen_ai.request.model", "llm.model_name"),
    "prompt_tokens": ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt"),
    "completion_tokens": (
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.completion_tokens",
        "llm.token_count.completion",
    ),
    "cost_usd": ("llm.cost.total",),
    "input_text": ("input.value", "gen_ai.input.messages", "gen_ai.prompt"),
    "output_text": ("output.value", "gen_ai.output.messages", "gen_ai.completion"),
    "session_id": ("session.id", "gen_ai.conversation.id"),
    "user_id": ("user.id", "enduser.id"),
    "inference_id": ("flywheel.inference_id",),
    "adapter_version": ("flywheel.adapter_version",),
}
# OpenLLMetry's messages as indexed attributes (`gen_ai.prompt.0.role`, `gen_ai.prompt.0.content`, ...),
# and the older GenAI conventions' prompt and completion events.
INDEXED_MESSAGES = {"input_text": "gen_ai.prompt", "output_text": "gen_ai.completion"}
CONTENT_EVENTS = {
    "input_text": ("gen_ai.content.prompt", "gen_ai.prompt"),
    "output_text": ("gen_ai.content.completion", "gen_ai.completion"),
}
_INDEXED = re.compile(r"(gen_ai\.(?:prompt|completion))\.(\d{1,6})\.(.+)")


class Undecodable(ValueError):
    """A body that is not an OTLP trace export in its declared encoding (400)."""


class TooLarge(ValueError):
    """A request past a bound: inflated size or span count (413)."""


# ------------------------------------------------------------------------------------------ decoding


def inflate(body: bytes, limit: int) -> bytes:
    """A gzip body inflated, refused (TooLarge) as soon as it passes `limit` bytes: a gzip bomb is never
    inflated past the limit. Concatenated gzip members are taken as one body, as gzip itself does."""
    inflated = bytearray()
    rest = body
    while rest:
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        try:
            while rest and not inflater.eof:
                inflated += inflater.decompress(rest, limit + 1 - len(inflated))
                if len(inflated) > limit:
                    raise TooLarge(f"the gzip body inflates past {limit} bytes, the limit of this door")
                rest = inflater.unconsumed_tail
        except zlib.error as error:
            raise Undecodable(f"the body is not valid gzip ({error})") from None
        if not inflater.eof:
            raise Undecodable("the gzip body is truncated: its stream ends before its last block")
        rest = inflater.unused_data
    return bytes(inflated)


def decode(body: bytes, media_type: str) -> ExportTraceServiceRequest:
    """The export request in a body of `media_type` (PROTOBUF or JSON); Undecodable says what is wrong."""
    request = ExportTraceServiceRequest()
    if media_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except DecodeError as error:
            raise Undecodable(f"the body is not an OTLP ExportTraceServiceRequest in protobuf ({error})") from None
        return request
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise Undecodable(f"the body is not JSON ({str(error)[:200]})") from None
    if not isinstance(document, dict):
        raise Undecodable("the body is not an OTLP/JSON ExportTraceServiceRequest: a JSON object is expected")
    _hex_ids_to_base64(document)
    try:
        # Unknown fields are ignored, as OTLP/JSON receivers must (a newer sender's additions).
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as error:
        raise Undecodable(f"the body is not an OTLP/JSON ExportTraceServiceRequest ({str(error)[:300]})") from None
    return request


_ID_FIELDS = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")


def _hex_ids_to_base64(document: dict[str, Any]) -> None:
    """OTLP/JSON writes trace and span ids as hex, where protobuf's JSON mapping expects base64 for
    bytes: they are rewritten in place before parsing. An id that is not hex becomes empty, so its span
    alone is rejected (with the reason) instead of the whole request."""

    def children(node: Any, *names: str) -> Iterable[dict[str, Any]]:
        for name in names:
            items = node.get(name) if isinstance(node, dict) else None
            if isinstance(items, list):
                yield from (item for item in items if isinstance(item, dict))

    for resource_spans in children(document, "resourceSpans", "resource_spans"):
        for scope_spans in children(resource_spans, "scopeSpans", "scope_spans"):
            for span in children(scope_spans, "spans"):
                for holder in (span, *children(span, "links")):
                    for name in _ID_FIELDS:
                        value = holder.get(name)
                        if isinstance(value, str):
                            try:
                                holder[name] = base64.b64encode(bytes.fromhex(value)).decode()
                            except ValueError:
                                holder[name] = ""


def encode(message: Message, media_type: str) -> bytes:
    """A response message in the request's encoding."""
    if media_type == PROTOBUF:
        return message.SerializeToString()
    return json_format.MessageToJson(message, indent=None).encode()


def _status_class() -> type[Message]:
    # google.rpc.Status, what OTLP/HTTP failures carry (code, message; the `details` field is never sent
    # here). Built in a pool of its own: googleapis-common-protos is not a dependency, and an app that
    # imports it in the same process must not meet a second definition in the default pool.
    proto = descriptor_pb2.FileDescriptorProto(
        name="flywheel/google_rpc_status.proto", package="google.rpc", syntax="proto3"
    )
    status = proto.message_type.add(name="Status")
    status.field.add(
        name="code",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        json_name="code",
    )
    status.field.add(
        name="message",
        number=2,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        json_name="message",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))


RpcStatus = _status_class()

# The gRPC code matching each HTTP status OTLP answers with, so a client that records Status.code sees
# what the gRPC intake would answer.
GRPC_CODES = {400: 3, 401: 16, 403: 7, 413: 8, 415: 3, 429: 8, 500: 13, 503: 14}


def failure(status: int, message: str, media_type: str) -> bytes:
    """The body of a refusal: google.rpc.Status in the request's encoding."""
    return encode(RpcStatus(code=GRPC_CODES.get(status, 2), message=message), media_type)


# ------------------------------------------------------------------------------------------ mapping


@dataclass(frozen=True)
class Rejection:
    """A span not accepted, and why; ids as sent (hex), empty when they were not ids at all."""

    trace_id: str
    span_id: str
    reason: str


@dataclass
class Mapped:
    """What a request's spans became: those accepted (as events to publish) and those rejected."""

    spans: list[SpanLogged] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return sum(span.truncated for span in self.spans)

    def response(self) -> ExportTraceServiceResponse:
        """OTLP's answer: partial success naming the rejected spans and why; a warning when values were cut."""
        response = ExportTraceServiceResponse()
        total = len(self.spans) + len(self.rejections)
        if self.rejections:
            listed = "; ".join(
                f"span {rejection.span_id or '?'} of trace {rejection.trace_id or '?'}: {rejection.reason}"
                for rejection in self.rejections[:MAX_REASONS_LISTED]
            )
            more = len(self.rejections) - MAX_REASONS_LISTED
            response.partial_success.rejected_spans = len(self.rejections)
            response.partial_success.error_message = (
                f"{len(self.rejections)} of {total} spans rejected, the others accepted: {listed}"
                + (f"; and {more} more" if more > 0 else "")
            )
        elif self.truncated:
            # OTLP's warning form: a message with nothing rejected.
            response.partial_success.error_message = (
                f"all {total} spans accepted; {self.truncated} had text cut to Flywheel's bounds (input and output "
                f"{SPAN_TEXT_MAX} characters, {MAX_ATTRIBUTES} attributes of at most {MAX_ATTRIBUTE_VALUE} characters) "
                "and are flagged truncated"
            )
        return response


def count_spans(request: ExportTraceServiceRequest) -> int:
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


def map_request(request: ExportTraceServiceRequest, *, principal: str, redactor: Redactor) -> Mapped:
    """Every span of the request checked and mapped; `principal` (the sending key's) is recorded on each."""
    mapped = Mapped()
    seen: set[tuple[str, str]] = set()
    for resource_spans in request.resource_spans:
        service_name = _resource_service_name(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                try:
                    event = map_span(
                        span, service_name=service_name, scope=scope, principal=principal, redactor=redactor
                    )
                    if (event.trace_id, event.span_id) in seen:
                        raise SpanRejected("the span id repeats an earlier span of the same trace in this request")
                except SpanRejected as rejected:
                    mapped.rejections.append(Rejection(_hex(span.trace_id), _hex(span.span_id), str(rejected)))
                    continue
                seen.add((event.trace_id, event.span_id))
                mapped.spans.append(event)
    return mapped


def span_event_id(span: SpanLogged) -> uuid.UUID:
    """The event id a span is published under: the same span from the same principal, the same id."""
    return service_spans.span_event_id(SPAN_EVENT_NAMESPACE, span.principal, span.trace_id, span.span_id)


class SpanRejected(ValueError):
    """A span that cannot be accepted; the message is the reason the sender reads."""


def map_span(span: Span, *, service_name: str | None, scope: str, principal: str, redactor: Redactor) -> SpanLogged:
    """One OTLP span as span.logged, scrubbed; SpanRejected says why it cannot be."""
    trace_id = _id(span.trace_id, 16, "trace_id")
    span_id = _id(span.span_id, 8, "span_id")
    parent_span_id = _id(span.parent_span_id, 8, "parent_span_id") if span.parent_span_id else None
    if not span.name:
        raise SpanRejected("the span has no name")
    started_at = _time(span.start_time_unix_nano, "start_time_unix_nano")
    ended_at = _time(span.end_time_unix_nano, "end_time_unix_nano")
    if span.end_time_unix_nano < span.start_time_unix_nano:
        raise SpanRejected("end_time_unix_nano is before start_time_unix_nano")

    attributes = _Attributes(span.attributes)
    texts = _Texts(redactor)
    status, error = _status(span, texts)
    fields: dict[str, Any] = {
        "kind": _kind(attributes),
        "model_name": texts.cut(attributes.text("model_name"), MAX_NAME),
        "prompt_tokens": attributes.count("prompt_tokens") or 0,
        "completion_tokens": attributes.count("completion_tokens") or 0,
        "cost_usd": attributes.cost(),
        "session_id": attributes.identifier("session_id"),
        "inference_id": attributes.identifier("inference_id"),
        "adapter_version": attributes.count("adapter_version"),
        "input_text": texts.scrubbed(_content(attributes, span, "input_text"), SPAN_TEXT_MAX) or "",
        "output_text": texts.scrubbed(_content(attributes, span, "output_text"), SPAN_TEXT_MAX) or "",
        "user_id": texts.cut(redactor.scrub_user(attributes.text("user_id")), MAX_NAME) or None,
    }
    if fields["adapter_version"] == 0:
        raise SpanRejected("flywheel.adapter_version must be a version number, 1 or more")
    rest = attributes.rest()
    if scope:
        rest.setdefault("otel.scope.name", scope)
    try:
        event = SpanLogged(
            trace_id=trace_id,
            span_id=span_id,
            parent_span_id=parent_span_id,
            name=texts.scrubbed(span.name, MAX_NAME),
            service_name=texts.cut(service_name, MAX_NAME),
            started_at=started_at,
            ended_at=ended_at,
            status=status,
            error=error,
            principal=principal,
            attributes=texts.attributes(rest),
            truncated=texts.truncated,
            **fields,
        )
    except ValidationError as invalid:
        problem = invalid.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise SpanRejected(f"{where}: {problem['msg']}") from None
    if _may_exceed_record(event) and len(event.model_dump_json().encode()) > MAX_SPAN_BYTES:
        raise SpanRejected(
            f"the span is over {MAX_SPAN_BYTES} bytes once encoded (its text is mostly escaped control characters); "
            "send input and output as readable text"
        )
    return event


def _may_exceed_record(event: SpanLogged) -> bool:
    # A JSON character takes at most 6 bytes (`\u0001`): below that bound, no need to encode and measure.
    chars = len(event.input_text) + len(event.output_text) + len(event.error or "") + len(event.name)
    chars += sum(len(key) + len(value) for key, value in event.attributes.items())
    return chars * 6 > MAX_SPAN_BYTES - 10_000


def _hex(raw: bytes) -> str:
    return raw.hex() if len(raw) in (8, 16) else ""


def _id(raw: bytes, size: int, name: str) -> str:
    if len(raw) != size:
        raise SpanRejected(f"{name} must be {size} bytes ({2 * size} hex digits in OTLP/JSON); got {len(raw)} bytes")
    if not any(raw):
        raise SpanRejected(f"{name} is all zero, which W3C trace context makes invalid")
    return raw.hex()


def _time(nanos: int, name: str) -> datetime:
    if nanos == 0:
        raise SpanRejected(f"{name} is missing")
    if nanos > LATEST_NANOS:
        raise SpanRejected(f"{name} {nanos} is past 2262-04-11, the latest time in signed 64-bit nanoseconds")
    return EPOCH + timedelta(microseconds=nanos // 1000)


def _resource_service_name(attributes: Iterable[KeyValue]) -> str | None:
    for attribute in attributes:
        if attribute.key == "service.name" and attribute.value.WhichOneof("value") == "string_value":
            return attribute.value.string_value or None
    return None


def _status(span: Span, texts: _Texts) -> tuple[SpanStatus, str | None]:
    if span.status.code == Status.STATUS_CODE_OK:
        return SpanStatus.ok, None
    if span.status.code != Status.STATUS_CODE_ERROR:
        return SpanStatus.unset, None
    message = span.status.message
    if not message:
        exceptions = [event for event in span.events if event.name == "exception"]
        if exceptions:
            details = {attribute.key: _text(attribute.value) for attribute in exceptions[-1].attributes}
            message = ": ".join(
                part for part in (details.get("exception.type"), details.get("exception.message")) if part
            )
    return SpanStatus.error, texts.scrubbed(message, MAX_ERROR) or None


def _kind(attributes: _Attributes) -> SpanKind:
    openinference = (attributes.peek("openinference.span.kind") or "").upper()
    if openinference in OPENINFERENCE_KINDS:
        attributes.take("openinference.span.kind")
        return OPENINFERENCE_KINDS[openinference]
    for key, kinds in (
        ("gen_ai.operation.name", GENAI_OPERATIONS),
        ("traceloop.span.kind", TRACELOOP_KINDS),
        ("llm.request.type", LLM_REQUEST_TYPES),
    ):
        # Kept in attributes as well: the operation says more than the kind (chat or text completion).
        value = attributes.peek(key)
        if value is not None and value.lower() in kinds:
            return kinds[value.lower()]
    return SpanKind.unknown


def _content(attributes: _Attributes, span: Span, field_name: str) -> str | None:
    """A step's input or output: the first of KEYS present, else OpenLLMetry's indexed messages as a JSON
    list, else the older GenAI conventions' content event."""
    found = attributes.text(field_name)
    if found is not None:
        return found
    messages = attributes.indexed(INDEXED_MESSAGES[field_name])
    if messages:
        return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    event_name, key = CONTENT_EVENTS[field_name]
    for event in span.events:
        if event.name == event_name:
            for attribute in event.attributes:
                if attribute.key == key:
                    return _text(attribute.value)
    return None


class _Attributes:
    """A span's attributes by key (the first of a repeated key wins); what a field takes is taken out,
    so `rest()` holds what becomes `attributes`."""

    def __init__(self, attributes: Iterable[KeyValue]) -> None:
        self._values: dict[str, AnyValue] = {}
        for attribute in attributes:
            self._values.setdefault(attribute.key, attribute.value)

    def peek(self, key: str) -> str | None:
        value = self._values.get(key)
        return None if value is None else _text(value)

    def take(self, key: str) -> str | None:
        value = self._values.pop(key, None)
        return None if value is None else _text(value)

    def _first(self, field_name: str) -> tuple[str, AnyValue] | None:
        for key in KEYS[field_name]:
            if key in self._values:
                return key, self._values.pop(key)
        return None

    def text(self, field_name: str) -> str | None:
        found = self._first(field_name)
        return None if found is None else _text(found[1])

    def identifier(self, field_name: str) -> str | None:
        found = self._first(field_name)
        if found is None:
            return None
        key, value = found
        text = _text(value)
        if len(text) > INFERENCE_ID_MAX_LENGTH or not SESSION_ID.fullmatch(text):
            raise SpanRejected(
                f"{key} {text[:80]!r} is malformed: 1 to {INFERENCE_ID_MAX_LENGTH} letters, digits and . _ : / -, "
                "starting with a letter or digit"
            )
        return text

    def count(self, field_name: str) -> int | None:
        found = self._first(field_name)
        if found is None:
            return None
        key, value = found
        kind = value.WhichOneof("value")
        number: Any = None
        if kind == "int_value":
            number = value.int_value
        elif kind == "double_value" and value.double_value.is_integer():
            number = int(value.double_value)
        elif kind == "string_value" and value.string_value.isdecimal() and len(value.string_value) <= 10:
            number = int(value.string_value)
        if number is None or not 0 <= number <= LARGEST_COUNT:
            raise SpanRejected(f"{key} must be a whole number from 0 to {LARGEST_COUNT}; got {_text(value)[:40]!r}")
        return int(number)

    def cost(self) -> float | None:
        found = self._first("cost_usd")
        if found is None:
            return None
        key, value = found
        kind = value.WhichOneof("value")
        number = value.double_value if kind == "double_value" else value.int_value if kind == "int_value" else None
        if number is None or not number >= 0 or number == float("inf"):
            raise SpanRejected(f"{key} must be a number of US dollars, 0 or more; got {_text(value)[:40]!r}")
        return float(number)

    def indexed(self, prefix: str) -> list[dict[str, Any]]:
        """OpenLLMetry's `<prefix>.<i>.<field>` attributes as a list of messages, in index order."""
        messages: dict[int, dict[str, Any]] = {}
        for key in [key for key in self._values if key.startswith(prefix + ".")]:
            match = _INDEXED.fullmatch(key)
            if match and match.group(1) == prefix:
                messages.setdefault(int(match.group(2)), {})[match.group(3)] = _plain(self._values.pop(key))
        return [messages[index] for index in sorted(messages)]

    def rest(self) -> dict[str, str]:
        return {key: _text(value) for key, value in self._values.items()}


class _Texts:
    """Cuts and scrubs the text of one span, remembering whether anything was cut."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self.truncated = False

    def cut(self, text: str | None, limit: int) -> str | None:
        if text is not None and len(text) > limit:
            self.truncated = True
            return text[:limit]
        return text

    def scrubbed(self, text: str | None, limit: int) -> str | None:
        if not text:
            return text
        # Scrubbing may lengthen the text ([EMAIL:...] for a short address): cut again after it.
        if len(text) > limit:
            self.truncated = True
        return self.cut(self._redactor.scrub(text[: limit + SCRUB_MARGIN]), limit)

    def attributes(self, attributes: dict[str, str]) -> dict[str, str]:
        """At most MAX_ATTRIBUTES, keys and values cut to their bounds and all within MAX_ATTRIBUTE_CHARS,
        scrubbed as metadata is (values under identity keys replaced whole)."""
        if len(attributes) > MAX_ATTRIBUTES or any(len(value) > MAX_ATTRIBUTE_VALUE for value in attributes.values()):
            self.truncated = True
        raw = {
            self.cut(key, MAX_ATTRIBUTE_KEY) or key: value[: MAX_ATTRIBUTE_VALUE + SCRUB_MARGIN]
            for key, value in list(attributes.items())[:MAX_ATTRIBUTES]
        }
        kept: dict[str, str] = {}
        budget = MAX_ATTRIBUTE_CHARS
        for scrubbed_key, scrubbed_value in self._redactor.scrub_metadata(raw).items():
            key = self.cut(scrubbed_key, MAX_ATTRIBUTE_KEY) or scrubbed_key
            value = self.cut(scrubbed_value, MAX_ATTRIBUTE_VALUE) or ""
            if len(key) + len(value) > budget:
                self.truncated = True
                break
            budget -= len(key) + len(value)
            kept.setdefault(key, value)
        return kept


def _plain(value: AnyValue) -> Any:
    """An AnyValue as plain Python (what JSON would hold; bytes as base64, as OTLP/JSON writes them)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_plain(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {pair.key: _plain(pair.value) for pair in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    if kind in (None, "string_value_strindex"):  # the index is a profiles-only dictionary reference
        return None
    return getattr(value, kind)


def _text(value: AnyValue) -> str:
    """An attribute value as one string: strings as they are, booleans lowercase, the rest as JSON."""
    plain = _plain(value)
    if isinstance(plain, str):
        return plain
    if plain is None:
        return ""
    return json.dumps(plain, ensure_ascii=False, separators=(",", ":"))
