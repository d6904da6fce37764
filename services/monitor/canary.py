"""Canary against control: a declared, versioned policy and the statistics that decide promote, roll back or wait.

Every check asks one question with (1 - alpha) confidence: is the canary worse than control by more
than the policy tolerates? Proportions (thumbs-down among thumbs given, errors among inferences, the
watcher's hallucinations among sampled answers) use Newcombe's hybrid score interval for the
difference of two proportions, which stays honest at zero counts where the Wald interval collapses
to a point. The mean rating (1-5) uses the normal interval of the difference of two means with
each arm's own variance (Welch), fine at the minimum sample of ratings bounded to four points. Latency uses a percentile bootstrap of the ratio of the two p95s, since quantiles have no
useful closed-form variance. A check is `worse` when the whole interval lies beyond the tolerance,
`within` when the whole interval lies inside it, and `undecided` otherwise (or below the minimum
sample). Any `worse` rolls back, all `within` promotes, anything else keeps watching: a canary is
never promoted for lack of evidence against it, and one still undecided after `max_watch_s` is rolled back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.monitor.rules import RuleError

Verdict = Literal["worse", "within", "undecided"]
Action = Literal["promote", "rollback", "wait"]


class CanaryPolicy(BaseModel):
    """What must hold, with how much evidence, before a canary takes all traffic or is rolled back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1, description="Bump when the policy's meaning changes: decisions record it.")
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="One-sided error of every interval.")
    min_inferences: int = Field(default=200, ge=1, description="Inferences per arm before errors and latency count.")
    min_feedback: int = Field(default=50, ge=1, description="Thumbs given per arm before the thumbs-down rate counts.")
    max_thumbs_down_increase: float = Field(
        default=0.05, ge=0, le=1, description="Tolerated rise of the thumbs-down rate (absolute)."
    )
    max_error_rate_increase: float = Field(
        default=0.01, ge=0, le=1, description="Tolerated rise of the error rate (absolute)."
    )
    max_latency_p95_ratio: float = Field(default=1.2, ge=1, description="Tolerated canary p95 / control p95.")
    max_hallucination_increase: float = Field(
        default=0.05, ge=0, le=1, description="Tolerated rise of the watcher's hallucination rate (absolute)."
    )
    max_mean_rating_drop: float = Field(
        default=0.25,
        ge=0,
        le=4,
        description="Tolerated fall of the mean rating (1-5 points); left out where neither arm got ratings.",
    )
    hallucination_sample: int = Field(
        default=100, ge=0, le=5000, description="Answers per arm the watcher scores; 0 leaves hallucination out."
    )
    bootstrap_resamples: int = Field(default=2000, ge=100, le=100_000)
    window_s: int = Field(
        default=24 * 3600,
        ge=60,
        description="Traffic considered: since the canary was declared, at most this far back.",
    )
    max_watch_s: int | None = Field(
        default=3 * 24 * 3600,
        ge=60,
        description="A canary still undecided this long after its declaration is rolled back; none: watch forever.",
    )


@dataclass(frozen=True)
class Arm:
    """One side of the comparison over its window, as read from ClickHouse."""

    adapter_version: int
    inferences: int = 0
    errors: int = 0
    thumbs_given: int = 0
    thumbs_down: int = 0
    latencies_ms: tuple[float, ...] = ()
    scored: int = 0
    hallucinated: int = 0
    ratings: tuple[float, ...] = ()


@dataclass(frozen=True)
class Check:
    metric: str
    verdict: Verdict
    control: float | None
    canary: float | None
    low: float | None
    high: float | None
    tolerance: float
    reason: str

    def describe(self) -> str:
        if self.low is None:
            return f"{self.metric}: {self.reason}"
        return f"{self.metric}: {self.verdict} (control {self.control:.4g}, canary {self.canary:.4g}, interval [{self.low:.4g}, {self.high:.4g}] vs tolerance {self.tolerance:g})"


@dataclass(frozen=True)
class Decision:
    action: Action
    checks: tuple[Check, ...]
    policy_version: int

    def summary(self) -> str:
        return f"canary policy v{self.policy_version}: {self.action}; " + "; ".join(
            check.describe() for check in self.checks
        )


