"""Scores for model answers, shared by the evaluator (golden sets) and the monitor (live traffic).

Nothing here loads a generative model: perplexity needs the model under test and lives in the
evaluator. The embedding model for groundedness is loaded on first use (`Embedder`).
"""

from services.runtime.scoring.format import json_validity
from services.runtime.scoring.grounding import (
    Embedder,
    GroundednessScore,
    LazyEmbedder,
    fact_numbers,
    score_groundedness,
)
from services.runtime.scoring.judge import RUBRICS, Judge, JudgeResult, Rubric, judge_client, parse_judge_score
from services.runtime.scoring.safety import UnsafeFinding, scan_unsafe
from services.runtime.scoring.text import bleu, exact_match, normalize_answer, rouge_l, token_f1

__all__ = [
    "RUBRICS",
    "Embedder",
    "GroundednessScore",
    "Judge",
    "JudgeResult",
    "LazyEmbedder",
    "Rubric",
    "UnsafeFinding",
    "bleu",
    "exact_match",
    "fact_numbers",
    "json_validity",
    "judge_client",
    "normalize_answer",
    "parse_judge_score",
    "rouge_l",
    "scan_unsafe",
    "score_groundedness",
    "token_f1",
]
