"""Declarative, versioned alert rules, loaded from YAML and checked when loaded.

A rule names a metric from METRICS (or `sql` with its own aggregate `query`), the scope it is
evaluated per (model, adapter version, prompt version), a window, optionally a baseline window just
before it, a comparator and threshold, a severity, a cooldown and the fewest samples that count as
data. A rule whose metric is about spans (latency, errors, cost of one step of a pipeline) says which
spans with `spans:` (kind, name or name prefix, service) instead of being evaluated per model version.
A rule that cannot run is refused at load with the reason, not at the first tick at 3 a.m.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contracts.events import Severity, SpanSelector

SCOPES = ("model_name", "adapter_version", "prompt_version")
# Spans carry no adapter or prompt version a rule could be split by reliably (only spans through the
# gateway name an adapter), so a span rule judges its spans together or per model they name.
SPAN_SCOPES = ("model_name",)


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
    # What a row of the window is: an inference (with its feedback) or a span the rule's selector picks.
    source: Literal["inference", "span"] = "inference"


_GUARDED = "countIf(guard_input_outcome IS NOT NULL OR guard_output_outcome IS NOT NULL)"
_FOUND = "('flagged', 'redacted', 'blocked')"


def _span_metric(name: str, description: str, expression: str, samples: str = "count()") -> Metric:
    return Metric(name, description, "sql", expression, samples, source="span")


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(
            "latency_p95_ms", "95th percentile of end-to-end latency (ms)", "sql", "quantile(0.95)(latency_total_ms)"
        ),
        Metric("error_rate", "share of inferences with status error", "sql", "countIf(status = 'error') / count()"),
        # Over the calls a gateway guard checked (input, output or both): with the guards off there is nothing to rate.
        Metric(
            "guard_block_rate",
            "share of guarded calls whose request or answer a guard blocked",
            "sql",
            f"countIf(guard_input_outcome = 'blocked' OR guard_output_outcome = 'blocked') / {_GUARDED}",
            _GUARDED,
        ),
        Metric(
            "guard_finding_rate",
            "share of guarded calls in which a guard found secrets or personal data",
            "sql",
            f"countIf(guard_input_outcome IN {_FOUND} OR guard_output_outcome IN {_FOUND}) / {_GUARDED}",
            _GUARDED,
        ),
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
        # Over the calls that carry it (serving logs it with every generated answer; cache replays and errors have none).
        Metric(
            "mean_token_logprob",
            "the model's confidence: mean over the answers of their mean token log-probability (falls when traffic "
            "moves to what the model does not know)",
            "sql",
            "avg(mean_token_logprob)",
            "count(mean_token_logprob)",
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
        _span_metric("span_latency_p50_ms", "median span duration (ms)", "quantile(0.5)(duration_ms)"),
        _span_metric("span_latency_p95_ms", "95th percentile of span duration (ms)", "quantile(0.95)(duration_ms)"),
        _span_metric("span_latency_p99_ms", "99th percentile of span duration (ms)", "quantile(0.99)(duration_ms)"),
        _span_metric("span_error_rate", "share of spans with status error", "countIf(status = 'error') / count()"),
        # Cost rests on the spans that reported one: spans without a cost are neither free nor data.
        _span_metric("span_cost_usd_sum", "total reported cost of the spans (USD)", "sum(cost_usd)", "count(cost_usd)"),
        _span_metric("span_cost_usd_mean", "mean reported cost per span (USD)", "avg(cost_usd)", "count(cost_usd)"),
        _span_metric(
            "span_tokens_sum", "prompt plus completion tokens of the spans", "sum(prompt_tokens + completion_tokens)"
        ),
    )
}
SPAN_METRICS = tuple(name for name, metric in METRICS.items() if metric.source == "span")

COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda value, threshold: value > threshold,
    ">=": lambda value, threshold: value >= threshold,
    "<": lambda value, threshold: value < threshold,
    "<=": lambda value, threshold: value <= threshold,
}


class RuleError(ValueError):
    """A rule that cannot be loaded, with the rule's name and the reason."""


class RuleSpanSelector(SpanSelector):
    """The contract's span selector, strict about its keys in a rules file: a misspelt `nmae:` would
    otherwise widen the rule to every span."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,99}$")
    version: int = Field(ge=1)
    metric: str
    spans: RuleSpanSelector | None = Field(
        default=None, description="For a span metric: which spans (kind, name or `prefix*`, service); {} for all."
    )
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

    @model_validator(mode="before")
    @classmethod
    def _span_rules_judge_their_spans_together(cls, document: Any) -> Any:
        # The inference default (per model and adapter version) names columns a span rule is not split by.
        if isinstance(document, dict) and document.get("spans") is not None and "scope" not in document:
            return {**document, "scope": []}
        return document

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
        if unknown:
            raise ValueError(f"scope must be drawn from {', '.join(SCOPES)}; got {list(scope)}")
        return tuple(name for name in SCOPES if name in scope)

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        spec = METRICS[self.metric]
        kind = spec.kind
        if spec.source == "span" and self.spans is None:
            raise ValueError(
                f"metric {self.metric} is about spans: say which with `spans:` (kind, name, service; {{}} for all spans)"
            )
        if spec.source == "inference" and self.spans is not None:
            raise ValueError(
                f"`spans:` is only for span metrics ({', '.join(SPAN_METRICS)}), not {self.metric}, which is about inferences"
            )
        if self.spans is not None:
            if any(name not in SPAN_SCOPES for name in self.scope):
                raise ValueError(
                    f"a span rule's scope is [] (its spans together) or [model_name] (per model they name); got {list(self.scope)}"
                )
            if self.quality:
                raise ValueError(
                    "a span rule cannot be a quality rule: retraining needs a model version, spans name none"
                )
        elif "model_name" not in self.scope:
            raise ValueError(
                f"scope must include model_name and be drawn from {', '.join(SCOPES)}; got {list(self.scope)}"
            )
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
