"""Trace items of a review queue (services/feedback/review.py) whose trace is no longer stored: retired at the
claim that reaches them, the next one claimed instead, as a gone inference item is. The store is a stand-in
that knows one trace; the real ClickHouse path is tests/integration/test_review_traces.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from contracts.http import ReviewQueueCreate, RubricVersionView
from services.feedback.review import ReviewQueues
from services.feedback.review_store import ReviewStore
from services.runtime.privacy import Redactor

pytestmark = pytest.mark.unit

KEPT, GONE_TRACE = "ab" * 16, "cd" * 16
RUBRIC = RubricVersionView(
    name="r",
    version=1,
    instructions="",
    dimensions=[{"name": "ok", "description": "Fine?", "scale": "thumbs"}],
    created_at=datetime(2026, 1, 1, tzinfo=UTC),
    created_by="ops",
)


class OneTrace:
    """Knows KEPT (a root and a child); GONE_TRACE was queued and has since expired."""

    def review_trace_candidates(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        return [{"target_id": GONE_TRACE, "began_at": now}, {"target_id": KEPT, "began_at": now - timedelta(hours=1)}]

    def trace_for_review(self, trace_id: str, *, limit: int = 200) -> list[dict[str, Any]]:
        if trace_id != KEPT:
            return []
        span = {"kind": "chain", "status": "ok", "error": None, "duration_ms": 5.0, "model_name": None}
        span |= {"adapter_version": None, "session_id": None, "started_at": datetime.now(UTC)}
        return [
            {
                **span,
                "span_id": "1" * 16,
                "parent_span_id": None,
                "name": "turn",
                "input_text": "q",
                "output_text": "a",
            },
            {
                **span,
                "span_id": "2" * 16,
                "parent_span_id": "1" * 16,
                "name": "llm",
                "input_text": "p",
                "output_text": "a",
            },
        ]


async def test_a_trace_no_longer_stored_is_retired_at_claim_and_the_next_is_claimed(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")

    async def publish(event: Any) -> Any:
        raise AssertionError("claiming publishes nothing")

    queues = ReviewQueues(store, OneTrace, publish, Redactor(), lambda: None)  # type: ignore[arg-type,return-value]
    request = ReviewQueueCreate.model_validate(
        {"name": "traces", "rubric": "r", "rule": {"target": "trace", "select": "traffic"}}
    )
    await queues.define(request, RUBRIC, "ops")
    assert (await queues.fill("traces")).added == 2
    item = await queues.claim("traces", "alice")
    assert item is not None and (item.target, item.trace_id) == ("trace", KEPT)
    assert [(span.name, span.depth) for span in item.spans] == [("turn", 0), ("llm", 1)]
    assert (item.messages, item.answer) == ([{"role": "user", "content": "q"}], "a")
    assert store.counts("traces")["gone"] == 1
    again = await queues.claim("traces", "alice")
    assert again is not None and again.item_id == item.item_id, "a reload gives the item held, not the gone one"
