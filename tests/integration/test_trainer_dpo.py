"""DPO on the real model with tiny step counts: it learns the preference, and it resumes from a checkpoint.

Eight pairs whose chosen answer is the documented answer to the question and whose rejected answer
is the documented answer to another question (plausible, wrong). One uninterrupted job of three
steps is shared by both tests: it is what the first test measures and what the second must match.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contracts.events import Hyperparameters
from services.trainer.data import pad, read_preference_jsonl, tokenize_preferences
from services.trainer.engine import TrainingJob, TrainingResult, train
from services.trainer.losses import dpo_loss, sequence_logprobs
from services.trainer.model import load_model, load_tokenizer
from tests.fixtures.trainer_model import DEMO_DATA, base_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

PAIRS = 8
HP = Hyperparameters(
    method="dpo",
    dpo_beta=0.1,
    rank=4,
    alpha=8,
    batch_size=4,
    epochs=1.5,
    max_seq_length=128,
    seed=7,
    learning_rate=2e-3,
)


@pytest.fixture(scope="module")
def preferences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    by_answer: dict[str, list[dict[str, str]]] = {}
    for line in (DEMO_DATA / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        by_answer.setdefault(messages[-1]["content"], messages[:-1])
    picked = list(by_answer.items())[:PAIRS]
    path = tmp_path_factory.mktemp("preferences") / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": prompt,
                    "chosen": answer,
                    "rejected": picked[(index + 1) % PAIRS][0],
                    "provenance": {"source": "test"},
                }
            )
            + "\n"
            for index, (answer, prompt) in enumerate(picked)
        )
    )
    return path


def dpo_job(
    model: Path,
    data: Path,
    work: Path,
    on_checkpoint: Callable[[int], None] | None = None,
    start_adapter: Path | None = None,
) -> TrainingJob:
    return TrainingJob(
        model_path=model,
        dataset_path=data,
        hyperparameters=HP,
        work_dir=work,
        checkpoint_every=2,
        on_checkpoint=on_checkpoint,
        start_adapter=start_adapter,
    )


@pytest.fixture(scope="module")
def uninterrupted(
    base_model_dir: Path,  # noqa: F811
    preferences: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainingResult:
    return train(dpo_job(base_model_dir, preferences, tmp_path_factory.mktemp("uninterrupted")))


def answer_logprobs(model_dir: Path, data: Path, adapter_dir: Path, *, adapter_on: bool = True) -> torch.Tensor:
    """Every pair's log-probabilities, chosen then rejected, under an adapter on the base model (or, with
    `adapter_on` False, the base model alone)."""
    from peft import PeftModel

    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(model_dir)
    pairs = tokenize_preferences(tokenizer, read_preference_jsonl(data), HP.max_seq_length)
    model = PeftModel.from_pretrained(load_model(model_dir, cpu), adapter_dir).eval()
    batch = pad([pair.chosen for pair in pairs] + [pair.rejected for pair in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        if adapter_on:
            return sequence_logprobs(model, batch, cpu)
        with model.disable_adapter():
            return sequence_logprobs(model, batch, cpu)


def rewards_on_the_pairs(model_dir: Path, data: Path, adapter_dir: Path) -> dict[str, dict[str, float]]:
    """DPO's implied rewards of every pair at the start (adapter off: the policy of step 0) and after training."""
    tuned = answer_logprobs(model_dir, data, adapter_dir)
    base = answer_logprobs(model_dir, data, adapter_dir, adapter_on=False)
    n = PAIRS
    measured = {}
    for name, policy in (("start", base), ("trained", tuned)):
        _, margins = dpo_loss(policy[:n], policy[n:], base[:n], base[n:], HP.dpo_beta)
        measured[name] = {
            "reward_accuracy": (margins > 0).float().mean().item(),
            "reward_margin": margins.mean().item(),
        }
    return measured


