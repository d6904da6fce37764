"""How events become ClickHouse rows (columnar Arrow batches)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa
from pydantic import field_validator, model_validator

from contracts.envelope import Envelope
from contracts.events import (
    REVIEWER_FEEDBACK_ONLY_ON_ITS_TOPIC,
    REVIEWS_ONLY_ON_THEIR_TOPIC,
    FeedbackReceived,
    FeedbackSource,
    InferenceLogged,
    SpanLogged,
)
from services.runtime.privacy import Redactor

_TIME = pa.timestamp("ms", "UTC")
# Span times keep microseconds: the steps of a pipeline (a cache hit, a guardrail) often take under a millisecond.
_SPAN_TIME = pa.timestamp("us", "UTC")


class UnreviewedFeedback(FeedbackReceived):
    """feedback.received as the sink accepts it: any source but reviewer.

    Apps may write feedback.received, so a reviewer claim on it cannot be trusted; stored as is, it
    would steer automatic retraining (the monitor learns from reviewer rows alone). Such a record is
    dead-lettered rather than stored as end_user: a downgrade would keep a forged correction among
    real end users' feedback and hide the attempt, while the dead letter (scrubbed of personal data,
    services/runtime/consumer.py) keeps the record, says why, and names the topic reviewers' feedback
    takes, so nothing is lost without a trace. A replay (services/feedback/replay.py) skips it the same way.
    """

    @field_validator("source")
    @classmethod
    def _not_reviewer(cls, source: FeedbackSource) -> FeedbackSource:
        if source is FeedbackSource.reviewer:
            raise ValueError(REVIEWER_FEEDBACK_ONLY_ON_ITS_TOPIC)
        return source

    @model_validator(mode="after")
    def _no_review(self) -> UnreviewedFeedback:
        # The same trust boundary: a queue's reviews are counted by queue, item and rubric, so only the
        # review door may name them.
        if self.names_a_review:
            raise ValueError(REVIEWS_ONLY_ON_THEIR_TOPIC)
        return self


def _envelope_columns(envelopes: Sequence[Envelope]) -> dict[str, pa.Array]:
    return {
        "event_id": pa.array([str(envelope.event_id) for envelope in envelopes], pa.string()),
        "occurred_at": pa.array([envelope.occurred_at for envelope in envelopes], _TIME),
        "producer": pa.array([envelope.producer for envelope in envelopes], pa.string()),
        "correlation_id": pa.array([envelope.correlation_id or "" for envelope in envelopes], pa.string()),
    }


def inference_rows(envelopes: Sequence[Envelope[InferenceLogged]], redactor: Redactor) -> pa.Table:
    """`inference_log` rows, personal data and secrets scrubbed from prompts, messages, outputs, errors,
    user ids and metadata. The gateway scrubbed its events before publishing; scrubbing again is a no-op
    for those and catches apps that publish raw events themselves."""
    return inference_table(envelopes, scrub_inferences(envelopes, redactor))


def scrub_inferences(envelopes: Sequence[Envelope[InferenceLogged]], redactor: Redactor) -> list[InferenceLogged]:
    """The payloads as `inference_log` may hold them (inference_rows says what is scrubbed)."""
    batch = redactor.remembering()
    return [batch.scrub_inference(envelope.payload) for envelope in envelopes]


def inference_table(envelopes: Sequence[Envelope[InferenceLogged]], payloads: Sequence[InferenceLogged]) -> pa.Table:
    """`inference_log` rows of `envelopes`, whose payloads, scrubbed, are `payloads`."""
    return pa.table(
        {
            **_envelope_columns(envelopes),
            "inference_id": pa.array([p.inference_id for p in payloads], pa.string()),
            "model_name": pa.array([p.model_name for p in payloads], pa.string()),
            "adapter_version": pa.array([p.adapter_version for p in payloads], pa.uint32()),
            "prompt_name": pa.array([p.prompt_name for p in payloads], pa.string()),
            "prompt_version": pa.array([p.prompt_version for p in payloads], pa.uint32()),
            "route": pa.array([p.route for p in payloads], pa.string()),
            "endpoint": pa.array([p.endpoint for p in payloads], pa.string()),
            "user_id": pa.array([p.user_id for p in payloads], pa.string()),
            "principal": pa.array([p.principal for p in payloads], pa.string()),
            "input_messages": pa.array(
                [json.dumps(p.input_messages, ensure_ascii=False) for p in payloads], pa.string()
            ),
            "input_text": pa.array([p.input_text for p in payloads], pa.string()),
            "output_text": pa.array([p.output_text for p in payloads], pa.string()),
            "finish_reason": pa.array([p.finish_reason for p in payloads], pa.string()),
            "prompt_tokens": pa.array([p.prompt_tokens for p in payloads], pa.uint32()),
            "completion_tokens": pa.array([p.completion_tokens for p in payloads], pa.uint32()),
            "latency_queue_ms": pa.array([p.latency_queue_ms for p in payloads], pa.float64()),
            "latency_compute_ms": pa.array([p.latency_compute_ms for p in payloads], pa.float64()),
            "latency_total_ms": pa.array([p.latency_total_ms for p in payloads], pa.float64()),
            "status": pa.array([p.status.value for p in payloads], pa.string()),
            "error": pa.array([p.error for p in payloads], pa.string()),
            "started_at": pa.array([p.started_at for p in payloads], _TIME),
            "metadata": pa.array([list(p.metadata.items()) for p in payloads], pa.map_(pa.string(), pa.string())),
            "trace_id": pa.array([p.trace_id for p in payloads], pa.string()),
            "span_id": pa.array([p.span_id for p in payloads], pa.string()),
            "session_id": pa.array([p.session_id for p in payloads], pa.string()),
            "guard_input_outcome": pa.array([p.guard_input_outcome for p in payloads], pa.string()),
            "guard_output_outcome": pa.array([p.guard_output_outcome for p in payloads], pa.string()),
            "guard_input_found": pa.array([p.guard_input_found for p in payloads], pa.list_(pa.string())),
            "guard_output_found": pa.array([p.guard_output_found for p in payloads], pa.list_(pa.string())),
            "guard_policy": pa.array([p.guard_policy for p in payloads], pa.string()),
            "mean_token_logprob": pa.array([p.mean_token_logprob for p in payloads], pa.float32()),
            "min_token_logprob": pa.array([p.min_token_logprob for p in payloads], pa.float32()),
        }
    )


def scrub_span(redactor: Redactor, span: SpanLogged) -> SpanLogged:
    """The span as it may be stored (Redactor.scrub_span, the rules the gateway publishes its own spans
    under). The OTLP intake scrubbed its spans before publishing; scrubbing again is a no-op for those
    and catches apps that publish span.logged themselves."""
    return redactor.scrub_span(span)


def scrub_spans(envelopes: Sequence[Envelope[SpanLogged]], redactor: Redactor) -> list[SpanLogged]:
    """The payloads as `span` may hold them: personal data and secrets scrubbed from name, input, output,
    error, user id and attributes."""
    batch = redactor.remembering()
    return [scrub_span(batch, envelope.payload) for envelope in envelopes]


def span_table(envelopes: Sequence[Envelope[SpanLogged]], payloads: Sequence[SpanLogged]) -> pa.Table:
    """`span` rows of `envelopes`, whose payloads, scrubbed, are `payloads`."""
    return pa.table(
        {
            **_envelope_columns(envelopes),
            "trace_id": pa.array([p.trace_id for p in payloads], pa.string()),
            "span_id": pa.array([p.span_id for p in payloads], pa.string()),
            "parent_span_id": pa.array([p.parent_span_id for p in payloads], pa.string()),
            "session_id": pa.array([p.session_id for p in payloads], pa.string()),
            "name": pa.array([p.name for p in payloads], pa.string()),
            "kind": pa.array([p.kind.value for p in payloads], pa.string()),
            "service_name": pa.array([p.service_name for p in payloads], pa.string()),
            "started_at": pa.array([p.started_at for p in payloads], _SPAN_TIME),
            "ended_at": pa.array([p.ended_at for p in payloads], _SPAN_TIME),
            "status": pa.array([p.status.value for p in payloads], pa.string()),
            "error": pa.array([p.error for p in payloads], pa.string()),
            "model_name": pa.array([p.model_name for p in payloads], pa.string()),
            "adapter_version": pa.array([p.adapter_version for p in payloads], pa.uint32()),
            "inference_id": pa.array([p.inference_id for p in payloads], pa.string()),
            "prompt_tokens": pa.array([p.prompt_tokens for p in payloads], pa.uint32()),
            "completion_tokens": pa.array([p.completion_tokens for p in payloads], pa.uint32()),
            "cost_usd": pa.array([p.cost_usd for p in payloads], pa.float64()),
            "input_text": pa.array([p.input_text for p in payloads], pa.string()),
            "output_text": pa.array([p.output_text for p in payloads], pa.string()),
            "truncated": pa.array([p.truncated for p in payloads], pa.bool_()),
            "user_id": pa.array([p.user_id for p in payloads], pa.string()),
            "principal": pa.array([p.principal for p in payloads], pa.string()),
            "attributes": pa.array([list(p.attributes.items()) for p in payloads], pa.map_(pa.string(), pa.string())),
        }
    )


def feedback_rows(envelopes: Sequence[Envelope[FeedbackReceived]], redactor: Redactor) -> pa.Table:
    """`feedback` rows, personal data and secrets scrubbed from comments, corrections, tags and a person's actor id;
    each names its one target (inference, span, trace or session)."""
    return feedback_table(envelopes, scrub_feedbacks(envelopes, redactor))


def scrub_feedbacks(envelopes: Sequence[Envelope[FeedbackReceived]], redactor: Redactor) -> list[FeedbackReceived]:
    """The payloads as `feedback` may hold them (feedback_rows says what is scrubbed)."""
    batch = redactor.remembering()
    return [batch.scrub_feedback(envelope.payload) for envelope in envelopes]


def feedback_table(envelopes: Sequence[Envelope[FeedbackReceived]], payloads: Sequence[FeedbackReceived]) -> pa.Table:
    """`feedback` rows of `envelopes`, whose payloads, scrubbed, are `payloads`."""
    return pa.table(
        {
            **_envelope_columns(envelopes),
            "feedback_id": pa.array([p.feedback_id for p in payloads], pa.string()),
            # The table is ordered by inference_id, which cannot be NULL: feedback on a span, trace or
            # session stores '' there, so those rows sit together and the trace and session views read
            # only them (migration 0009).
            "inference_id": pa.array([p.inference_id or "" for p in payloads], pa.string()),
            "trace_id": pa.array([p.trace_id for p in payloads], pa.string()),
            "span_id": pa.array([p.span_id for p in payloads], pa.string()),
            "session_id": pa.array([p.session_id for p in payloads], pa.string()),
            "thumbs": pa.array([p.thumbs.value if p.thumbs else None for p in payloads], pa.string()),
            "rating": pa.array([p.rating for p in payloads], pa.uint8()),
            "comment": pa.array([p.comment for p in payloads], pa.string()),
            "correction": pa.array([p.correction for p in payloads], pa.string()),
            "tags": pa.array([list(p.tags) for p in payloads], pa.list_(pa.string())),
            "source": pa.array([p.source.value for p in payloads], pa.string()),
            "actor": pa.array([p.actor for p in payloads], pa.string()),
            "queue": pa.array([p.queue for p in payloads], pa.string()),
            "item_id": pa.array([p.item_id for p in payloads], pa.string()),
            "rubric": pa.array([p.rubric for p in payloads], pa.string()),
            "scores": pa.array([list(p.scores.items()) for p in payloads], pa.map_(pa.string(), pa.string())),
            "preferred_over": pa.array([p.preferred_over for p in payloads], pa.string()),
            "tied_with": pa.array([p.tied_with for p in payloads], pa.string()),
        }
    )
