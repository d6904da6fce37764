"""The review queues' SQLite state (services/feedback/review_store.py): leases that lapse free their place,
two reviewers never hold one place, skips and reviews keep an item from its reviewer, one item per prompt."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts.http import ReviewOrder
from services.feedback.review_store import (
    ADJUDICATION,
    DONE,
    GONE,
    MIGRATIONS,
    Candidate,
    ItemRecord,
    ReviewRecord,
    ReviewStore,
)
from services.runtime.sqlite import SqliteDatabase

pytestmark = pytest.mark.unit

RUBRIC = {"name": "r", "version": 1, "dimensions": []}


def definition(reviewers: int = 1, lease_seconds: int = 60) -> dict:
    return {"rule": {}, "reviewers_per_item": reviewers, "lease_seconds": lease_seconds, "max_items": 100}


def waiting_for_two(reviews: list[ReviewRecord]) -> str | None:
    """Decided once two reviews are in: adjudication when they differ."""
    if len(reviews) < 2:
        return None
    return DONE if len({review.scores["x"] for review in reviews}) == 1 else ADJUDICATION


def candidates(*prompts: str) -> list[Candidate]:
    now = datetime.now(UTC)
    return [
        Candidate(f"call-{i}", prompt, now - timedelta(minutes=i), groundedness=0.1 * (i + 1))
        for i, prompt in enumerate(prompts)
    ]


def test_one_item_per_prompt_and_a_refill_adds_nothing_twice(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    queue = store.define("q", definition(), RUBRIC, "ops")
    assert store.add(queue, candidates("a", "b", "a", "c"), limit=10) == (3, 0, 1)
    assert store.add(queue, candidates("a", "b", "a", "c"), limit=10) == (0, 3, 1)
    assert store.counts("q")["open"] == 3


def test_the_limit_caps_what_one_fill_adds(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    queue = store.define("q", definition(), RUBRIC, "ops")
    assert store.add(queue, candidates("a", "b", "c", "d"), limit=2)[0] == 2


def test_a_place_is_held_by_one_reviewer_until_the_lease_lapses(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    queue = store.define("q", definition(reviewers=1, lease_seconds=1), RUBRIC, "ops")
    store.add(queue, candidates("a"), limit=10)
    alice = store.claim(queue, "alice", order=ReviewOrder.uncertainty)
    assert alice is not None
    assert store.claim(queue, "bob", order=ReviewOrder.uncertainty) is None, (
        "the one place is alice's while her lease holds"
    )
    assert store.claim(queue, "alice", order=ReviewOrder.uncertainty)[0].item_id == alice[0].item_id  # type: ignore[index]
    time.sleep(1.1)
    assert store.lease_expires_at(alice[0].item_id, "alice", "review") is None
    bob = store.claim(queue, "bob", order=ReviewOrder.uncertainty)
    assert bob is not None and bob[0].item_id == alice[0].item_id


def test_a_retired_item_loses_its_leases_and_is_never_offered_again(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    queue = store.define("q", definition(reviewers=2), RUBRIC, "ops")
    store.add(queue, candidates("a", "b"), limit=10)
    alice = store.claim(queue, "alice", order=ReviewOrder.uncertainty)
    assert alice is not None and alice[0].inference_id == "call-0"
    store.retire(alice[0])
    assert store.item(alice[0].item_id).stage == GONE  # type: ignore[union-attr]
    assert store.lease_expires_at(alice[0].item_id, "alice", "review") is None
    for reviewer in ("alice", "bob"):
        claimed = store.claim(queue, reviewer, order=ReviewOrder.uncertainty)
        assert claimed is not None and claimed[0].inference_id == "call-1", reviewer
    assert store.claim(queue, "carol", order=ReviewOrder.uncertainty) is None, "call-1 is full and call-0 is gone"
    counts = store.counts("q")
    assert (counts["open"], counts["claimed"], counts["gone"]) == (1, 1, 1), counts


def test_two_reviewers_per_item_then_adjudication_by_a_third(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    queue = store.define("q", definition(reviewers=2), RUBRIC, "ops")
    store.add(queue, candidates("a"), limit=10)
    alice, _ = store.claim(queue, "alice", order=ReviewOrder.uncertainty)  # type: ignore[misc]
    bob, _ = store.claim(queue, "bob", order=ReviewOrder.uncertainty)  # type: ignore[misc]
    assert alice.item_id == bob.item_id, "an item needing two reviewers is given to two at once"
    assert store.claim(queue, "carol", order=ReviewOrder.uncertainty) is None
    assert store.review(alice, ReviewRecord("alice", "review", {"x": "up"}, None, None, "f1"), waiting_for_two) is None
    assert (
        store.review(bob, ReviewRecord("bob", "review", {"x": "down"}, None, None, "f2"), waiting_for_two)
        == ADJUDICATION
    )
    assert store.claim(queue, "alice", order=ReviewOrder.uncertainty) is None, (
        "a reviewer never adjudicates their own item"
    )
    carol, _ = store.claim(queue, "carol", order=ReviewOrder.uncertainty)  # type: ignore[misc]
    assert carol.stage == ADJUDICATION
    store.review(carol, ReviewRecord("carol", ADJUDICATION, {"x": "up"}, None, None, "f3"), lambda _: DONE)
    assert store.counts("q") == {"open": 0, "claimed": 0, "adjudication": 0, "done": 1, "gone": 0, "skips": 0}


def test_a_skip_passes_the_item_to_others_and_keeps_the_reason(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    queue = store.define("q", definition(), RUBRIC, "ops")
    store.add(queue, candidates("a", "b"), limit=10)
    first, _ = store.claim(queue, "alice", order=ReviewOrder.uncertainty)  # type: ignore[misc]
    assert first.inference_id == "call-0", "least grounded first"
    store.skip(first, "alice", "not English")
    second, _ = store.claim(queue, "alice", order=ReviewOrder.uncertainty)  # type: ignore[misc]
    assert second.inference_id == "call-1"
    other, _ = store.claim(queue, "bob", order=ReviewOrder.uncertainty)  # type: ignore[misc]
    assert other.inference_id == "call-0"
    assert store.counts("q")["skips"] == 1


def test_newest_first_when_the_queue_does_not_order_by_uncertainty(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    queue = store.define("q", definition(), RUBRIC, "ops")
    store.add(queue, list(reversed(candidates("a", "b", "c"))), limit=10)
    item, _ = store.claim(queue, "alice", order=ReviewOrder.newest)  # type: ignore[misc]
    assert item.inference_id == "call-0"  # the newest call


def test_a_new_definition_is_the_next_version_and_items_keep_theirs(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    first = store.define("q", definition(), RUBRIC, "ops")
    store.add(first, candidates("a"), limit=10)
    second = store.define("q", definition(reviewers=2), RUBRIC, "ops")
    assert (first.version, second.version) == (1, 2)
    assert store.queue("q").version == 2  # type: ignore[union-attr]
    item, _ = store.claim(second, "alice", order=ReviewOrder.uncertainty)  # type: ignore[misc]
    assert item.queue_version == 1


def test_two_reviewers_finishing_an_item_at_once_decide_it(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    queue = store.define("q", definition(reviewers=2), RUBRIC, "ops")
    store.add(queue, candidates("a"), limit=10)
    items = [store.claim(queue, name, order=ReviewOrder.uncertainty)[0] for name in ("alice", "bob")]  # type: ignore[index]
    start = threading.Barrier(2)

    def finish(item: ItemRecord, reviewer: str) -> str | None:
        start.wait()
        return store.review(item, ReviewRecord(reviewer, "review", {"x": "up"}, None, None, reviewer), waiting_for_two)

    with ThreadPoolExecutor(2) as pool:
        stages = list(pool.map(finish, items, ["alice", "bob"]))
    assert sorted(map(str, stages)) == ["None", DONE], "exactly one of the two saw both reviews and decided"
    assert store.item(items[0].item_id).stage == DONE  # type: ignore[union-attr]


def test_items_of_a_review_db_from_before_trace_items_read_as_inference_items(tmp_path: Path) -> None:
    path = tmp_path / "review.db"
    old = SqliteDatabase(path, MIGRATIONS[:2])
    with old.transaction() as db:
        db.execute(
            "INSERT INTO item (item_id, queue, queue_version, inference_id, prompt_key, occurred_at, added_at) "
            "VALUES ('i1', 'q', 1, 'call-0', 'p', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')"
        )
    old.close()
    store = ReviewStore(path)
    assert store.item("i1").target == "inference"  # type: ignore[union-attr]


def test_a_trace_is_queued_once_per_queue_and_keeps_its_target(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "review.db")
    queue = store.define("q", definition(), RUBRIC, "ops")
    trace = "ab" * 16
    found = [Candidate(trace, trace, datetime.now(UTC), None, None, "trace")]
    assert store.add(queue, found, limit=10) == (1, 0, 0)
    assert store.add(queue, found, limit=10) == (0, 1, 0)
    claimed = store.claim(queue, "alice", order=ReviewOrder.uncertainty)
    assert claimed is not None and (claimed[0].target, claimed[0].inference_id) == ("trace", trace)
