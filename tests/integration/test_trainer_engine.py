"""The training engine on the real model with tiny step counts: determinism, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contracts.events import Hyperparameters
from services.trainer.engine import TrainingJob, train
from tests.fixtures.trainer_model import DEMO_DATA, base_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = {"rank": 4, "alpha": 8, "batch_size": 2, "epochs": 1, "max_seq_length": 128, "seed": 7, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("".join((DEMO_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:12]))
    return path


def run(model: Path, data: Path, work: Path, **overrides: object) -> list[float]:
    job = TrainingJob(
        model_path=model,
        dataset_path=data,
        hyperparameters=Hyperparameters(**{**TINY, **overrides}),
        work_dir=work,
        checkpoint_every=2,
    )
    return train(job).losses


def test_same_seed_and_data_give_the_same_loss_curve(base_model_dir: Path, tiny_dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    first = run(base_model_dir, tiny_dataset, tmp_path / "a", epochs=0.5)
    second = run(base_model_dir, tiny_dataset, tmp_path / "b", epochs=0.5)
    other_seed = run(base_model_dir, tiny_dataset, tmp_path / "c", epochs=0.5, seed=8)
    assert len(first) == 3
    assert first == second
    assert first != other_seed


CHILD = """
import sys
from pathlib import Path
from contracts.events import Hyperparameters
from services.trainer.engine import TrainingJob, train
model, data, work, hp = sys.argv[1:5]
train(TrainingJob(model_path=Path(model), dataset_path=Path(data), hyperparameters=Hyperparameters.model_validate_json(hp), work_dir=Path(work), checkpoint_every=2))
"""


def test_a_job_killed_with_sigkill_resumes_from_its_checkpoint_and_ends_with_the_same_adapter(
    base_model_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:  # noqa: F811
    reference = tmp_path / "uninterrupted"
    run(base_model_dir, tiny_dataset, reference)

    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(base_model_dir),
            str(tiny_dataset),
            str(killed),
            Hyperparameters(**TINY).model_dump_json(),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = killed / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 300
        while not (latest.exists() and latest.read_text() == "step-00000004"):
            assert child.poll() is None, "the training subprocess ended before its step-4 checkpoint"
            assert time.monotonic() < deadline, "no step-4 checkpoint within 300 s"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert not (killed / "adapter").exists()

    job = TrainingJob(
        model_path=base_model_dir,
        dataset_path=tiny_dataset,
        hyperparameters=Hyperparameters(**TINY),
        work_dir=killed,
        checkpoint_every=2,
    )
    resumed = train(job)
    assert resumed.resumed_from_step == 4
    assert len(resumed.losses) == resumed.total_steps - 4 == 2
    expected = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    actual = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert json.loads((reference / "result.json").read_text())["losses"][4:] == resumed.losses
    assert not (killed / "checkpoints").exists()