def test_a_few_dpo_steps_raise_the_reward_accuracy_and_margin_on_the_pairs_above_the_start(
    base_model_dir: Path,  # noqa: F811
    preferences: Path,
    uninterrupted: TrainingResult,
) -> None:
    measured = rewards_on_the_pairs(base_model_dir, preferences, uninterrupted.adapter_dir)
    start, trained = measured["start"], measured["trained"]
    print(f"DPO on {PAIRS} pairs, {uninterrupted.total_steps} steps: start {start} -> trained {trained}")
    print(f"losses {uninterrupted.losses}; metrics {uninterrupted.metrics}")
    # At the first step the policy is the reference (LoRA starts as a no-op): every margin is 0, the loss log 2.
    assert uninterrupted.losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert trained["reward_accuracy"] > start["reward_accuracy"]
    assert trained["reward_margin"] > start["reward_margin"]
    assert uninterrupted.metrics["reward_accuracy"] > start["reward_accuracy"]
    assert uninterrupted.metrics["reward_margin"] > start["reward_margin"]


class Crashed(Exception):
    """The worker died right after writing a checkpoint."""


def test_a_dpo_job_interrupted_after_a_checkpoint_resumes_from_it_and_ends_with_the_same_adapter(
    base_model_dir: Path,  # noqa: F811
    preferences: Path,
    uninterrupted: TrainingResult,
    tmp_path: Path,
) -> None:
    # The SFT test kills a subprocess; the checkpoint code is the same for both methods, so here the job
    # stops in-process at the moment after its step-2 checkpoint, which leaves the same files on disk.
    def crash(step: int) -> None:
        raise Crashed(step)

    work = tmp_path / "interrupted"
    with pytest.raises(Crashed):
        train(dpo_job(base_model_dir, preferences, work, on_checkpoint=crash))
    assert (work / "checkpoints" / "latest").read_text() == "step-00000002"
    assert not (work / "adapter").exists()

    resumed = train(dpo_job(base_model_dir, preferences, work))
    assert resumed.resumed_from_step == 2
    assert resumed.losses == uninterrupted.losses[2:]
    expected = load_file(str(uninterrupted.adapter_dir / "adapter_model.safetensors"))
    actual = load_file(str(work / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert resumed.metrics["reward_accuracy"] == uninterrupted.metrics["reward_accuracy"]
    assert resumed.metrics["reward_margin"] == uninterrupted.metrics["reward_margin"]
    assert not (work / "checkpoints").exists()


def test_dpo_from_a_starting_adapter_holds_the_policy_to_that_adapter_and_moves_past_it(
    base_model_dir: Path,  # noqa: F811
    preferences: Path,
    uninterrupted: TrainingResult,
    tmp_path: Path,
) -> None:
    # The three-step DPO adapter stands in for an SFT one: what matters is that it is not the base model.
    start = uninterrupted.adapter_dir
    continued = train(dpo_job(base_model_dir, preferences, tmp_path / "continued", start_adapter=start))

    n = PAIRS
    base = answer_logprobs(base_model_dir, preferences, start, adapter_on=False)
    starting = answer_logprobs(base_model_dir, preferences, start)
    after = answer_logprobs(base_model_dir, preferences, continued.adapter_dir)
    reference = torch.tensor(json.loads((tmp_path / "continued" / "reference.json").read_text())).T.reshape(-1)
    # The reference is the starting adapter, not the base model it was trained on.
    assert torch.allclose(reference, starting, atol=1e-3)
    assert (reference - base).abs().max().item() > 0.1
    _, margins = dpo_loss(after[:n], after[n:], starting[:n], starting[n:], HP.dpo_beta)
    print(f"continued from the adapter: losses {continued.losses}; margins over it {margins.tolist()}")
    assert margins.mean().item() > 0


def test_a_start_adapter_that_is_missing_or_of_another_shape_fails_the_job_with_its_reason(
    base_model_dir: Path,  # noqa: F811
    preferences: Path,
    uninterrupted: TrainingResult,
    tmp_path: Path,
) -> None:
    from services.trainer.engine import TrainingError

    job = dpo_job(base_model_dir, preferences, tmp_path / "job", start_adapter=tmp_path / "nowhere")
    with pytest.raises(TrainingError, match="no LoRA adapter to start from") as caught:
        train(job)
    assert caught.value.error_type == "invalid_input"
    assert not (tmp_path / "job" / "adapter").exists()

    other_shape = TrainingJob(
        model_path=base_model_dir,
        dataset_path=preferences,
        hyperparameters=HP.model_copy(update={"rank": 8}),
        work_dir=tmp_path / "other-shape",
        start_adapter=uninterrupted.adapter_dir,
    )
    with pytest.raises(TrainingError, match="has rank=4: ask for the same") as caught:
        train(other_shape)
    assert caught.value.error_type == "invalid_input"
