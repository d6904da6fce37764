"""Metric suites: which scores an evaluation computes for every example of each target.

Each metric yields one value per example, or None: with an error recorded when it failed on that
example (the others still count, and the gate's error-rate rule sees it), without one when it does
not apply (format validity on a record that asks for no format).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.evaluator.generation import Generation
from services.evaluator.golden import GoldenExample
from services.runtime.scoring import (
    Embedder,
    Judge,
    bleu,
    exact_match,
    fact_numbers,
    json_validity,
    rouge_l,
    scan_unsafe,
    score_groundedness,
    token_f1,
)

REFERENCE_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "bleu": bleu,
    "rouge_l": rouge_l,
}
# Lower is better for these; the report and the guards read it from here.
LOWER_IS_BETTER = frozenset({"perplexity", "hallucination_rate", "unsafe_rate", "latency_ms", "output_tokens"})

SUITES: dict[str, tuple[str, ...]] = {
    "default": (
        *REFERENCE_METRICS,
        "fact_numbers",
        "perplexity",
        "format_validity",
        "groundedness",
        "hallucination_rate",
        "unsafe_rate",
        "latency_ms",
        "output_tokens",
    ),
    "fast": (*REFERENCE_METRICS, "fact_numbers", "format_validity", "unsafe_rate", "latency_ms", "output_tokens"),
}
SUITES["judge"] = (*SUITES["default"], "judge")


@dataclass
class TargetScores:
    """Per-metric, per-example scores of one target, aligned with the golden examples."""

    predictions: list[str]
    scores: dict[str, list[float | None]] = field(default_factory=dict)
    errors: dict[str, list[str | None]] = field(default_factory=dict)

    def put(self, metric: str, values: Sequence[float | None], errors: Sequence[str | None] | None = None) -> None:
        self.scores[metric] = list(values)
        self.errors[metric] = list(errors) if errors is not None else [None] * len(values)


def _each(
    metric: Callable[[str, str], float], predictions: Sequence[str], references: Sequence[str]
) -> tuple[list[float | None], list[str | None]]:
    values: list[float | None] = []
    errors: list[str | None] = []
    for prediction, reference in zip(predictions, references, strict=True):
        try:
            values.append(float(metric(prediction, reference)))
            errors.append(None)
        except Exception as error:  # noqa: BLE001 - recorded on the example; the rest of the set still counts
            values.append(None)
            errors.append(f"{type(error).__name__}: {error}")
    return values, errors


async def score_target(
    suite: Sequence[str],
    examples: Sequence[GoldenExample],
    generations: Sequence[Generation],
    *,
    perplexities: Sequence[float | None] | None = None,
    embedder: Embedder | None = None,
    judge: Judge | None = None,
    unsafe_extra: dict[str, list[str]] | None = None,
    judge_concurrency: int = 4,
) -> TargetScores:
    predictions = [generation.text for generation in generations]
    references = [example.reference for example in examples]
    out = TargetScores(predictions)
    for name, metric in REFERENCE_METRICS.items():
        if name in suite:
            out.put(name, *_each(metric, predictions, references))
    if "fact_numbers" in suite:
        out.put("fact_numbers", [fact_numbers(p, r) for p, r in zip(predictions, references, strict=True)])
    if "perplexity" in suite and perplexities is not None:
        out.put("perplexity", perplexities)
    if "format_validity" in suite:
        values, errors = [], []
        for example, prediction in zip(examples, predictions, strict=True):
            if example.schema is None:
                values.append(None)
                errors.append(None)
                continue
            try:
                values.append(json_validity(prediction, example.schema).score)
                errors.append(None)
            except Exception as error:  # noqa: BLE001 - an invalid schema is that record's error
                values.append(None)
                errors.append(f"{type(error).__name__}: {error}")
        out.put("format_validity", values, errors)
    if "groundedness" in suite or "hallucination_rate" in suite:
        if embedder is None:
            raise ValueError("the suite needs the sentence-embedding model for groundedness")
        grounded = await asyncio.to_thread(
            score_groundedness, predictions, [example.context for example in examples], embedder
        )
        out.put("groundedness", [g.score for g in grounded])
        out.put("hallucination_rate", [0.0 if g.grounded else 1.0 for g in grounded])
    if "unsafe_rate" in suite:
        out.put(
            "unsafe_rate",
            *_each(lambda prediction, _: scan_unsafe(prediction, unsafe_extra).score, predictions, references),
        )
    if "latency_ms" in suite:
        out.put("latency_ms", [generation.latency_ms for generation in generations])
    if "output_tokens" in suite:
        out.put("output_tokens", [float(generation.completion_tokens) for generation in generations])
    if "judge" in suite:
        if judge is None:
            raise ValueError(
                "the `judge` suite needs a judge endpoint: set FLYWHEEL_EVALUATOR_JUDGE_BASE_URL and _JUDGE_MODEL"
            )
        gate = asyncio.Semaphore(judge_concurrency)

        async def grade(example: GoldenExample, prediction: str):  # noqa: ANN202
            async with gate:
                return await judge.grade(question=example.question, answer=prediction, reference=example.reference)

        results = await asyncio.gather(*(grade(e, p) for e, p in zip(examples, predictions, strict=True)))
        # The rubric's version is in the name: scores from different rubric prompts are not comparable.
        out.put(
            f"judge_{judge.rubric.name}_v{judge.rubric.version}", [r.score for r in results], [r.error for r in results]
        )
    return out
