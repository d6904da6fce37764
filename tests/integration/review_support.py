"""The feedback service as `flywheel run feedback` builds it, for the review console's tests: its sink on the
real broker storing calls in embedded ClickHouse, and a review queue defined straight through ReviewQueues
with a rubric the test writes (the registry's rubric door is tested with the JSON door)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI

from contracts.events import InferenceLogged, SpanLogged
from contracts.http import ReviewQueueCreate, RubricVersionView
from services.feedback.app import create_app
from services.feedback.review import ReviewQueues
from services.feedback.review_store import ReviewStore
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.privacy import PrivacySettings, Redactor
from services.runtime.service import Runtime, Service, build_process
from services.runtime.settings import FlywheelSettings
from tests.support import eventually

MODEL = "support-bot"
QUEUE = "support-review"
RUBRIC = RubricVersionView(
    name="answer-quality",
    version=3,
    instructions="Judge the answer as the customer would.\nA <b>bold</b> claim needs a source.",
    dimensions=[
        {"name": "correct", "description": "Is every fact in it right?", "scale": "thumbs"},
        {"name": "helpful", "description": "How far does it solve the problem?", "scale": "rating"},
        {"name": "tone", "description": "How does it sound?", "scale": "label", "labels": ["friendly", "curt", "rude"]},
    ],
    created_at=datetime(2025, 1, 1, tzinfo=UTC),
    created_by="ops",
)


def feedback_process(settings: FlywheelSettings, clickhouse: ClickHouseStore) -> tuple[FastAPI, Runtime]:
    def feedback(runtime: Runtime) -> Service:
        # chDB allows one data directory per process: the session's, with a database of this test's own.
        runtime.clickhouse = lambda: clickhouse
        clickhouse.migrate()
        sink = FeedbackSettings(batch_max_records=500, batch_max_wait_ms=100, batch_min_bytes=1, otlp_grpc_port=0)
        return create_app(runtime, sink, PrivacySettings())

    return build_process(settings, [feedback], title="flywheel-feedback")


async def store_calls(runtime: Runtime, clickhouse: ClickHouseStore, calls: list[dict[str, Any]]) -> None:
    """Publish each call as inference.logged and wait until the service's own sink stored them all."""
    bus = runtime.bus("test")
    for index, call in enumerate(calls):
        await bus.publish(InferenceLogged(inference_id=f"call-{index}", model_name=MODEL, **call))
    await eventually(
        lambda: clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] == len(calls),
        what="the sink storing the calls",
    )


async def store_spans(runtime: Runtime, clickhouse: ClickHouseStore, spans: list[SpanLogged]) -> None:
    """Publish each span as span.logged and wait until the service's own sink stored them all."""
    bus = runtime.bus("test")
    for span in spans:
        await bus.publish(span)
    await eventually(
        lambda: clickhouse.query("SELECT count() AS n FROM span")[0]["n"] == len(spans),
        what="the sink storing the spans",
    )


async def define_queue(settings: FlywheelSettings, clickhouse: ClickHouseStore, **definition: Any) -> None:
    """Define QUEUE on RUBRIC through the use case, on a second handle of the service's review.db."""
    store = ReviewStore(settings.home / "feedback" / "review.db")

    async def not_published(event: Any) -> Any:
        raise AssertionError("defining a queue publishes nothing")

    def no_embedder() -> Any:
        raise AssertionError("defining a queue scores nothing")

    queues = ReviewQueues(store, lambda: FeedbackStore(lambda: clickhouse), not_published, Redactor(), no_embedder)
    request = ReviewQueueCreate.model_validate(
        {
            "name": QUEUE,
            "rubric": RUBRIC.name,
            "rule": {"select": "traffic", "model_name": MODEL, "order": "newest"},
            **definition,
        }
    )
    try:
        await queues.define(request, RUBRIC, "ops")
    finally:
        await asyncio.to_thread(store.close)


def reviews_stored(clickhouse: ClickHouseStore) -> list[dict[str, Any]]:
    return clickhouse.query(
        "SELECT actor, source, queue, item_id, rubric, scores, thumbs, rating, tags, correction, comment "
        "FROM feedback FINAL WHERE queue = {queue:String} ORDER BY actor, item_id",
        {"queue": QUEUE},
    )
