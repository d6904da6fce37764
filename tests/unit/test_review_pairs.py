"""Which two answers a `pairs` review rule puts side by side (services/feedback/review_pairs.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.feedback.review_pairs import AnswerPair, answer_pairs

pytestmark = pytest.mark.unit

START = datetime(2026, 12, 1, tzinfo=UTC)


def call(
    inference_id: str, prompt: str, answer: str, minute: int, version: int = 1, route: str = "production"
) -> dict[str, Any]:
    return {
        "inference_id": inference_id,
        "input_text": prompt,
        "output_text": answer,
        "occurred_at": START + timedelta(minutes=minute),
        "adapter_version": version,
        "route": route,
    }


def shown(pair: AnswerPair) -> set[str]:
    return {pair.first, pair.second}


def test_the_newest_answer_meets_the_newest_different_answer_of_another_arm() -> None:
    rows = [
        call("v1-old", "Q", "Two years.", 0),
        call("v2", "Q", "Two years from purchase.", 1, version=2, route="canary"),
        call("v1-other", "Q", "About two years.", 2),
        call("v1-new", "Q", "Two years!", 3),
    ]
    [pair] = answer_pairs(rows)
    assert shown(pair) == {"v1-new", "v2"} and pair.occurred_at == START + timedelta(minutes=3)


def test_the_same_arm_is_paired_when_no_other_arm_answered_differently() -> None:
    rows = [
        call("a", "Q", "No.", 0),
        call("b", "Q", "Yes.", 1, version=2, route="canary"),
        call("c", "Q", "No.", 2, version=2, route="canary"),
    ]
    [pair] = answer_pairs(rows)
    assert shown(pair) == {"c", "b"}


def test_one_answer_same_texts_and_cache_replays_give_no_pair() -> None:
    rows = [
        call("alone", "Q1", "Yes.", 0),
        call("same-1", "Q2", "Yes.", 0),
        call("same-2", "Q2", " Yes. ", 1, version=2),
        call("cached", "Q3", "No.", 1, route="cache"),
        call("generated", "Q3", "Yes.", 0),
    ]
    assert answer_pairs(rows) == []


def test_the_order_shown_is_a_hash_of_the_two_ids_not_of_age_or_arm() -> None:
    firsts = []
    for n in range(40):
        newest, older = f"new-{n}", f"old-{n}"
        [pair] = answer_pairs([call(older, "Q", "A.", 0), call(newest, "Q", "B.", 1, version=2)])
        [again] = answer_pairs([call(newest, "Q", "B.", 1, version=2), call(older, "Q", "A.", 0)])
        assert (pair.first, pair.second) == (again.first, again.second)
        firsts.append(pair.first == newest)
    # Neither the newer nor the older answer always leads.
    assert 10 < sum(firsts) < 30
