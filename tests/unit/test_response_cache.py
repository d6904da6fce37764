"""The response cache's own rules: what is cacheable, Cache-Control, TTL and the LRU bound."""

from __future__ import annotations

import numpy as np
import pytest

from services.serving.response_cache import (
    CacheKey,
    CachedAnswer,
    CacheUse,
    ResponseCache,
    SemanticCache,
    cacheable,
)

pytestmark = pytest.mark.unit


def key(**changes: object) -> CacheKey:
    fields: dict = {
        "principal": "app-1",
        "guard_policy": "",
        "structure": "",
        "context": "",
        "endpoint": "chat.completions",
        "served": "tiny:v1",
        "prompt": "",
        "model_input": "Hi",
        "max_tokens": 4,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
        "stop": (),
    }
    return CacheKey(**{**fields, **changes})


def answer(text: str = "hello") -> CachedAnswer:
    return CachedAnswer(text, "stop", 3, 1, "inf-1")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("temperature", "seed", "route", "expected"),
    [
        (0.0, None, "production", True),
        (0.7, 5, "staging", True),
        (0.7, None, "production", False),
        (0.0, None, "canary", False),
        (0.0, 3, "ab", False),
    ],
)
def test_only_determined_answers_outside_experiments_are_cacheable(
    temperature: float, seed: int | None, route: str, expected: bool
) -> None:
    assert cacheable(temperature, seed, route) is expected


@pytest.mark.parametrize(
    ("header", "use"),
    [
        (None, CacheUse.normal),
        ("max-age=0", CacheUse.normal),
        ("No-Cache", CacheUse.refresh),
        ("no-cache, no-store", CacheUse.off),
        (" no-store ", CacheUse.off),
    ],
)
def test_cache_control_request_directives(header: str | None, use: CacheUse) -> None:
    assert CacheUse.from_header(header) is use


def test_every_field_of_the_key_separates_answers() -> None:
    cache = ResponseCache(capacity=100, ttl_s=60)
    cache.put(key(), answer())
    variants = [
        {"principal": "app-2"},
        {"endpoint": "completions"},
        {"served": "tiny:v2"},
        {"guard_policy": "support-guard:v1"},
        {"prompt": "support:v1"},
        {"model_input": "Hi!"},
        {"max_tokens": 5},
        {"temperature": 0.5, "seed": 1},
        {"top_p": 0.9},
        {"seed": 2},
        {"stop": ("\n",)},
    ]
    assert cache.get(key()) == answer()
    assert [cache.get(key(**variant)) for variant in variants] == [None] * len(variants)


def test_an_answer_expires_after_its_ttl() -> None:
    clock = Clock()
    cache = ResponseCache(capacity=10, ttl_s=30, clock=clock)
    cache.put(key(), answer())
    clock.now = 29.9
    assert cache.get(key()) == answer()
    clock.now = 30.0
    assert cache.get(key()) is None and len(cache) == 0


def test_the_least_recently_used_answer_goes_first_when_full() -> None:
    cache = ResponseCache(capacity=2, ttl_s=60)
    cache.put(key(model_input="a"), answer("A"))
    cache.put(key(model_input="b"), answer("B"))
    assert cache.get(key(model_input="a")) == answer("A")  # now b is the least recently used
    cache.put(key(model_input="c"), answer("C"))
    assert len(cache) == 2
    assert cache.get(key(model_input="b")) is None
    assert cache.get(key(model_input="a")) == answer("A") and cache.get(key(model_input="c")) == answer("C")


def test_capacity_zero_stores_nothing() -> None:
    cache = ResponseCache(capacity=0, ttl_s=60)
    cache.put(key(), answer())
    assert not cache.enabled and cache.get(key()) is None and len(cache) == 0


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_the_semantic_cache_answers_the_closest_question_above_its_threshold_in_the_same_context_only() -> None:
    cache = SemanticCache(capacity=10, ttl_s=60)
    cache.put(key(), unit(1, 0, 0), answer("paris"))
    cache.put(key(), unit(0, 1, 0), answer("bread"))
    near = cache.get(key(), unit(1, 0.2, 0), 0.9)
    assert near is not None and near.answer.text == "paris" and 0.9 <= near.similarity < 1.0
    assert cache.get(key(), unit(1, 1, 0), 0.9) is None, "45 degrees from both: under the threshold"
    assert cache.get(key(principal="app-2"), unit(1, 0, 0), 0.9) is None
    assert cache.get(key(served="tiny:v2"), unit(1, 0, 0), 0.9) is None
    assert cache.get(key(guard_policy="support-guard:v2"), unit(1, 0, 0), 0.9) is None
    assert cache.get(key(), unit(1, 0.2, 0), 0.99) is None, "a stricter policy's threshold"


def test_the_semantic_cache_forgets_by_age_by_context_bound_and_by_capacity() -> None:
    clock = Clock()
    cache = SemanticCache(capacity=3, ttl_s=10, clock=clock)
    cache.put(key(), unit(1, 0), answer("old"))
    clock.now = 11
    assert cache.get(key(), unit(1, 0), 0.9) is None and len(cache) == 0
    for index in range(3):
        cache.put(key(model_input=str(index)), unit(1, index), answer(str(index)))
    cache.put(key(model_input="3"), unit(0, 1), answer("3"))
    assert len(cache) == 3 and cache.get(key(model_input="0"), unit(1, 0), 0.9) is None, "the least recent context went"
    bounded = SemanticCache(capacity=1000, ttl_s=10, clock=clock)
    for index in range(SemanticCache.PER_CONTEXT + 1):
        bounded.put(key(), unit(1, 0), answer(str(index)))
    assert len(bounded) == SemanticCache.PER_CONTEXT
