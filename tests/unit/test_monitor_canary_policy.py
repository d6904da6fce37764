"""The canary policy's statistics and decision rule, on numbers with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.monitor.canary import Arm, CanaryPolicy, difference_interval, judge, load_canary_policy, p95_ratio_interval, wilson
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
    assert low < ratio < high and 1.9 < low and high < 2.1


def arm(version: int, *, n: int = 400, down: int = 40, errors: int = 0, latency: float = 300.0) -> Arm:
    return Arm(version, inferences=n, errors=errors, thumbs_given=n, thumbs_down=down, latencies_ms=tuple(latency + i % 50 for i in range(n)))


def test_equal_arms_promote_a_clearly_worse_arm_rolls_back() -> None:
    assert judge(POLICY, arm(1), arm(2)).action == "promote"
    worse = judge(POLICY, arm(1), arm(2, down=200))
    assert worse.action == "rollback"
    assert [c.verdict for c in worse.checks] == ["worse", "within", "within", "within"]


def test_too_little_evidence_waits_and_never_promotes() -> None:
    thin = judge(POLICY, arm(1, n=50, down=5), arm(2, n=50, down=5))
    assert thin.action == "wait" and [c.verdict for c in thin.checks] == ["undecided", "undecided", "undecided", "within"]
    assert "not enough data: canary 50, control 50 < 100" in thin.summary()
    # Slightly worse, but not surely beyond tolerance: keep watching rather than guess.
    assert judge(POLICY, arm(1), arm(2, down=60)).action == "wait"


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
