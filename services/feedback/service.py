"""The feedback use cases: take feedback in, and store inference logs, spans and feedback once each."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pyarrow as pa
from prometheus_client import Counter
from pydantic import ValidationError

from contracts.envelope import Envelope, P
from contracts.events import (
    FeedbackReceived,
    FeedbackReviewed,
    FeedbackSource,
    FeedbackTarget,
    InferenceLogged,
    SpanLogged,
)
from contracts.http import FeedbackAccepted, FeedbackCreate, FeedbackList, FeedbackTargetIds, FeedbackView
from contracts.ids import INFERENCE_ID_PATTERN
from services.feedback.models import (
    feedback_table,
    inference_table,
    scrub_feedbacks,
    scrub_inferences,
    scrub_spans,
    span_table,
)
from services.runtime.privacy import Redactor
from services.feedback.store import FeedbackStore
from services.runtime.clickhouse import ClickHouseError
from services.runtime.stages import StageClock

log = logging.getLogger("flywheel.feedback")

SINK_ROWS = Counter(
    "flywheel_sink_rows_total",
    "Events the sink saw, by table and outcome (inserted, already_stored).",
    ["table", "outcome"],
)

# Gateway ids (`chatcmpl-...`), UUIDs and app ids: printable, no spaces, nothing a log or URL would mangle.
INFERENCE_ID = re.compile(INFERENCE_ID_PATTERN)
MAX_TAG_LENGTH = 64


class InvalidFeedback(ValueError):
    """Feedback a door must refuse; `param` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ReviewerRoleRequired(Exception):
    """Feedback claiming `source: reviewer` from a caller whose role does not grant reviewer."""


class StoreUnavailable(Exception):
    """ClickHouse does not answer: the batch is fine and must be stored later, not discarded."""


def feedback_event(request: FeedbackCreate) -> FeedbackReceived:
    """The event for a request, or InvalidFeedback saying what to fix: `feedback.reviewed` for source
    reviewer (its topic only the feedback service may write), `feedback.received` for every other source.
    The request names exactly one target (inference, span, trace or session); its model checked that."""
    if request.inference_id is not None and not INFERENCE_ID.fullmatch(request.inference_id):
        raise InvalidFeedback(
            f"inference_id {request.inference_id[:80]!r} is malformed: use the `id` of the completion response "
            "(letters, digits and . _ : / - only, no spaces)",
            "inference_id",
        )
    tags = [tag.strip() for tag in request.tags]
    for tag in tags:
        if not tag or len(tag) > MAX_TAG_LENGTH:
            raise InvalidFeedback(
                f"tags: each tag must have 1 to {MAX_TAG_LENGTH} characters, got {tag[:80]!r}", "tags"
            )
    if (
        request.thumbs is None
        and request.rating is None
        and not request.comment
        and not request.correction
        and not tags
    ):
        raise InvalidFeedback(
            "empty feedback: give at least one of thumbs, rating, comment, correction or tags", "body"
        )
    event_class = FeedbackReviewed if request.source is FeedbackSource.reviewer else FeedbackReceived
    return event_class(
        inference_id=request.inference_id,
        trace_id=request.trace_id,
        span_id=request.span_id,
        session_id=request.session_id,
        thumbs=request.thumbs,
        rating=request.rating,
        comment=request.comment,
        correction=request.correction,
        tags=tags,
        source=request.source,
        actor=request.actor,
    )


async def give_feedback(
    request: FeedbackCreate,
    publish: Callable[[FeedbackReceived], Awaitable[Envelope[FeedbackReceived]]],
    redactor: Redactor,
    *,
    caller: str,
    may_review: bool,
) -> FeedbackAccepted:
    """Validate feedback, scrub it and publish it; it is stored by the sink, also when its inference is not stored yet.

    Reviewer corrections are what automatic retraining learns from, so `source: reviewer` is refused
    unless the caller's role grants reviewer: an app key cannot claim it (refused rather than
    downgraded to end_user, so an app that means it learns at once that it needs a reviewer's key).
    A reviewer's feedback is published as feedback.reviewed, which apps cannot write on Kafka either.
    """
    event = feedback_event(request)
    if event.source is FeedbackSource.reviewer and not may_review:
        raise ReviewerRoleRequired(
            f"source reviewer needs a key whose role grants reviewer (reviewer or admin); {caller} may not review: "
            "send source end_user, or give the correction with a reviewer's key"
        )
    if event.source is FeedbackSource.reviewer:
        # Reviewers are counted one by one (their agreement, who judged what): the actor is the key's
        # principal, so one key cannot speak under several names.
        if event.actor is not None and event.actor != caller:
            raise InvalidFeedback(
                f"actor: a reviewer's feedback is recorded under the key's principal {caller!r}; "
                f"omit actor or send {caller!r}",
                "actor",
            )
        event = event.model_copy(update={"actor": caller})
    # The door scrubs before publishing, so raw personal data never sits in the topic.
    envelope = await publish(redactor.scrub_feedback(event))
    return FeedbackAccepted(feedback_id=envelope.payload.feedback_id, event_id=str(envelope.event_id))


