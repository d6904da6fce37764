"""The issue's must-show: on the demo data, an adapter the trainer fine-tuned passes the gate against
the base model, and a deliberately broken one (trained on shuffled answers) fails it, with the
statistics in the report. Real SmolLM2-135M on the CPU, the trainer's learning-test recipe (8 facts,
64 training rows, 16 held-out golden paraphrases). Training both adapters takes 10-40 minutes on a
shared 2-core CPU; they are cached (FLYWHEEL_CACHE/e2e), and the evaluations take about 5 more.

No policy is declared: the evaluator's default (`auto`) applies facts@v1 because the demo's golden
references state numbers. Under default@v1 the shuffled adapter passes too (its fluent, wrong-fact
answers beat the base model on token F1 and groundedness), see gate.py."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from contracts.events import DatasetRef, EvaluationRequested, Hyperparameters, ModelTarget
from services.evaluator.store import DatasetPointer
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.scoring import Embedder
from services.trainer.engine import TrainingJob, train
from tests.evaluator_support import evaluator_for
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.fixtures.trainer_model import DEMO_DATA, base_model_dir  # noqa: F401 - fixture

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

FACTS = 8
MODEL = "smollm2-135m-instruct"
HP = Hyperparameters(
    rank=16,
    alpha=32,
    learning_rate=1e-3,
    epochs=2,
    batch_size=8,
    max_seq_length=256,
    seed=0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)


def _rows(path: Path, answers: set[str]) -> list[dict]:
    return [row for row in map(json.loads, path.read_text().splitlines()) if row["messages"][-1]["content"] in answers]


def _shuffled(rows: list[dict]) -> list[dict]:
    """Every row gets the answer of another fact: the questions stay, what is learned is wrong."""
    answers = list(dict.fromkeys(row["messages"][-1]["content"] for row in rows))
    wrong = dict(zip(answers, answers[1:] + answers[:1], strict=True))
    out = []
    for row in rows:
        messages = [dict(message) for message in row["messages"]]
        messages[-1]["content"] = wrong[messages[-1]["content"]]
        out.append({"messages": messages})
    random.Random(0).shuffle(out)
    return out


def _trained(base_model_dir: Path, rows: list[dict], tmp_path: Path, name: str) -> Path:
    """Train (or reuse) an adapter; jobs live in FLYWHEEL_CACHE keyed by their data and hyperparameters,
    and the trainer returns a finished job's adapter without training again."""
    data = "".join(json.dumps(row) + "\n" for row in rows)
    key = hashlib.sha256((data + HP.model_dump_json()).encode()).hexdigest()[:16]
    dataset = tmp_path / f"{name}.jsonl"
    dataset.write_text(data)
    cache = (
        Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel")) / "e2e" / f"evaluator-{name}-{key}"
    )
    return train(
        TrainingJob(model_path=base_model_dir, dataset_path=dataset, hyperparameters=HP, work_dir=cache)
    ).adapter_dir


async def test_a_trained_adapter_passes_the_gate_and_a_broken_one_fails(
    base_model_dir: Path,
    tmp_path: Path,
    chdb_target: ClickHouseTarget,  # noqa: F811
) -> None:
    golden_rows = [json.loads(line) for line in (DEMO_DATA / "golden.jsonl").read_text().splitlines()]
    answers = set(list(dict.fromkeys(row["messages"][-1]["content"] for row in golden_rows))[:FACTS])
    train_rows = _rows(DEMO_DATA / "train.jsonl", answers)
    golden = "".join(json.dumps(row) + "\n" for row in _rows(DEMO_DATA / "golden.jsonl", answers))

    good = _trained(base_model_dir, train_rows, tmp_path, "trained")
    broken = _trained(base_model_dir, _shuffled(train_rows), tmp_path, "shuffled")

    clickhouse: ClickHouseStore = chdb_target.open()
    clickhouse.migrate()
    evaluator = evaluator_for(tmp_path / "home", clickhouse, Embedder(), max_tokens=40, batch_size=8, resamples=2000)
    artifacts, store = evaluator.artifacts, evaluator.store
    base = artifacts.put_directory(base_model_dir)
    store.remember_model(MODEL, base.uri, base.sha256)
    for version, adapter_dir in ((1, good), (2, broken)):
        ref = artifacts.put_directory(adapter_dir)
        store.remember_adapter(MODEL, version, ref.uri, ref.sha256)
    dataset = artifacts.put_bytes(golden.encode(), kind="jsonl")
    store.remember_dataset(DatasetPointer("acme-golden", 1, "golden", dataset.uri, dataset.sha256, MODEL))

    verdicts = {}
    for version in (1, 2):
        verdicts[version] = await evaluator.run(
            EvaluationRequested(
                evaluation_id=f"must-show-v{version}",
                candidate=ModelTarget(model_name=MODEL, adapter_version=version),
                golden=DatasetRef(name="acme-golden", version=1),
                requested_by="test",
            )
        )
        print(f"\nadapter v{version}: passed={verdicts[version].passed}", *verdicts[version].reasons, sep="\n  ")

    trained, shuffled = verdicts[1], verdicts[2]
    assert trained.status == shuffled.status == "completed"
    assert trained.baseline == ModelTarget(model_name=MODEL)
    for result in (trained, shuffled):
        assert result.gate_policy == "facts@v1" and result.reasons[-1].startswith("POLICY facts@v1 (auto: "), (
            result.reasons
        )
    assert trained.passed, trained.reasons
    assert not shuffled.passed, shuffled.reasons
    for result in (trained, shuffled):
        report = (tmp_path / "home" / "reports" / f"evaluation-{result.evaluation_id}.html").read_text()
        assert "95% CI (paired bootstrap)" in report and report.count("<svg") == 2
        assert all(reason.split(":")[0] in report for reason in result.reasons)
