"""The gateway's spans of one call, built from its inference.logged: the tree, the times, what they carry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from contracts.events import InferenceLogged, InferenceStatus, SpanKind, SpanStatus
from services.runtime.privacy import Redactor
from services.runtime.spans import service_span_event_id
from services.serving.inference_log import _fit
from services.serving.spans import SERVICE_NAME, TritonCall, at_ns, call_spans
from services.serving.trace_context import CallTrace, caller_span
from services.serving.triton import TritonAnswer

pytestmark = pytest.mark.unit

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SENT_NS = 1_750_000_000_000_000_000


def inference(**fields: object) -> InferenceLogged:
    values: dict[str, object] = {
        "inference_id": "inf-1",
        "model_name": "tiny",
        "adapter_version": 2,
        "route": "staging",
        "endpoint": "chat.completions",
        "user_id": "alice@example.com",
        "principal": "app-1",
        "input_text": "mail me at bob@example.com",
        "output_text": "sure",
        "finish_reason": "length",
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "started_at": at_ns(SENT_NS) - timedelta(milliseconds=5),
    }
    return InferenceLogged(**{**values, **fields})  # type: ignore[arg-type]


def answer() -> TritonAnswer:
    return TritonAnswer(
        "sure", "length", 7, 3, 30.0, "", SENT_NS + 2_000_000, SENT_NS + 10_000_000, SENT_NS + 40_000_000
    )


def test_server_span_under_the_callers_then_triton_then_queue_and_compute_in_order() -> None:
    trace = CallTrace.start(caller_span([CALLER]), session_id="chat-42")
    server, triton, queue, compute = call_spans(
        inference(),
        trace,
        requested_model="tiny@staging",
        ended_at=at_ns(SENT_NS + 45_000_000),
        triton=TritonCall("flywheel_llm_stream", SENT_NS, SENT_NS + 42_000_000),
        answer=answer(),
    )
    assert {span.trace_id for span in (server, triton, queue, compute)} == {trace.trace_id}
    assert server.span_id == trace.span_id and server.parent_span_id == "b7ad6b7169203331"
    assert triton.parent_span_id == server.span_id and queue.parent_span_id == compute.parent_span_id == triton.span_id
    assert server.started_at <= triton.started_at <= queue.started_at <= queue.ended_at == compute.started_at
    assert compute.ended_at <= triton.ended_at <= server.ended_at
    assert (server.name, server.kind, server.service_name) == ("chat tiny@staging", SpanKind.llm, SERVICE_NAME)
    assert (server.model_name, server.adapter_version, server.inference_id) == ("tiny", 2, "inf-1")
    assert (server.prompt_tokens, server.completion_tokens, server.status) == (7, 3, SpanStatus.ok)
    assert server.attributes["gen_ai.operation.name"] == "chat" and server.session_id == "chat-42"
    # Tokens only on the server span: a trace's summary sums them over its spans.
    assert all(span.prompt_tokens == span.completion_tokens == 0 for span in (triton, queue, compute))
    assert all(span.kind is SpanKind.unknown for span in (triton, queue, compute))
    assert len({service_span_event_id(span) for span in (server, triton, queue, compute)}) == 4


def test_a_call_refused_before_triton_is_one_errored_span_opening_a_trace() -> None:
    trace = CallTrace.start()
    [server] = call_spans(
        inference(status=InferenceStatus.error, error="404: model nope does not exist", output_text=""),
        trace,
        requested_model="nope",
        ended_at=datetime.now(UTC),
    )
    assert server.parent_span_id is None and server.status is SpanStatus.error
    assert server.error == "404: model nope does not exist"


def test_a_failed_triton_call_has_no_queue_or_compute_span() -> None:
    spans = call_spans(
        inference(status=InferenceStatus.error, error="the inference server is unavailable"),
        CallTrace.start(),
        requested_model="tiny",
        ended_at=at_ns(SENT_NS + 9_000_000),
        triton=TritonCall("flywheel_llm_stream", SENT_NS, SENT_NS + 8_000_000),
    )
    assert [span.status for span in spans] == [SpanStatus.error, SpanStatus.error]


def test_spans_are_scrubbed_as_their_inference_and_kept_within_bounds() -> None:
    [server] = call_spans(inference(), CallTrace.start(), requested_model="tiny", ended_at=datetime.now(UTC))
    redactor = Redactor()
    scrubbed = redactor.scrub_span(server)
    assert scrubbed.input_text == redactor.scrub_inference(inference()).input_text == "mail me at [EMAIL]"
    assert scrubbed.user_id == redactor.scrub_user("alice@example.com")
    long = server.model_copy(update={"input_text": "x" * 64_000 + "y"})
    assert len(_fit(long).input_text) == 64_000 and _fit(long).truncated and _fit(server) is server
