"""Prompt-injection and jailbreak detection: phrase rules, then two classifiers, the cheap one first.

- rules: the phrases attacks are built on ("ignore the previous instructions", "do anything now",
  "developer mode", "reveal your system prompt", "without any restrictions", ...). They were written from
  the attack literature, not mined from the labelled set, and they read the whole text. A match decides;
- words: a logistic regression on the text's hashed words and word pairs (4096 buckets, log counts,
  unit length). About 0.1 ms a text. Where it is sure (a probability outside WORDS_SURE), it decides;
- meaning: a logistic regression on the all-MiniLM-L6-v2 embedding of the text's first and, for a long
  text, last 256 tokens (an attack may sit at either end). It catches paraphrased role-play jailbreaks
  no word list names. MiniLM runs with int8 matrix products on one thread (`screen_embedder`), because
  the screen runs beside the model's decode on the same cores: about 1.5 ms a short request, against
  4.2 ms in float32. It still reads only what the word model is unsure of.

Both classifiers are fitted on the labelled set (injection_set.py) by `flywheel guard train-injection`
and shipped as injection_model.json. `flywheel bench injection` prints precision and recall of each
stage and of the cascade on the labelled set, each prompt scored by models that did not see it
(5-fold cross-validation), and the share of prompts that reached MiniLM.

The logistic regressions are fitted here with numpy (Newton's method, L2 penalty): a few lines, where
scikit-learn would be a large dependency for two fits.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.runtime.scoring.grounding import Embedder

Vectors = NDArray[np.floating[Any]]
MODEL_PATH = Path(__file__).with_name("injection_model.json")
WINDOW_TOKENS = 256
WORD_BUCKETS = 1 << 12
# The word model decides below the first and above the second; between, MiniLM does.
WORDS_SURE = (0.05, 0.95)
_WORD = re.compile(r"[a-z0-9']+")

_ORDERS = r"(?:instructions?|rules|directions|guidelines|prompts?)"
_SAFEGUARDS = (
    r"(?:restrictions?|filters?|filtering|censorship|limitations?|guidelines|content polic(?:y|ies)|safeguards)"
)
# Each rule is a phrase that benign requests do not use: "ignore the typos in my previous message", "are
# there any restrictions on luggage", "show me how to write a system prompt" and "Dan" must not match
# (tests/unit/test_injection_detection.py holds such requests).
RULES: dict[str, re.Pattern[str]] = {
    "override": re.compile(
        rf"\b(?:ignore|disregard|forget|override|bypass)\b\W+(?:\w+\W+){{0,3}}?(?:previous|prior|above|preceding|earlier|all|any|your|the|my)\W+(?:\w+\W+){{0,2}}?{_ORDERS}\b",
        re.IGNORECASE,
    ),
    "new_persona": re.compile(
        r"\b(?:do anything now|developer mode|jailbr(?:eak|oken)\w*|stay in character|evil confidant|you are no longer (?:an? )?(?:ai|assistant|language model|chatgpt|bound))\b|🔓",
        re.IGNORECASE,
    ),
    "persona_name": re.compile(r"\b(?:DAN|STAN|DUDE|AIM|UCAR)\b"),  # case kept: "Dan" is a name
    "no_limits": re.compile(
        rf"\b(?:without|free (?:of|from)|not bound by|breaks? free (?:of|from)|ignor(?:e|es|ing))\s+(?:any|all)?\s*(?:of\s+)?(?:your|the|its|their|openai'?s?)?\s*(?:ethical|moral|safety|content)?\s*{_SAFEGUARDS}\b"
        r"|\b(?:no|any)\s+(?:ethical|moral)\s+(?:guidelines|restrictions|boundaries|limits|principles)\b",
        re.IGNORECASE,
    ),
    "prompt_leak": re.compile(
        r"\b(?:repeat|print|show|reveal|output|display|spell[- ]check|what (?:are|were))\b\W+(?:\w+\W+){0,3}?(?:your|the)\s+(?:system prompt|(?:initial|original|previous|hidden|secret) instructions|instructions you were given)\b",
        re.IGNORECASE,
    ),
}


def rule_hits(text: str) -> tuple[str, ...]:
    return tuple(name for name, rule in RULES.items() if rule.search(text))


@dataclass(frozen=True)
class LogisticModel:
    weights: Vectors
    bias: float
    threshold: float

    def probabilities(self, embeddings: Vectors) -> Vectors:
        scores: Vectors = 1.0 / (1.0 + np.exp(-(embeddings @ self.weights + self.bias)))
        return scores

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "bias": self.bias, "weights": [round(float(w), 6) for w in self.weights]}

    @classmethod
    def from_dict(cls, fitted: dict[str, Any]) -> LogisticModel:
        return cls(np.asarray(fitted["weights"], dtype=np.float32), float(fitted["bias"]), float(fitted["threshold"]))


@dataclass(frozen=True)
class InjectionModels:
    words: LogisticModel
    meaning: LogisticModel

    def to_json(self, **provenance: Any) -> str:
        # One number a line: a refit shows in a diff as the weights that moved.
        return (
            json.dumps({**provenance, "words": self.words.as_dict(), "meaning": self.meaning.as_dict()}, indent=0)
            + "\n"
        )

    @classmethod
    def load(cls, path: Path = MODEL_PATH) -> InjectionModels:
        fitted = json.loads(path.read_text())
        return cls(LogisticModel.from_dict(fitted["words"]), LogisticModel.from_dict(fitted["meaning"]))


def word_features(texts: Sequence[str]) -> Vectors:
    """Hashed words and word pairs of each text: log counts in WORD_BUCKETS buckets, unit length."""
    rows = np.zeros((len(texts), WORD_BUCKETS), dtype=np.float32)
    for index, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        for gram in (*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))):
            # crc32, not hash(): the buckets must be the same in every process
            rows[index, zlib.crc32(gram.encode()) & (WORD_BUCKETS - 1)] += 1.0
    np.log1p(rows, out=rows)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit: Vectors = rows / np.where(norms > 0, norms, 1.0)
    return unit


def fit_logistic(
    embeddings: Vectors, attack: Sequence[bool], *, penalty: float = 1.0, threshold: float = 0.5
) -> LogisticModel:
    """L2-penalised logistic regression by Newton's method; the two classes weigh the same in total."""
    x = np.hstack([embeddings.astype(np.float64), np.ones((len(embeddings), 1))])
    y = np.asarray(attack, dtype=np.float64)
    positives = max(float(y.sum()), 1.0)
    negatives = max(float(len(y) - y.sum()), 1.0)
    sample_weight = np.where(y == 1.0, len(y) / (2 * positives), len(y) / (2 * negatives))
    ridge = penalty * np.eye(x.shape[1])
    ridge[-1, -1] = 0.0  # the bias is not penalised
    beta = np.zeros(x.shape[1])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        gradient = x.T @ (sample_weight * (p - y)) + ridge @ beta
        hessian = (x * (sample_weight * p * (1 - p))[:, None]).T @ x + ridge
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return LogisticModel(beta[:-1].astype(np.float32), float(beta[-1]), threshold)


