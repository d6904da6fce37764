"""The gate on synthetic paired scores: a clearly better candidate passes, an equal one fails, a guard
regression fails with its reason, and intervals are seeded and correct."""

from __future__ import annotations

import numpy as np
import pytest

from services.evaluator.gate import POLICIES, compare, decide, paired_bootstrap, policy_for

pytestmark = pytest.mark.unit

POLICY = POLICIES["default@v1"]
N = 40


def _comparisons(candidate: dict[str, list], baseline: dict[str, list]) -> dict:
    return {metric: compare(metric, candidate[metric], baseline[metric]) for metric in candidate}


def _scores(seed: int, shift: float = 0.0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(np.clip(rng.uniform(0.2, 0.6, N) + shift, 0, 1))


def test_paired_bootstrap_is_seeded_and_covers_the_mean_difference() -> None:
    base = _scores(1)
    cand = [b + 0.1 for b in base]
    interval = paired_bootstrap(cand, base)
    assert interval is not None
    assert interval.difference == pytest.approx(0.1)
    assert interval.low == pytest.approx(0.1) and interval.high == pytest.approx(0.1)  # constant differences
    noisy = _scores(2)
    first, second = paired_bootstrap(noisy, base, seed=7), paired_bootstrap(noisy, base, seed=7)
    assert first == second
    assert first.low < first.difference < first.high
    assert paired_bootstrap([None, 0.5], [0.4, None]) is None
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([0.1], [0.1, 0.2])


def test_a_clearly_better_candidate_passes() -> None:
    base = _scores(3)
    grounded = _scores(4)
    verdict = decide(
        POLICY,
        _comparisons(
            {
                "token_f1": [b + 0.15 + 0.05 * np.sin(i) for i, b in enumerate(base)],
                "groundedness": grounded,
                "unsafe_rate": [0.0] * N,
            },
            {"token_f1": base, "groundedness": grounded, "unsafe_rate": [0.0] * N},
        ),
    )
    assert verdict.passed, verdict.reasons
    assert verdict.reasons[0].startswith("PASS token_f1: improved by +0.15")
    assert "SKIP format_validity: not measured" in "\n".join(verdict.reasons)


def test_an_equal_candidate_fails() -> None:
    base = _scores(5)
    verdict = decide(
        POLICY, _comparisons({"token_f1": base, "groundedness": base}, {"token_f1": base, "groundedness": base})
    )
    assert not verdict.passed
    assert verdict.reasons[0].startswith("FAIL token_f1: no improvement with 95% confidence: +0.0000")


def test_a_guard_regression_fails_with_the_numbers() -> None:
    base = _scores(6)
    verdict = decide(
        POLICY,
        _comparisons(
            {
                "token_f1": [b + 0.2 for b in base],
                "groundedness": [b - 0.2 for b in base],
                "unsafe_rate": [1.0] * 4 + [0.0] * (N - 4),
            },
            {"token_f1": base, "groundedness": base, "unsafe_rate": [0.0] * N},
        ),
    )
    assert not verdict.passed
    reasons = "\n".join(verdict.reasons)
    assert "PASS token_f1" in reasons
    assert "FAIL groundedness: may drop by up to 0.2000, more than the 0.0500 allowed: -0.2000" in reasons
    assert "FAIL unsafe_rate: may rise by up to" in reasons


def test_a_metric_erroring_on_too_many_examples_fails_the_gate() -> None:
    base = _scores(8)
    candidate = [b + 0.3 for b in base]
    candidate[:6] = [None] * 6
    verdict = decide(POLICY, _comparisons({"token_f1": candidate}, {"token_f1": base}))
    assert not verdict.passed
    assert "FAIL token_f1: errored on 6/40 candidate examples (at most 10% allowed)" in verdict.reasons


def test_policies_are_declared_per_model_and_versioned() -> None:
    factual = ["Hold it for 12 seconds.", "It costs $4.99 a month.", "Yes, it does."]
    assert policy_for("smol", {"smol": "default@v1"}, references=factual) == (
        POLICIES["default@v1"],
        "declared for smol",
    )
    assert policy_for("smol", {}, "default@v1", references=factual) == (
        POLICIES["default@v1"],
        "the evaluator's default",
    )
    with pytest.raises(KeyError, match="strict@v9"):
        policy_for("smol", {"smol": "strict@v9"})


def test_auto_applies_the_facts_policy_where_most_references_state_numbers() -> None:
    policy, why = policy_for(
        "smol", {}, references=["Hold it for 12 seconds.", "It costs $4.99 a month.", "Yes, it does."]
    )
    assert (policy.key, why) == ("facts@v1", "auto: 2/3 golden references state numbers (at least 50%)")
    policy, why = policy_for("smol", {}, references=["Yes, it does.", "Ask support.", "Within 30 days."])
    assert (policy.key, why) == ("default@v1", "auto: 1/3 golden references state numbers (under 50%)")


def test_facts_policy_also_wants_the_numbers_right() -> None:
    base = _scores(9)
    fluent_but_wrong = {"token_f1": [b + 0.2 for b in base], "fact_numbers": [0.0] * N, "hallucination_rate": [1.0] * N}
    baseline = {"token_f1": base, "fact_numbers": [0.0] * N, "hallucination_rate": [1.0] * N}
    verdict = decide(POLICIES["facts@v1"], _comparisons(fluent_but_wrong, baseline))
    assert not verdict.passed
    assert "PASS token_f1" in verdict.reasons[0]
    assert verdict.reasons[1].startswith("FAIL fact_numbers: no improvement with 95% confidence: +0.0000")
    right = dict(
        fluent_but_wrong,
        fact_numbers=[1.0] * (N // 2) + [0.0] * (N // 2),
        hallucination_rate=[0.0] * (N // 2) + [1.0] * (N // 2),
    )
    assert decide(POLICIES["facts@v1"], _comparisons(right, baseline)).passed
