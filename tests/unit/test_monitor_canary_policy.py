"""The canary policy's statistics and decision rule, on numbers with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.monitor.canary import (
    Arm,
    CanaryPolicy,
    difference_interval,
    judge,
    load_canary_policy,
    p95_ratio_interval,
    wilson,
)
from services.monitor.rules import DEFAULT_RULES, RuleError

pytestmark = pytest.mark.unit

POLICY = CanaryPolicy(version=1, min_inferences=100, min_feedback=100, hallucination_sample=0)


def test_wilson_and_newcombe_match_the_published_examples() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, table II: 56/70 vs 48/80 -> 0.0524 to 0.3339 (95%).
    low, high = difference_interval((56, 70), (48, 80), 1.959964)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    # Zero events: Wilson still gives a real upper bound where Wald gives [0, 0].
    assert wilson(0, 10, 1.959964) == (0.0, pytest.approx(0.2775, abs=1e-4))


def test_bootstrap_ratio_brackets_the_true_ratio() -> None:
    rng = np.random.default_rng(7)
    ratio, low, high = p95_ratio_interval(rng.normal(600, 20, 400), rng.normal(300, 10, 400), 1000, 0.05)
    assert low < ratio < high and low > 1.9 and high < 2.1


def arm(version: int, *, n: int = 400, down: int = 40, errors: int = 0, latency: float = 300.0) -> Arm:
    return Arm(
        version,
        inferences=n,
        errors=errors,
        thumbs_given=n,
        thumbs_down=down,
        latencies_ms=tuple(latency + i % 50 for i in range(n)),
    )


def test_equal_arms_promote_a_clearly_worse_arm_rolls_back() -> None:
    assert judge(POLICY, arm(1), arm(2)).action == "promote"
    worse = judge(POLICY, arm(1), arm(2, down=200))
    assert worse.action == "rollback"
    assert [c.verdict for c in worse.checks] == ["worse", "within", "within", "within"]


def test_too_little_evidence_waits_and_never_promotes() -> None:
    thin = judge(POLICY, arm(1, n=50, down=5), arm(2, n=50, down=5))
    assert thin.action == "wait" and [c.verdict for c in thin.checks] == [
        "undecided",
        "undecided",
        "undecided",
        "within",
    ]
    assert "not enough data: canary 50, control 50 < 100" in thin.summary()
    # Slightly worse, but not surely beyond tolerance: keep watching rather than guess.
    assert judge(POLICY, arm(1), arm(2, down=60)).action == "wait"


def rated(version: int, ratings: list[int]) -> Arm:
    return Arm(
        version,
        inferences=400,
        thumbs_given=400,
        thumbs_down=40,
        latencies_ms=tuple(300.0 + i % 50 for i in range(400)),
        ratings=tuple(map(float, ratings)),
    )


def test_a_canary_rated_lower_by_more_than_the_tolerance_rolls_back_and_without_ratings_the_check_is_left_out() -> None:
    control = rated(1, [5, 4, 4, 3] * 50)  # mean 4.0
    assert judge(POLICY, control, rated(2, [5, 4, 4, 3] * 50)).action == "promote"
    lower = judge(POLICY, control, rated(2, [4, 3, 3, 2] * 50))  # a whole point lower
    check = next(c for c in lower.checks if c.metric == "mean_rating (drop)")
    assert lower.action == "rollback" and check.verdict == "worse" and (check.control, check.canary) == (4.0, 3.0)
    assert check.low is not None and 0.8 < check.low < 1.0 < check.high < 1.2
    # A drop of 0.25 sits at the tolerance: not surely beyond it, not surely within: keep watching.
    assert judge(POLICY, control, rated(2, [5, 4, 4, 3] * 37 + [4, 3, 3, 2] * 13)).action == "wait"
    too_few = judge(POLICY, control, rated(2, [5, 4] * 10))
    assert too_few.action == "wait" and "not enough ratings: canary 20, control 200" in too_few.summary()
    assert "mean_rating" not in judge(POLICY, arm(1), arm(2)).summary(), (
        "thumbs-only apps are not held back by ratings they never give"
    )


def test_a_canary_undecided_past_the_watch_limit_is_rolled_back() -> None:
    ambiguous = (arm(1), arm(2, down=60))
    assert judge(POLICY, *ambiguous, watched_s=POLICY.max_watch_s - 1).action == "wait"
    overdue = judge(POLICY, *ambiguous, watched_s=POLICY.max_watch_s)
    assert overdue.action == "rollback" and "watch time: still undecided after 259200 s" in overdue.summary()
    # A decided canary is judged on its evidence however long it ran.
    assert judge(POLICY, arm(1), arm(2), watched_s=10 * POLICY.max_watch_s).action == "promote"
    assert judge(POLICY.model_copy(update={"max_watch_s": None}), *ambiguous, watched_s=10**9).action == "wait"


def test_a_bad_policy_is_refused_with_the_reason(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\ncanary:\n  version: 1\n  alpha: 0.7\n  max_latency_p95_ratio: 0.5\n  surprise: 1\n")
    with pytest.raises(RuleError) as refused:
        load_canary_policy(rules)
    assert "alpha: Input should be less than 0.5" in str(refused.value)
    assert "max_latency_p95_ratio: Input should be greater than or equal to 1" in str(refused.value)
    assert "surprise: Extra inputs are not permitted" in str(refused.value)
    rules.write_text("rules: []\n")
    assert load_canary_policy(rules) is None
    assert load_canary_policy(DEFAULT_RULES).version == 1
