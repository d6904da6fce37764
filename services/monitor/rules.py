"""Declarative, versioned alert rules, loaded from YAML and checked when loaded.

A rule names a metric from METRICS (or `sql` with its own aggregate `query`), the scope it is
evaluated per (model, adapter version, prompt version), a window, optionally a baseline window just
before it, a comparator and threshold, a severity, a cooldown and the fewest samples that count as
data. A rule that cannot run is refused at load with the reason, not at the first tick at 3 a.m.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contracts.events import Severity

SCOPES = ("model_name", "adapter_version", "prompt_version")


@dataclass(frozen=True)
class Metric:
    """How a metric is computed: an SQL aggregate over the window's rows, or a Python scorer over a sample."""

    name: str
    description: str
    kind: Literal["sql", "psi", "embedding", "scored"]
    # sql: aggregate expression and the samples it rests on; psi and embedding: the column compared.
    expression: str = ""
    samples: str = "count()"
    quality: bool = False
    scorer: Literal["", "unsafe", "hallucination"] = ""


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(
            "latency_p95_ms", "95th percentile of end-to-end latency (ms)", "sql", "quantile(0.95)(latency_total_ms)"
        ),
        Metric("error_rate", "share of inferences with status error", "sql", "countIf(status = 'error') / count()"),
        Metric(
            "thumbs_down_rate",
            "thumbs down among thumbs given",
            "sql",
            "sum(thumbs_down) / sum(thumbs_given)",
            "sum(thumbs_given)",
            quality=True,
        ),
        Metric(
            "mean_rating",
            "mean 1-5 rating",
            "sql",
            "sum(rating_sum) / sum(ratings_given)",
            "sum(ratings_given)",
            quality=True,
        ),
        Metric(
            "prompt_length_psi", "PSI of prompt length (characters), window vs baseline", "psi", "length(input_text)"
        ),
        Metric("prompt_tokens_psi", "PSI of prompt token counts, window vs baseline", "psi", "prompt_tokens"),
        Metric(
            "output_length_psi",
            "PSI of answer token counts, window vs baseline (output drift)",
            "psi",
            "completion_tokens",
        ),
        Metric(
            "embedding_centroid_shift",
            "1 - cosine of the MiniLM centroids of the prompts, window vs baseline",
            "embedding",
            "input_text",
        ),
        Metric(
            "output_embedding_shift",
            "1 - cosine of the MiniLM centroids of the answers, window vs baseline",
            "embedding",
            "output_text",
        ),
        Metric(
            "unsafe_rate",
            "share of sampled answers flagged by the unsafe-content lexicon",
            "scored",
            "0",
            quality=True,
            scorer="unsafe",
        ),
        Metric(
            "hallucination_rate",
            "share of sampled answers not grounded in their prompt (MiniLM groundedness)",
            "scored",
            "0",
            quality=True,
            scorer="hallucination",
        ),
        Metric("sql", "a custom aggregate: the rule's `query`", "sql"),
    )
}

COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda value, threshold: value > threshold,
    ">=": lambda value, threshold: value >= threshold,
    "<": lambda value, threshold: value < threshold,
    "<=": lambda value, threshold: value <= threshold,
}


class RuleError(ValueError):
    """A rule that cannot be loaded, with the rule's name and the reason."""


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,99}$")
    version: int = Field(ge=1)
    metric: str
    comparator: Literal[">", ">=", "<", "<="] = ">"
    threshold: float
    # against_baseline: the value compared is (window - baseline), e.g. a thumbs-down rate 0.2 above last day's.
    mode: Literal["absolute", "against_baseline"] = "absolute"
    severity: Severity = Severity.warning
    scope: tuple[str, ...] = ("model_name", "adapter_version")
    window_s: int = Field(default=900, ge=10)
    baseline_window_s: int | None = Field(default=None, ge=10)
    cooldown_s: int = Field(default=3600, ge=0)
    min_samples: int = Field(default=20, ge=1)
    sample_size: int = Field(default=200, ge=1, le=5000, description="Rows a Python-scored metric looks at per window.")
    query: str | None = Field(
        default=None, description="Aggregate SQL for metric `sql`, over the columns of the monitored rows."
    )
    quality: bool | None = Field(
        default=None, description="Whether firing may trigger retraining; default: the metric's."
    )
    description: str = ""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
        return metric

    @field_validator("scope")
    @classmethod
    def _known_scope(cls, scope: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in scope if name not in SCOPES]
        if unknown or "model_name" not in scope:
            raise ValueError(f"scope must include model_name and be drawn from {', '.join(SCOPES)}; got {list(scope)}")
        return tuple(name for name in SCOPES if name in scope)

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        kind = METRICS[self.metric].kind
        if self.metric == "sql" and not self.query:
            raise ValueError("metric sql needs a `query` (an aggregate expression, e.g. avg(completion_tokens))")
        if self.metric != "sql" and self.query:
            raise ValueError(f"`query` is only for metric sql, not {self.metric}")
        if (kind in ("psi", "embedding") or self.mode == "against_baseline") and self.baseline_window_s is None:
            raise ValueError(f"{self.metric} in mode {self.mode} compares with a baseline: set baseline_window_s")
        return self

    @property
    def spec(self) -> Metric:
        return METRICS[self.metric]

    @property
    def expression(self) -> str:
        return self.query or self.spec.expression

    @property
    def is_quality(self) -> bool:
        return self.spec.quality if self.quality is None else self.quality

    @property
    def needs_baseline(self) -> bool:
        return self.baseline_window_s is not None and (
            self.mode == "against_baseline" or self.spec.kind in ("psi", "embedding")
        )

    def crosses(self, value: float) -> bool:
        return COMPARATORS[self.comparator](value, self.threshold)


QueryCheck = Callable[[Rule], None]


def parse_rules(documents: Iterable[dict[str, Any]], check_query: QueryCheck | None = None) -> list[Rule]:
    """Rules from parsed YAML mappings; RuleError names the first rule that cannot run and why."""
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, document in enumerate(documents):
        name = document.get("name", f"#{index + 1}") if isinstance(document, dict) else f"#{index + 1}"
        try:
            rule = Rule.model_validate(document)
        except ValidationError as error:
            reasons = "; ".join(
                f"{'.'.join(str(p) for p in problem['loc']) or 'rule'}: {problem['msg']}" for problem in error.errors()
            )
            raise RuleError(f"rule {name}: {reasons}") from None
        if rule.name in seen:
            raise RuleError(f"rule {rule.name}: defined twice")
        seen.add(rule.name)
        if check_query is not None:
            try:
                check_query(rule)
            except Exception as error:  # noqa: BLE001 - any engine refusal is the reason the rule is rejected
                raise RuleError(f"rule {rule.name}: query does not run: {error}") from None
        rules.append(rule)
    return rules


def load_rules(path: Path, check_query: QueryCheck | None = None) -> list[Rule]:
    """Rules from a YAML file (`rules: [...]`), each checked; `check_query` runs its SQL on an empty window."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise RuleError(f"{path}: cannot read rules: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("rules"), list):
        raise RuleError(f"{path}: expected a mapping with a `rules:` list")
    return parse_rules(document["rules"], check_query)


DEFAULT_RULES = Path(__file__).parent / "default_rules.yaml"
