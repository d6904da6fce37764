"""The gateway's own spans of one call, as span.logged events.

    chat tiny                     llm, the server span: the whole request, a child of the caller's span
    ├─ triton flywheel_llm_stream the gRPC stream to Triton, from sending the request to the last answer
    │  ├─ queue                   waiting in the continuous batcher for a place in the running batch
    │  └─ compute                 prefill and decoding, from joining the batch to the last token
    ├─ guard input                guardrail, when the input guard is on: its verdict on the model input
    └─ guard output               guardrail, when the output guard is on: its verdict on the answer

The server span is built from the call's inference.logged, so it carries no more than that event
does (its texts are the inference's, scrubbed by the same redactor before publishing). Token counts
are on the server span only: a trace's summary sums them over its spans. The queue and compute
spans take the batcher's own instants (Triton returns them as `timeline_ns`); a call that never
reached Triton has the server span alone, and one that failed there has no queue or compute span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from time import time_ns

from contracts.events import (
    SPAN_TEXT_MAX,
    GuardOutcome,
    InferenceLogged,
    InferenceStatus,
    SpanKind,
    SpanLogged,
    SpanStatus,
)
from services.serving.guard import ContentGuard, GuardVerdict
from services.serving.trace_context import CallTrace, new_span_id
from services.serving.triton import TritonAnswer

SERVICE_NAME = "flywheel-gateway"
# The GenAI semantic conventions' operation names, which also name the span (`chat <model>`).
OPERATIONS = {"chat.completions": "chat", "completions": "text_completion"}
NAME_MAX = 256
ERROR_MAX = 8000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def at_ns(unix_ns: int) -> datetime:
    """A unix nanosecond instant as a UTC datetime (to the microsecond, the span table's precision)."""
    return _EPOCH + timedelta(microseconds=unix_ns // 1000)


@dataclass(frozen=True)
class TritonCall:
    """The gateway's side of its call to Triton: which model, when it was sent and when it ended."""

    model: str
    sent_ns: int
    ended_ns: int


def call_spans(
    inference: InferenceLogged,
    trace: CallTrace,
    *,
    requested_model: str,
    ended_at: datetime,
    triton: TritonCall | None = None,
    answer: TritonAnswer | None = None,
    cached_from: str | None = None,
    cache_similarity: float | None = None,
    guards: Sequence[tuple[ContentGuard, GuardVerdict]] = (),
) -> list[SpanLogged]:
    """The server span of a call logged as `inference`, and its Triton, queue and compute spans when it got that far.
    `cached_from`: the inference whose answer the call replayed from the response cache (`cache_similarity`: of
    its question to the stored one, for a semantic hit); `guards`: each guard that
    checked the call, with its verdict."""
    ok = inference.status is InferenceStatus.ok
    status = SpanStatus.ok if ok else SpanStatus.error
    error = None if ok else (inference.error or "error")[:ERROR_MAX]
    operation = OPERATIONS.get(inference.endpoint, inference.endpoint)
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": requested_model,
        "flywheel.endpoint": inference.endpoint,
        "flywheel.route": inference.route,
    }
    if inference.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = inference.finish_reason
    if inference.prompt_name is not None:
        attributes["flywheel.prompt"] = f"{inference.prompt_name}:v{inference.prompt_version}"
    if trace.tracestate:
        attributes["w3c.tracestate"] = trace.tracestate
    if cached_from is not None:
        attributes["flywheel.cache.source_inference_id"] = cached_from
    if cache_similarity is not None:
        attributes["flywheel.cache.similarity"] = f"{cache_similarity:.4f}"
    input_text, output_text = inference.input_text[:SPAN_TEXT_MAX], inference.output_text[:SPAN_TEXT_MAX]
    common = {"trace_id": trace.trace_id, "session_id": trace.session_id, "service_name": SERVICE_NAME}
    server = SpanLogged(
        **common,
        span_id=trace.span_id,
        parent_span_id=trace.parent_span_id,
        name=f"{operation} {requested_model}"[:NAME_MAX],
        kind=SpanKind.llm,
        started_at=inference.started_at,
        ended_at=max(ended_at, inference.started_at),
        status=status,
        error=error,
        model_name=inference.model_name,
        adapter_version=inference.adapter_version,
        inference_id=inference.inference_id,
        prompt_tokens=inference.prompt_tokens,
        completion_tokens=inference.completion_tokens,
        input_text=input_text,
        output_text=output_text,
        truncated=(input_text, output_text) != (inference.input_text, inference.output_text),
        user_id=inference.user_id,
        principal=inference.principal,
        attributes=attributes,
    )
    spans = [server]
    spans.extend(_guard_span(guard, verdict, common, server, inference.inference_id) for guard, verdict in guards)
    if triton is None:
        return spans
    call = SpanLogged(
        **common,
        span_id=new_span_id(),
        parent_span_id=server.span_id,
        name=f"triton {triton.model}"[:NAME_MAX],
        started_at=at_ns(triton.sent_ns),
        ended_at=at_ns(max(triton.ended_ns, triton.sent_ns)),
        status=status,
        error=error,
        inference_id=inference.inference_id,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": "inference.GRPCInferenceService",
            "rpc.method": "ModelStreamInfer",
        },
    )
    spans.append(call)
    if answer is not None and answer.queued_at_ns and answer.admitted_at_ns and answer.finished_at_ns:
        steps = (
            ("queue", answer.queued_at_ns, answer.admitted_at_ns),
            ("compute", answer.admitted_at_ns, answer.finished_at_ns),
        )
        for name, started_ns, ended_ns in steps:
            spans.append(
                SpanLogged(
                    **common,
                    span_id=new_span_id(),
                    parent_span_id=call.span_id,
                    name=name,
                    started_at=at_ns(started_ns),
                    ended_at=at_ns(max(ended_ns, started_ns)),
                    status=SpanStatus.ok,
                    inference_id=inference.inference_id,
                )
            )
    return spans