def wilson(successes: int, trials: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(canary: tuple[int, int], control: tuple[int, int], z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p_canary - p_control, from (successes, trials) of each."""
    p1, p2 = canary[0] / canary[1], control[0] / control[1]
    l1, u1 = wilson(*canary, z)
    l2, u2 = wilson(*control, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def p95_ratio_interval(
    canary: np.ndarray, control: np.ndarray, resamples: int, alpha: float, seed: int = 0
) -> tuple[float, float, float]:
    """(observed ratio, low, high) of canary p95 / control p95 by a percentile bootstrap; seeded, so a tick repeats."""
    rng = np.random.default_rng(seed)
    ratio = float(np.quantile(canary, 0.95) / max(np.quantile(control, 0.95), 1e-9))
    a = np.quantile(rng.choice(canary, (resamples, canary.size)), 0.95, axis=1)
    b = np.quantile(rng.choice(control, (resamples, control.size)), 0.95, axis=1)
    ratios = a / np.maximum(b, 1e-9)
    return ratio, float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def _verdict(low: float, high: float, tolerance: float) -> Verdict:
    if low > tolerance:
        return "worse"
    if high <= tolerance:
        return "within"
    return "undecided"


def _proportion(
    metric: str, canary: tuple[int, int], control: tuple[int, int], minimum: int, tolerance: float, z: float
) -> Check:
    if canary[1] < minimum or control[1] < minimum:
        return Check(
            metric,
            "undecided",
            None,
            None,
            None,
            None,
            tolerance,
            f"not enough data: canary {canary[1]}, control {control[1]} < {minimum}",
        )
    low, high = difference_interval(canary, control, z)
    return Check(
        metric, _verdict(low, high, tolerance), control[0] / control[1], canary[0] / canary[1], low, high, tolerance, ""
    )


def _rating_drop(
    canary: tuple[float, ...], control: tuple[float, ...], minimum: int, tolerance: float, z: float
) -> Check:
    metric = "mean_rating (drop)"
    if len(canary) < minimum or len(control) < minimum:
        return Check(
            metric,
            "undecided",
            None,
            None,
            None,
            None,
            tolerance,
            f"not enough ratings: canary {len(canary)}, control {len(control)} < {minimum}",
        )
    a, b = np.asarray(canary, float), np.asarray(control, float)
    drop = float(b.mean() - a.mean())
    half = z * math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    return Check(
        metric,
        _verdict(drop - half, drop + half, tolerance),
        float(b.mean()),
        float(a.mean()),
        drop - half,
        drop + half,
        tolerance,
        "",
    )


def judge(policy: CanaryPolicy, control: Arm, canary: Arm, watched_s: float = 0.0) -> Decision:
    """Compare the canary arm with the control arm under `policy`, `watched_s` after it was declared."""
    z = NormalDist().inv_cdf(1 - policy.alpha)
    checks = [
        _proportion(
            "thumbs_down_rate (difference)",
            (canary.thumbs_down, canary.thumbs_given),
            (control.thumbs_down, control.thumbs_given),
            policy.min_feedback,
            policy.max_thumbs_down_increase,
            z,
        ),
        _proportion(
            "error_rate (difference)",
            (canary.errors, canary.inferences),
            (control.errors, control.inferences),
            policy.min_inferences,
            policy.max_error_rate_increase,
            z,
        ),
    ]
    if canary.ratings or control.ratings:
        checks.append(
            _rating_drop(canary.ratings, control.ratings, policy.min_feedback, policy.max_mean_rating_drop, z)
        )
    ok_canary, ok_control = np.asarray(canary.latencies_ms, float), np.asarray(control.latencies_ms, float)
    if min(canary.inferences, control.inferences) < policy.min_inferences or not ok_canary.size or not ok_control.size:
        checks.append(
            Check(
                "latency_p95 (ratio)",
                "undecided",
                None,
                None,
                None,
                None,
                policy.max_latency_p95_ratio,
                f"not enough data: canary {canary.inferences}, control {control.inferences} < {policy.min_inferences}",
            )
        )
    else:
        ratio, low, high = p95_ratio_interval(ok_canary, ok_control, policy.bootstrap_resamples, policy.alpha)
        checks.append(
            Check(
                "latency_p95 (ratio)",
                _verdict(low, high, policy.max_latency_p95_ratio),
                float(np.quantile(ok_control, 0.95)),
                float(np.quantile(ok_canary, 0.95)),
                low,
                high,
                policy.max_latency_p95_ratio,
                f"ratio {ratio:.3g}",
            )
        )
    if policy.hallucination_sample:
        # The watcher scores at most `hallucination_sample` answers per arm; it needs a fair share of them.
        minimum = max(1, min(policy.hallucination_sample, policy.min_feedback))
        checks.append(
            _proportion(
                "hallucination_rate (difference)",
                (canary.hallucinated, canary.scored),
                (control.hallucinated, control.scored),
                minimum,
                policy.max_hallucination_increase,
                z,
            )
        )
    if policy.max_watch_s is not None:
        # Evidence that never settles (too little traffic, or a difference right at the tolerance) must not
        # leave a half-rolled-out version in production indefinitely: undecided for too long counts as worse.
        overdue = watched_s >= policy.max_watch_s and any(check.verdict == "undecided" for check in checks)
        checks.append(
            Check(
                "watch time",
                "worse" if overdue else "within",
                None,
                None,
                None,
                None,
                policy.max_watch_s,
                f"{'still undecided after' if overdue else 'watched'} {watched_s:.0f} s of at most {policy.max_watch_s} s",
            )
        )
    verdicts = {check.verdict for check in checks}
    action: Action = "rollback" if "worse" in verdicts else "promote" if verdicts == {"within"} else "wait"
    return Decision(action, tuple(checks), policy.version)


def parse_canary_policy(document: Any) -> CanaryPolicy:
    try:
        return CanaryPolicy.model_validate(document)
    except ValidationError as error:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in problem['loc']) or 'canary'}: {problem['msg']}" for problem in error.errors()
        )
        raise RuleError(f"canary policy: {reasons}") from None


def load_canary_policy(path: Path) -> CanaryPolicy | None:
    """The `canary:` section of a rules file; None when the file declares none (canaries are then left alone)."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise RuleError(f"{path}: cannot read rules: {error}") from None
    section = document.get("canary") if isinstance(document, dict) else None
    return None if section is None else parse_canary_policy(section)
