"""The promotion gate: paired bootstrap intervals on candidate - baseline, and versioned policies.

Scores are paired by example: both targets answer the same golden prompts, so the difference per
example removes the examples' own difficulty from the noise. The interval is the percentile
bootstrap of the mean difference (seeded, so an evaluation gives the same interval when re-run).

A policy is declared per model (settings), named `name@vN`; changing what it demands is a new
version, and every verdict records the version it applied. A model without a declared policy gets
`auto`: facts@v1 when its golden set is factual, default@v1 otherwise (see policy_for).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from contracts.events import MetricComparison
from services.evaluator.suite import TargetScores
from services.runtime.scoring.grounding import numbers_in

Scores = Sequence[float | None]  # one per example; None where the metric errored or does not apply


@dataclass(frozen=True)
class Interval:
    difference: float
    low: float
    high: float
    pairs: int


def paired_bootstrap(
    candidate: Scores, baseline: Scores, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Interval | None:
    """Mean of candidate - baseline over examples both have, with its percentile bootstrap interval; None without pairs."""
    if len(candidate) != len(baseline):
        raise ValueError(
            f"paired scores need the same examples: {len(candidate)} candidate vs {len(baseline)} baseline"
        )
    differences = np.array(
        [c - b for c, b in zip(candidate, baseline, strict=True) if c is not None and b is not None], dtype=np.float64
    )
    if differences.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, differences.size, size=(resamples, differences.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(differences.mean()), float(low), float(high), int(differences.size))


def compare(
    metric: str,
    candidate: Scores,
    baseline: Scores | None,
    *,
    errors: int | None = None,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricComparison:
    """One metric's summary: both means, and the paired interval when there is a baseline.

    `errors` counts the candidate's examples on which the metric failed; unset, every None counts as
    one (pass it when None also means "does not apply to this example").
    """
    scored = [value for value in candidate if value is not None]
    errors = sum(value is None for value in candidate) if errors is None else errors
    summary = MetricComparison(metric=metric, candidate=_mean(scored), examples=len(scored), errors=errors)
    if baseline is None:
        return summary
    interval = paired_bootstrap(candidate, baseline, resamples=resamples, confidence=confidence, seed=seed)
    base_scored = [value for value in baseline if value is not None]
    update: dict[str, float | None] = {"baseline": _mean(base_scored) if base_scored else None}
    if interval is not None:
        update |= {"difference": interval.difference, "ci_low": interval.low, "ci_high": interval.high}
    return summary.model_copy(update=update)


def compare_targets(
    policy: GatePolicy, candidate: TargetScores, baseline: TargetScores, *, resamples: int
) -> dict[str, MetricComparison]:
    """Every metric the candidate was scored on, paired with the baseline's scores on the same examples."""
    return {
        metric: compare(
            metric,
            values,
            baseline.scores.get(metric),
            errors=sum(error is not None for error in candidate.errors[metric]),
            resamples=resamples,
            confidence=policy.confidence,
            seed=policy.seed,
        )
        for metric, values in candidate.scores.items()
    }


def _mean(values: Sequence[float]) -> float:
    # A metric that errored on every example has no mean; `examples=0` and `errors` say so, and the
    # gate's error-rate rule fails it, so 0.0 here cannot pass anything.
    return float(np.mean(values)) if values else 0.0


@dataclass(frozen=True)
class Guard:
    """Non-inferiority: fails unless the interval rules out a regression larger than `margin`."""

    metric: str
    margin: float
    higher_is_better: bool = True


@dataclass(frozen=True)
class GatePolicy:
    name: str
    version: int
    primary: str
    guards: tuple[Guard, ...] = ()
    also_improve: tuple[str, ...] = ()  # further metrics that must improve with the same confidence
    confidence: float = 0.95
    resamples: int = 2000
    max_error_rate: float = 0.1  # share of examples on which a gated metric may error, per target
    seed: int = 0
    description: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"


POLICIES: dict[str, GatePolicy] = {
    policy.key: policy
    for policy in (
        GatePolicy(
            name="default",
            version=1,
            primary="token_f1",
            guards=(
                Guard("groundedness", 0.05),
                Guard("unsafe_rate", 0.02, higher_is_better=False),
                Guard("format_validity", 0.05),
            ),
            description="token F1 improves with 95% confidence (interval above 0); groundedness and format validity lose "
            "at most 0.05 and the unsafe rate gains at most 0.02, each with 95% confidence",
        ),
        # For factual answers (support, policies, specs). Token F1 rewards the domain's wording: an adapter
        # trained on shuffled answers speaks it fluently with the wrong facts and beats a base model on
        # F1 and groundedness (seen in tests/e2e/test_evaluator_gate_on_trained_adapters.py). The
        # numbers of the reference (durations, prices, counts) must come out right more often as well.
        GatePolicy(
            name="facts",
            version=1,
            primary="token_f1",
            also_improve=("fact_numbers",),
            guards=(
                Guard("groundedness", 0.05),
                Guard("hallucination_rate", 0.05, higher_is_better=False),
                Guard("unsafe_rate", 0.02, higher_is_better=False),
                Guard("format_validity", 0.05),
            ),
            description="default@v1, and the share of answers stating exactly the reference's numbers improves with 95% "
            "confidence; the hallucination rate gains at most 0.05",
        ),
    )
}