def _guard_span(
    guard: ContentGuard, verdict: GuardVerdict, common: dict, server: SpanLogged, inference_id: str
) -> SpanLogged:
    started_ns = verdict.started_ns or time_ns()
    blocked = verdict.outcome is GuardOutcome.blocked
    return SpanLogged(
        **common,
        span_id=new_span_id(),
        parent_span_id=server.span_id,
        name=f"guard {guard.check}",
        kind=SpanKind.guardrail,
        started_at=at_ns(started_ns),
        ended_at=at_ns(max(verdict.ended_ns, started_ns)),
        status=SpanStatus.error if blocked else SpanStatus.ok,
        error=f"blocked: {', '.join(sorted(verdict.labels))}" if blocked else None,
        inference_id=inference_id,
        attributes={
            "flywheel.guard.outcome": verdict.outcome.value,
            "flywheel.guard.found": ",".join(sorted(verdict.labels)),
            "flywheel.guard.checked_ms": f"{verdict.checked_ms:.3f}",
            "flywheel.guard.secrets": guard.secrets.value,
            "flywheel.guard.personal": guard.personal.value,
            **(
                {
                    "flywheel.guard.unsafe": guard.unsafe.value,
                    "flywheel.guard.json_schema": guard.json_schema.value,
                    "flywheel.guard.grounding": guard.grounding.value,
                }
                if guard.check == "output"
                else {}
            ),
            **(
                {
                    "flywheel.guard.topics": guard.topics.value,
                    "flywheel.guard.topic_similarity": f"{verdict.topic_similarity:.4f}",
                }
                if verdict.topic_similarity is not None
                else {}
            ),
            **(
                {"flywheel.guard.groundedness": f"{verdict.groundedness:.4f}"}
                if verdict.groundedness is not None
                else {}
            ),
            **({"flywheel.guard.policy": guard.policy} if guard.policy else {}),
            **(
                {
                    "flywheel.guard.injection": guard.injection.value,
                    "flywheel.guard.injection_p": f"{verdict.injection_probability:.4f}",
                    "flywheel.guard.injection_stage": verdict.injection_stage or "",
                }
                if verdict.injection_probability is not None
                else {}
            ),
        },
    )
