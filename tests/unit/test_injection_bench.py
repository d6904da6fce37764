"""The injection bench's held-out sources: each source of benign prompts is scored by models fitted
without any of its prompts, which is what tells a kind of text the set never saw from one it learnt."""

from __future__ import annotations

import numpy as np
import pytest

from services.runtime.scoring.injection_set import ATTACK, BENIGN, LabelledPrompt
from services.serving.injection_bench import cross_validated, held_out_sources

pytestmark = pytest.mark.unit


def _prompt(index: int, wheel: str, attack: bool) -> LabelledPrompt:
    return LabelledPrompt(f"prompt {index}", attack, f"{wheel}:data.json", "MIT", ATTACK if attack else BENIGN)


def test_a_benign_source_that_looks_like_the_attacks_is_flagged_only_when_no_prompt_of_it_was_seen() -> None:
    rng = np.random.default_rng(3)
    attack_side, benign_side = np.eye(8)[0], np.eye(8)[1]
    prompts, words = [], []
    for index in range(60):  # the mixed source: attacks on one side, benign prompts on the other
        attack = index % 2 == 0
        prompts.append(_prompt(index, "mixed==1", attack))
        words.append((attack_side if attack else benign_side) + rng.normal(scale=0.05, size=8))
    for index in range(60, 90):  # a benign source near the attacks, but with a feature of its own
        prompts.append(_prompt(index, "lookalike==1", False))
        words.append(attack_side + 0.6 * np.eye(8)[2] + rng.normal(scale=0.05, size=8))
    features = np.asarray(words, dtype=np.float32)
    windows = np.zeros((len(prompts), 2, 4), dtype=np.float32)  # MiniLM uninformative: the word model decides

    held = held_out_sources(prompts, features, windows)
    folded = cross_validated(prompts, features, windows)

    assert list(held) == ["lookalike==1"], "a source that holds attacks cannot be held out whole"
    lookalike = held["lookalike==1"]
    assert lookalike.false_positives + lookalike.true_negatives == 30
    assert lookalike.false_positives == 30, "never seen, every one of them reads as an attack"
    in_folds = sum(verdict.injection for verdict in folded.verdicts[60:])
    assert in_folds < 5, "seen in the other folds, the classifier learnt the feature that tells them apart"