@dataclass(frozen=True)
class InjectionScore:
    """The verdict on one text: the stage that decided (rules, words, meaning) and its probability."""

    injection: bool
    stage: str
    probability: float
    rules: tuple[str, ...] = ()


def cascade(rules: tuple[str, ...], words_p: float, meaning_p: float | None, models: InjectionModels) -> InjectionScore:
    """The detector's decision from its stages' outputs (`meaning_p` None: MiniLM was not asked)."""
    if rules:
        return InjectionScore(True, "rules", max(words_p, meaning_p or 0.0), rules)
    low, high = WORDS_SURE
    if meaning_p is None or not low < words_p < high:
        return InjectionScore(words_p >= models.words.threshold, "words", words_p)
    return InjectionScore(meaning_p >= models.meaning.threshold, "meaning", meaning_p)


def needs_meaning(rules: tuple[str, ...], words_p: float) -> bool:
    return not rules and WORDS_SURE[0] < words_p < WORDS_SURE[1]


def screen_embedder(*, remembered: int = 4096) -> Embedder:
    """The MiniLM the meaning classifier was fitted on, and reads with: int8, one thread (see Embedder)."""
    return Embedder(max_length=WINDOW_TOKENS, quantized=True, threads=1, remembered=remembered)


class InjectionDetector:
    """Scores texts; MiniLM and the weights load on first use, and the detector is thread-safe."""

    def __init__(self, embedder: Embedder | None = None, models: InjectionModels | None = None) -> None:
        self.embedder = embedder or screen_embedder()
        self._models = models

    @property
    def models(self) -> InjectionModels:
        if self._models is None:
            self._models = InjectionModels.load()
        return self._models

    @staticmethod
    def rules_match(text: str) -> bool:
        return bool(rule_hits(text))

    def warm(self) -> None:
        """Load the weights and MiniLM now, so that the first unsure request does not wait for them."""
        self.meaning_probabilities(["warm up"])

    def windows(self, texts: Sequence[str]) -> Vectors:
        """Per text, the embeddings of its head and tail windows (the same window twice for a short text)."""
        heads, tails = [], []
        for text in texts:
            words = text.split()
            # A MiniLM token is about 0.75 words of English; a text of fewer words fits one window.
            limit = math.floor(WINDOW_TOKENS * 0.75)
            heads.append(text or " ")
            tails.append(" ".join(words[-limit:]) if len(words) > limit else None)
        distinct = [*heads, *(tail for tail in tails if tail is not None)]
        embedded = self.embedder.encode(distinct).numpy()
        head_rows = embedded[: len(heads)]
        tail_rows = head_rows.copy()
        cursor = len(heads)
        for index, tail in enumerate(tails):
            if tail is not None:
                tail_rows[index] = embedded[cursor]
                cursor += 1
        return np.stack([head_rows, tail_rows], axis=1)

    def meaning_probabilities(self, texts: Sequence[str]) -> list[float]:
        windows = self.windows(texts)
        flat = self.models.meaning.probabilities(windows.reshape(-1, windows.shape[-1]))
        return [float(p) for p in flat.reshape(len(texts), 2).max(axis=1)]

    def _cheap_stages(self, texts: Sequence[str]) -> tuple[list[tuple[str, ...]], list[float]]:
        """Each text's rule matches and word-model probability."""
        rules = [rule_hits(text) for text in texts]
        return rules, [float(p) for p in self.models.words.probabilities(word_features(texts))]

    def quick(self, texts: Sequence[str]) -> list[InjectionScore] | None:
        """The verdicts when the rules and the word model decide every text (a fraction of a millisecond,
        fit for the event loop); None when one of them needs MiniLM: then `score`, off the loop."""
        rules, words = self._cheap_stages(texts)
        if any(needs_meaning(r, w) for r, w in zip(rules, words, strict=True)):
            return None
        return [cascade(r, w, None, self.models) for r, w in zip(rules, words, strict=True)]

    def score(self, texts: Sequence[str]) -> list[InjectionScore]:
        if not texts:
            return []
        rules, words = self._cheap_stages(texts)
        unsure = [index for index in range(len(texts)) if needs_meaning(rules[index], words[index])]
        meaning: list[float | None] = [None] * len(texts)
        if unsure:
            for index, probability in zip(
                unsure, self.meaning_probabilities([texts[index] for index in unsure]), strict=True
            ):
                meaning[index] = probability
        return [cascade(r, w, m, self.models) for r, w, m in zip(rules, words, meaning, strict=True)]