def _invalid_query(refused: ValidationError) -> InvalidFeedback:
    """The first thing wrong with a feedback query, said as the door says it: a malformed id names its
    parameter, a query naming no target or several names the query."""
    error = refused.errors()[0]
    if not error["loc"]:
        return InvalidFeedback(str(error.get("ctx", {}).get("error", error["msg"])), "query")
    name = str(error["loc"][0])
    return InvalidFeedback(f"{name} {str(error['input'])[:80]!r}: {error['msg']}", name)


def list_feedback(
    store: FeedbackStore,
    *,
    inference_id: str | None = None,
    trace_id: str | None = None,
    span_id: str | None = None,
    session_id: str | None = None,
) -> FeedbackList:
    """Stored feedback on exactly one target (named as feedback names it), and whether the target itself
    is stored yet; InvalidFeedback saying what to send when the ids name none, several, or a malformed one."""
    try:
        query = FeedbackTargetIds(inference_id=inference_id, trace_id=trace_id, span_id=span_id, session_id=session_id)
    except ValidationError as refused:
        raise _invalid_query(refused) from None
    if inference_id is not None and not INFERENCE_ID.fullmatch(inference_id):
        raise InvalidFeedback(f"inference_id {inference_id[:80]!r} is malformed", "inference_id")
    target = query.target
    ids = {"inference_id": inference_id, "trace_id": trace_id, "span_id": span_id, "session_id": session_id}
    named = {name: value for name, value in ids.items() if value is not None}
    items = [
        FeedbackView(**{**row, "inference_id": row["inference_id"] or None}) for row in store.feedback_on(target, named)
    ]
    stored = store.target_stored(target, named)
    return FeedbackList(
        target=target,
        **named,
        stored=stored,
        inference_stored=stored if target is FeedbackTarget.inference else None,
        items=items,
    )


class Sink:
    """Writes events into ClickHouse in columnar batches, each event once; `clock` sums the time of each
    stage (redact, already-stored check, rows, insert)."""

    def __init__(self, store: FeedbackStore, redactor: Redactor, clock: StageClock | None = None) -> None:
        self._store = store
        self._redactor = redactor
        self._clock = clock or StageClock()

    def store_inferences(self, envelopes: Sequence[Envelope[InferenceLogged]]) -> int:
        """Store a batch of inference.logged events in inference_log; returns how many rows were new."""
        return self._write("inference_log", envelopes, scrub_inferences, inference_table)

    def store_spans(self, envelopes: Sequence[Envelope[SpanLogged]]) -> int:
        """Store a batch of span.logged events in span; returns how many rows were new."""
        return self._write("span", envelopes, scrub_spans, span_table)

    def store_feedback(self, envelopes: Sequence[Envelope[FeedbackReceived]]) -> int:
        """Store a batch of feedback.received or feedback.reviewed events in feedback; returns how many rows were new."""
        return self._write("feedback", envelopes, scrub_feedbacks, feedback_table)

    def _write(
        self,
        table: str,
        envelopes: Sequence[Envelope[P]],
        scrub: Callable[[Sequence[Envelope[P]], Redactor], list[Any]],
        to_table: Callable[[Sequence[Envelope[P]], Sequence[Any]], pa.Table],
    ) -> int:
        clock = self._clock
        unique: dict[str, Envelope[P]] = {}
        for envelope in envelopes:
            unique.setdefault(str(envelope.event_id), envelope)
        # ReplacingMergeTree would collapse a redelivered event only on merge or under FINAL; readers
        # that count rows without FINAL would see it twice. So an event already stored is not inserted
        # again: this covers a batch stored before a crash and committed by no one, and an app that
        # publishes the same envelope twice.
        try:
            with clock.stage("already-stored check"):
                stored = self._store.stored_event_ids(
                    table,
                    [envelope.event_id for envelope in unique.values()],
                    min(e.occurred_at for e in unique.values()),
                    max(e.occurred_at for e in unique.values()),
                )
            fresh_ids = [event_id for event_id in unique if event_id not in stored]
            fresh = [unique[event_id] for event_id in fresh_ids]
            if fresh:
                with clock.stage("redact"):
                    payloads = scrub(fresh, self._redactor)
                with clock.stage("rows"):
                    token = f"{table}:{hashlib.sha256(','.join(sorted(fresh_ids)).encode()).hexdigest()}"
                    rows = to_table(fresh, payloads)
                with clock.stage("insert"):
                    self._store.insert(table, rows, token)
        except ClickHouseError as error:
            self._raise_if_unavailable(error)
            raise
        SINK_ROWS.labels(table=table, outcome="inserted").inc(len(fresh))
        SINK_ROWS.labels(table=table, outcome="already_stored").inc(len(envelopes) - len(fresh))
        return len(fresh)

    def _raise_if_unavailable(self, error: ClickHouseError) -> None:
        try:
            self._store.ping()
        except ClickHouseError as ping_error:
            raise StoreUnavailable(f"ClickHouse unavailable ({ping_error}); first error: {error}") from None
