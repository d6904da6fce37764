"""sft_then_dpo on the real model with tiny step counts: one job, SFT then DPO from the SFT stage's adapter.

The chat records are the first four of the demo's; the pairs are test_trainer_dpo's eight. Dropout is off so
that DPO's first step sees a policy exactly equal to its reference (the SFT adapter): its loss is ln 2 there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contracts.events import DatasetRef, Hyperparameters, TrainingCompleted, TrainingProgress, TrainingRequested
from contracts.events import TrainingStarted
from services.runtime.artifacts import ArtifactStore
from services.trainer.engine import Progress, TrainingJob, TrainingPlan, train
from services.trainer.service import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore
from tests.fixtures.trainer_model import DEMO_DATA, base_model_dir  # noqa: F401 - fixture
from tests.integration.test_trainer_dpo import answer_logprobs, preferences  # noqa: F401 - fixture
from tests.integration.test_trainer_service import MODEL, DictCatalog, RecordingPublisher
from tests.support import eventually

pytestmark = pytest.mark.integration

HP = Hyperparameters(
    method="sft_then_dpo",
    rank=4,
    alpha=8,
    dropout=0.0,
    batch_size=4,
    epochs=1,
    max_seq_length=128,
    seed=3,
    learning_rate=2e-3,
    dpo_learning_rate=1e-4,
)


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join((DEMO_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:4]))
    return path


def test_sft_then_dpo_trains_dpo_from_the_sft_stages_adapter_held_to_it_and_counts_steps_across_both(
    base_model_dir: Path,  # noqa: F811
    chat: Path,
    preferences: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    plans: list[TrainingPlan] = []
    progress: list[Progress] = []
    work = tmp_path / "job"
    result = train(
        TrainingJob(
            model_path=base_model_dir,
            dataset_path=chat,
            preference_path=preferences,
            hyperparameters=HP,
            work_dir=work,
            on_start=plans.append,
            on_progress=progress.append,
        )
    )
    # 4 chat records and 8 pairs at 4 a step: 1 SFT step, then 2 DPO steps, counted as one job of 3.
    assert [plan.total_steps for plan in plans] == [3] and plans[0].resumed_from_step == 0
    assert [(p.stage, p.step, p.total_steps) for p in progress] == [("sft", 1, 3), ("dpo", 2, 3), ("dpo", 3, 3)]
    assert result.total_steps == 3 and len(result.losses) == 3
    assert result.adapter_dir == work / "dpo" / "adapter"
    # The DPO stage trains at its own, smaller rate: at SFT's it collapses (bench/results/preference-2026-12-07.md).
    dpo_rates = [p.learning_rate for p in progress if p.stage == "dpo"]
    assert 0 < dpo_rates[0] <= HP.dpo_learning_rate and max(dpo_rates) <= HP.dpo_learning_rate, dpo_rates
    # DPO starts from the SFT adapter and is held to it: at its first step policy == reference, the loss ln 2.
    assert result.losses[1] == pytest.approx(math.log(2), abs=1e-3)
    assert result.metrics["sft_final_loss"] == result.losses[0] and result.metrics["sft_total_steps"] == 1
    assert result.metrics["final_loss"] == result.losses[-1] == result.metrics["dpo_final_loss"]
    assert {"reward_accuracy", "reward_margin", "dpo_reward_accuracy"} <= result.metrics.keys()
    sft_adapter = work / "sft" / "adapter"
    reference = torch.tensor(json.loads((work / "dpo" / "reference.json").read_text())).T.reshape(-1)
    assert torch.allclose(reference, answer_logprobs(base_model_dir, preferences, sft_adapter), atol=1e-3)
    assert (reference - answer_logprobs(base_model_dir, preferences, sft_adapter, adapter_on=False)).abs().max() > 0.01
    sft_weights = load_file(str(sft_adapter / "adapter_model.safetensors"))
    final = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert sft_weights.keys() == final.keys()
    assert any(not torch.equal(sft_weights[name], final[name]) for name in final), "DPO moved past the SFT adapter"


async def test_a_job_paused_in_its_dpo_stage_resumes_there_without_training_sft_again(
    base_model_dir: Path,  # noqa: F811
    chat: Path,
    preferences: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    catalog = DictCatalog(base_model_dir, {("chat", 1): chat, ("pairs", 1): preferences})
    settings = TrainerSettings(progress_every=1, input_wait_s=0, checkpoint_every=100)

    def worker(publisher: RecordingPublisher) -> Trainer:
        return Trainer(
            JobStore(tmp_path / "jobs.db"),
            catalog,
            ArtifactStore(tmp_path / "artifacts"),
            publisher,
            work_root=tmp_path / "jobs",
            settings=settings,
        )

    # Two epochs at 2 a step: 4 records, 4 SFT steps; then 8 pairs, 8 DPO steps; 12 in all.
    hp = HP.model_copy(update={"batch_size": 2, "epochs": 2})
    sft_steps = 4
    first_events = RecordingPublisher()
    first = worker(first_events)
    first.submit(
        TrainingRequested(
            job_id="staged",
            model_name=MODEL,
            dataset=DatasetRef(name="chat", version=1),
            preference_dataset=DatasetRef(name="pairs", version=1),
            hyperparameters=hp,
            requested_by="test",
        )
    )
    assert first.get("staged").preference_dataset == DatasetRef(name="pairs", version=1)
    await first.start()
    await eventually(lambda: (first.get("staged").step or 0) > sft_steps, timeout_s=300, what="a step of the DPO stage")
    await first.stop()
    paused = first.get("staged")
    total = paused.total_steps
    assert total == sft_steps + 8
    assert paused.status == "running" and sft_steps < paused.step < total, paused
    stages = [event.stage for event in first_events.events if isinstance(event, TrainingProgress)]
    assert stages[:sft_steps] == ["sft"] * sft_steps and "dpo" in stages

    second_events = RecordingPublisher()
    second = worker(second_events)
    await second.start()
    try:
        await eventually(
            lambda: second.get("staged").status == "completed", timeout_s=300, what="the resumed job to complete"
        )
    finally:
        await second.stop()
    [started] = [event for event in second_events.events if isinstance(event, TrainingStarted)]
    assert started.total_steps == total and started.resumed_from_step > sft_steps, started
    resumed = [event for event in second_events.events if isinstance(event, TrainingProgress)]
    assert resumed and {event.stage for event in resumed} == {"dpo"}, "the SFT stage is not trained again"
    assert resumed[-1].step == total and resumed[0].step > sft_steps + 1
    completed = second_events.events[-1]
    assert isinstance(completed, TrainingCompleted)
    assert completed.dataset == DatasetRef(name="chat", version=1)
    assert completed.preference_dataset == DatasetRef(name="pairs", version=1)
    assert completed.hyperparameters.method == "sft_then_dpo"
    assert completed.metrics["resumed_from_step"] == started.resumed_from_step
    assert completed.metrics["total_steps"] == total and completed.metrics["sft_total_steps"] == sft_steps
    assert "reward_accuracy" in completed.metrics and "sft_final_loss" in completed.metrics
    assert second.get("staged").preference_dataset == DatasetRef(name="pairs", version=1)
