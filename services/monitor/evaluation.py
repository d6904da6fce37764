"""Rules evaluated over their windows: for each scope with traffic, a value (an aggregate in SQL, or a
score over a sample: PSI, embedding drift, unsafe or ungrounded answers), or `no data` with why."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.monitor.rules import Rule
from services.monitor.store import MonitorStore
from services.runtime.scoring import LazyEmbedder, scan_unsafe, score_groundedness

PSI_BINS = 10
PSI_EPSILON = 1e-4


@dataclass(frozen=True)
class Evaluation:
    """One rule over one scope at one tick: a value, or `no data` with why."""

    rule: Rule
    scope: dict[str, Any]
    window_start: datetime
    window_end: datetime
    value: float | None
    samples: int
    firing: bool
    reason: str = ""

    @property
    def no_data(self) -> bool:
        return self.value is None

    def stored(self, now: datetime) -> dict[str, Any]:
        """The row kept in monitor_evaluation: every evaluation, firing or not, so drift shows over time."""
        rule = self.rule
        return {
            "evaluation_id": str(uuid.uuid4()),
            "evaluated_at": now,
            "rule_name": rule.name,
            "rule_version": rule.version,
            "metric": rule.metric,
            "kind": rule.spec.scorer or rule.spec.kind,
            # A span rule without a scope judges its spans together: no model to name.
            "model_name": self.scope.get("model_name", ""),
            "adapter_version": self.scope.get("adapter_version"),
            "prompt_version": self.scope.get("prompt_version"),
            "window_start": self.window_start,
            "window_end": self.window_end,
            "value": self.value,
            "samples": self.samples,
            "firing": self.firing,
            "reason": self.reason,
        }


def psi(expected: Sequence[float], actual: Sequence[float], bins: int = PSI_BINS) -> float:
    """Population stability index of `actual` against `expected`, on the baseline's quantile bins."""
    ordered = sorted(expected)
    edges = sorted({ordered[min(len(ordered) - 1, int(len(ordered) * q / bins))] for q in range(1, bins)})

    def shares(values: Sequence[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for value in values:
            counts[sum(value >= edge for edge in edges)] += 1
        return [max(count / len(values), PSI_EPSILON) for count in counts]

    base, now = shares(expected), shares(actual)
    return sum((a - e) * math.log(a / e) for e, a in zip(base, now, strict=True))


class RuleEvaluator:
    """Reads a rule's window (and its baseline window) from the store and judges each scope in it."""

    def __init__(self, store: MonitorStore, embedder: LazyEmbedder) -> None:
        self._store = store
        self._embedder = embedder

    def evaluate(self, rule: Rule, now: datetime) -> list[Evaluation]:
        """Evaluate one rule for every scope with traffic in its window; scopes without enough samples are `no data`."""
        end = now
        start = end - timedelta(seconds=rule.window_s)
        base_start = start - timedelta(seconds=rule.baseline_window_s or 0)
        kind = rule.spec.kind
        if kind == "sql":
            current = {_key(rule, row): row for row in self._store.aggregate(rule, start, end)}
            baseline = (
                {_key(rule, row): row for row in self._store.aggregate(rule, base_start, start)}
                if rule.needs_baseline
                else {}
            )
            return [
                self._judge_aggregate(rule, key, row, baseline.get(key), start, end) for key, row in current.items()
            ]
        limit = rule.sample_size if kind in ("scored", "embedding") else 100_000
        current_rows = _grouped(rule, self._store.values(rule, start, end, limit))
        baseline_rows = (
            _grouped(rule, self._store.values(rule, base_start, start, limit)) if rule.needs_baseline else {}
        )
        return [
            self._judge_sample(rule, key, rows, baseline_rows.get(key, []), start, end)
            for key, rows in current_rows.items()
        ]

    def _judge_aggregate(
        self, rule: Rule, key: tuple, row: dict, base: dict | None, start: datetime, end: datetime
    ) -> Evaluation:
        scope = dict(zip(rule.scope, key, strict=True))
        samples = int(row["samples"] or 0)
        if samples < rule.min_samples or _missing(row["value"]):
            return Evaluation(
                rule, scope, start, end, None, samples, False, f"no data: {samples} samples < {rule.min_samples}"
            )
        value = float(row["value"])
        if rule.mode == "against_baseline":
            base_samples = int(base["samples"] or 0) if base else 0
            if base is None or base_samples < rule.min_samples or _missing(base["value"]):
                return Evaluation(
                    rule,
                    scope,
                    start,
                    end,
                    None,
                    samples,
                    False,
                    f"no data: baseline has {base_samples} samples < {rule.min_samples}",
                )
            value -= float(base["value"])
        return Evaluation(rule, scope, start, end, value, samples, rule.crosses(value))

    def _judge_sample(
        self, rule: Rule, key: tuple, rows: list[dict], base: list[dict], start: datetime, end: datetime
    ) -> Evaluation:
        scope = dict(zip(rule.scope, key, strict=True))
        if len(rows) < rule.min_samples:
            return Evaluation(
                rule, scope, start, end, None, len(rows), False, f"no data: {len(rows)} samples < {rule.min_samples}"
            )
        if rule.needs_baseline and len(base) < rule.min_samples:
            return Evaluation(
                rule,
                scope,
                start,
                end,
                None,
                len(rows),
                False,
                f"no data: baseline has {len(base)} samples < {rule.min_samples}",
            )
        value = self._score(rule, rows, base)
        return Evaluation(rule, scope, start, end, value, len(rows), rule.crosses(value))

    def _score(self, rule: Rule, rows: list[dict], base: list[dict]) -> float:
        kind = rule.spec.kind
        if kind == "psi":
            return psi([float(row["value"]) for row in base], [float(row["value"]) for row in rows])
        if kind == "embedding":
            embedder = self._embedder.get()
            now = embedder.encode([row["value"] or " " for row in rows]).mean(0)
            then = embedder.encode([row["value"] or " " for row in base]).mean(0)
            cosine = float((now @ then) / (now.norm() * then.norm()).clamp(min=1e-9))
            return 1.0 - cosine
        if rule.spec.scorer == "unsafe":
            return sum(scan_unsafe(row["output_text"]).unsafe for row in rows) / len(rows)
        # The live watcher: the prompt is the context a production answer should stay within.
        scores = score_groundedness(
            [row["output_text"] for row in rows], [row["input_text"] for row in rows], self._embedder.get()
        )
        return sum(not score.grounded for score in scores) / len(scores)


def as_utc(value: datetime) -> datetime:
    """A datetime read back without a zone (from ClickHouse or a state file) is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _key(rule: Rule, row: dict[str, Any]) -> tuple:
    return tuple(row[name] for name in rule.scope)


def _grouped(rule: Rule, rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_key(rule, row), []).append(row)
    return groups


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