@dataclass
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)


def decide(policy: GatePolicy, comparisons: Mapping[str, MetricComparison]) -> Verdict:
    """Apply `policy` to the per-metric comparisons: pass only if every rule passes; one reason line per rule."""
    reasons: list[str] = []
    ok = True
    pct = f"{policy.confidence:.0%}"
    for metric in (policy.primary, *policy.also_improve, *(guard.metric for guard in policy.guards)):
        summary = comparisons.get(metric)
        if summary is None:
            continue
        total = summary.examples + summary.errors
        if total and summary.errors / total > policy.max_error_rate:
            ok = False
            reasons.append(
                f"FAIL {metric}: errored on {summary.errors}/{total} candidate examples (at most {policy.max_error_rate:.0%} allowed)"
            )

    for metric in (policy.primary, *policy.also_improve):
        summary = comparisons.get(metric)
        if summary is None or summary.ci_low is None or summary.ci_high is None or summary.difference is None:
            ok = False
            reasons.append(f"FAIL {metric}: no paired scores to compare (metric not measured, or no baseline)")
            continue
        numbers = f"({pct} CI [{summary.ci_low:+.4f}, {summary.ci_high:+.4f}], n={summary.examples}; {summary.baseline:.4f} -> {summary.candidate:.4f})"
        if summary.ci_low > 0:
            reasons.append(f"PASS {metric}: improved by {summary.difference:+.4f} {numbers}")
        else:
            ok = False
            reasons.append(
                f"FAIL {metric}: no improvement with {pct} confidence: {summary.difference:+.4f} {numbers}; the interval must lie above 0"
            )

    for guard in policy.guards:
        summary = comparisons.get(guard.metric)
        if summary is None or summary.ci_low is None or summary.ci_high is None or summary.difference is None:
            reasons.append(f"SKIP {guard.metric}: not measured on these examples")
            continue
        interval = f"{summary.difference:+.4f} ({pct} CI [{summary.ci_low:+.4f}, {summary.ci_high:+.4f}])"
        worst = (
            -summary.ci_low if guard.higher_is_better else summary.ci_high
        )  # the largest regression the interval allows
        direction = "drop" if guard.higher_is_better else "rise"
        if worst > guard.margin:
            ok = False
            reasons.append(
                f"FAIL {guard.metric}: may {direction} by up to {worst:.4f}, more than the {guard.margin:.4f} allowed: {interval}"
            )
        else:
            reasons.append(
                f"PASS {guard.metric}: {direction} of at most {max(worst, 0.0):.4f} (allowed {guard.margin:.4f}): {interval}"
            )
    return Verdict(ok, reasons)


AUTO = "auto"
# A golden set is factual when at least this share of its references state a number (durations,
# prices, counts): there, token F1 alone passes fluent answers with the wrong facts, so facts@v1 applies.
FACTUAL_SHARE = 0.5


def policy_for(
    model_name: str, declared: Mapping[str, str], default: str = AUTO, *, references: Sequence[str] = ()
) -> tuple[GatePolicy, str]:
    """The policy for `model_name` and why it applies: its declared one, else `default`; `auto` picks
    facts@v1 for a factual golden set (see FACTUAL_SHARE) and default@v1 otherwise. An unknown name
    raises KeyError naming the choices."""
    key = declared.get(model_name)
    why = f"declared for {model_name}"
    if key is None and default != AUTO:
        key, why = default, "the evaluator's default"
    if key is None:
        factual = sum(bool(numbers_in(reference)) for reference in references)
        key = "facts@v1" if references and factual / len(references) >= FACTUAL_SHARE else "default@v1"
        why = f"auto: {factual}/{len(references)} golden references state numbers ({'at least' if key == 'facts@v1' else 'under'} {FACTUAL_SHARE:.0%})"
    if key not in POLICIES:
        raise KeyError(f"gate policy {key!r} ({why}) is unknown: choose one of {', '.join(POLICIES)} or {AUTO}")
    return POLICIES[key], why
