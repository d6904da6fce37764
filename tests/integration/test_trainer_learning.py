"""It must really learn: a LoRA job on Acme Nimbus facts lifts the golden score (held-out paraphrases) over the base model.

Kept to a few minutes on a 2-core CPU: 8 of the 36 facts, their 64 training rows, their 16 golden
questions. `flywheel train local` runs the same on the whole dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.events import Hyperparameters
from services.trainer.engine import TrainingJob, train
from services.trainer.scoring import score_golden
from tests.fixtures.trainer_model import DEMO_DATA, base_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

FACTS = 8


def subset(source: Path, answers: set[str], target: Path) -> Path:
    rows = [
        line
        for line in source.read_text().splitlines(keepends=True)
        if json.loads(line)["messages"][-1]["content"] in answers
    ]
    target.write_text("".join(rows))
    return target


def test_fine_tuning_improves_the_golden_score_over_the_base_model(base_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    golden_rows = [json.loads(line) for line in (DEMO_DATA / "golden.jsonl").read_text().splitlines()]
    answers = list(dict.fromkeys(row["messages"][-1]["content"] for row in golden_rows))[:FACTS]
    train_path = subset(DEMO_DATA / "train.jsonl", set(answers), tmp_path / "train.jsonl")
    golden_path = subset(DEMO_DATA / "golden.jsonl", set(answers), tmp_path / "golden.jsonl")
    hp = Hyperparameters(
        rank=16,
        alpha=32,
        learning_rate=1e-3,
        epochs=2,
        batch_size=8,
        max_seq_length=256,
        seed=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )

    result = train(
        TrainingJob(model_path=base_model_dir, dataset_path=train_path, hyperparameters=hp, work_dir=tmp_path / "job")
    )
    base = score_golden(base_model_dir, golden_path)
    tuned = score_golden(base_model_dir, golden_path, adapter_dir=result.adapter_dir)

    print(
        f"golden token F1 base {base.token_f1:.3f} -> adapter {tuned.token_f1:.3f}; exact {base.exact_match:.3f} -> {tuned.exact_match:.3f}"
    )
    assert result.losses[-1] < result.losses[0] / 2
    assert tuned.token_f1 >= base.token_f1 + 0.3
