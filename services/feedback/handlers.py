"""What the feedback service does with the events it consumes: store them, in batches, once."""

from __future__ import annotations

import asyncio
from typing import Any

from faststream.kafka import KafkaBroker, KafkaRouter

from contracts.envelope import Envelope
from contracts.events import FeedbackReceived, FeedbackReviewed, InferenceLogged
from services.feedback.models import UnreviewedFeedback
from services.feedback.service import Sink, StoreUnavailable
from services.feedback.settings import FeedbackSettings
from services.runtime.consumer import BatchHandler, DeadLetters, RetryLater, subscribe_batch

GROUP = "feedback"


def when_inferences_logged_store_them(sink: Sink) -> BatchHandler[InferenceLogged]:
    async def handle(envelopes: list[Envelope[InferenceLogged]]) -> None:
        try:
            await asyncio.to_thread(sink.store_inferences, envelopes)
        except StoreUnavailable as error:
            raise RetryLater(str(error)) from None

    return handle


def when_feedback_received_store_it(sink: Sink) -> BatchHandler[FeedbackReceived]:
    async def handle(envelopes: list[Envelope[FeedbackReceived]]) -> None:
        try:
            await asyncio.to_thread(sink.store_feedback, envelopes)
        except StoreUnavailable as error:
            raise RetryLater(str(error)) from None

    return handle


def subscribe_sink(
    router: KafkaRouter | KafkaBroker, sink: Sink, settings: FeedbackSettings, *, dead_letters: DeadLetters, topic_prefix: str, max_retries: int, group: str = GROUP
) -> list[Any]:
    """Subscribe the sink to inference.logged, feedback.received and feedback.reviewed as consumer group `group`.

    feedback.received is read as UnreviewedFeedback: a record on it claiming source reviewer is
    dead-lettered with the reason, since apps may write that topic; reviewer rows come from
    feedback.reviewed alone, which only the feedback service may write."""
    options = {
        "group": group,
        "dead_letters": dead_letters,
        "topic_prefix": topic_prefix,
        "max_retries": max_retries,
        "max_records": settings.batch_max_records,
        "max_wait_ms": settings.batch_max_wait_ms,
        "fetch_min_bytes": settings.batch_min_bytes,
    }
    return [
        subscribe_batch(router, InferenceLogged, when_inferences_logged_store_them(sink), **options),
        subscribe_batch(router, UnreviewedFeedback, when_feedback_received_store_it(sink), **options),
        subscribe_batch(router, FeedbackReviewed, when_feedback_received_store_it(sink), **options),
    ]
