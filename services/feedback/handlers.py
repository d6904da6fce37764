"""What the feedback service does with the events it consumes: store them, in batches, once.

feedback.received is read as UnreviewedFeedback: a record on it claiming source reviewer is
dead-lettered with the reason, since apps may write that topic; reviewer rows come from
feedback.reviewed alone, which only the feedback service may write.
"""

from __future__ import annotations

import asyncio

from contracts.envelope import Envelope
from contracts.events import FeedbackReceived, FeedbackReviewed, InferenceLogged, SpanLogged
from services.feedback.models import UnreviewedFeedback
from services.feedback.service import Sink, StoreUnavailable
from services.runtime.consumer import RetryLater
from services.runtime.service import BatchHandlers

GROUP = "feedback"


async def when_inferences_logged_store_them(envelopes: list[Envelope[InferenceLogged]], sink: Sink) -> None:
    try:
        await asyncio.to_thread(sink.store_inferences, envelopes)
    except StoreUnavailable as error:
        raise RetryLater(str(error)) from None


async def when_spans_logged_store_them(envelopes: list[Envelope[SpanLogged]], sink: Sink) -> None:
    try:
        await asyncio.to_thread(sink.store_spans, envelopes)
    except StoreUnavailable as error:
        raise RetryLater(str(error)) from None


async def when_feedback_received_store_it(envelopes: list[Envelope[FeedbackReceived]], sink: Sink) -> None:
    try:
        await asyncio.to_thread(sink.store_feedback, envelopes)
    except StoreUnavailable as error:
        raise RetryLater(str(error)) from None


BATCH_HANDLERS: BatchHandlers[Sink] = {
    InferenceLogged: when_inferences_logged_store_them,
    SpanLogged: when_spans_logged_store_them,
    UnreviewedFeedback: when_feedback_received_store_it,
    FeedbackReviewed: when_feedback_received_store_it,
}
