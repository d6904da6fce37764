"""The training use case without Kafka or HTTP: base model + JSONL + hyperparameters -> LoRA adapter directory.

`method` picks the records and the objective (services/trainer/losses.py): chat records and next-token
loss on answers (sft), or preference records and DPO (dpo). Everything else, the loop, checkpoints,
resume and progress, is one code path for both, on the CPU and on CUDA. sft_then_dpo runs that path
twice (`_train_in_stages`): SFT in work_dir/sft, then DPO in work_dir/dpo from the SFT stage's adapter,
each stage with its own checkpoints, so a job stopped in the DPO stage resumes there.

Determinism: the data order of each epoch is a function of (seed, epoch), LoRA initialisation and
dropout draw from torch's generator seeded with `seed`, and a checkpoint holds that generator's
state, so a job resumed from step k continues exactly as the uninterrupted job would have.

A checkpoint (every `checkpoint_every` steps) holds the adapter weights (safetensors), optimiser
and scheduler state and the RNG state; the data position is the step number itself. It is written
into a temporary directory and renamed into place, then `latest` is replaced, so a SIGKILL at any
moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from contracts.events import Hyperparameters
from services.runtime.cpu import use_free_cpus
from services.runtime.peft_compat import ignore_peft_deprecation
from services.trainer.data import (
    InvalidDataset,
    epoch_order,
    pack,
    read_chat_jsonl,
    read_preference_jsonl,
    tokenize_dataset,
    tokenize_preferences,
)
from services.trainer.losses import ReferencedPair, StepLoss, assistant_loss, preference_loss, reference_logprobs
from services.trainer.model import load_model, load_tokenizer, pick_device

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class TrainingPaused(Exception):
    """The worker is stopping: the job saved where it was and resumes from there at the next start."""

    def __init__(self, step: int) -> None:
        super().__init__(f"paused at step {step}")
        self.step = step


class TrainingError(Exception):
    """A job that cannot finish; `error_type` is the machine-readable class of training.failed."""

    def __init__(self, error_type: str, reason: str) -> None:
        super().__init__(reason)
        self.error_type = error_type
        self.reason = reason


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    # sft_then_dpo: which stage the step belongs to (step and total_steps count across both); None for one stage.
    stage: str | None = None


@dataclass(frozen=True)
class TrainingPlan:
    total_steps: int
    resumed_from_step: int
    device: str


@dataclass(frozen=True)
class TrainingResult:
    adapter_dir: Path
    total_steps: int
    resumed_from_step: int
    losses: list[float]
    metrics: dict[str, float]


@dataclass
class TrainingJob:
    """What to train and where to keep its state; `work_dir` survives restarts (checkpoints live there)."""

    model_path: Path
    dataset_path: Path
    hyperparameters: Hyperparameters
    work_dir: Path
    checkpoint_every: int = 20
    log_every: int = 1
    warmup_ratio: float = 0.05
    # torch CPU threads; 0: the cores other processes leave free when the job starts (services/runtime/cpu.py).
    threads: int = 0
    keep_checkpoints: int = 2
    # An adapter to go on training (the hyperparameters must state its rank, alpha, dropout and target
    # modules); for DPO also the reference the policy is held to, e.g. an SFT adapter's.
    start_adapter: Path | None = None
    # sft_then_dpo only: the preference records of the DPO stage (dataset_path holds the SFT stage's chat records).
    preference_path: Path | None = None
    on_start: Callable[[TrainingPlan], None] | None = None
    on_progress: Callable[[Progress], None] | None = None
    on_checkpoint: Callable[[int], None] | None = None
    should_cancel: Callable[[], bool] = field(default=lambda: False)
    should_pause: Callable[[], bool] = field(default=lambda: False)

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.work_dir / "adapter"


def train(job: TrainingJob) -> TrainingResult:
    """Run (or resume) one job to completion; raises TrainingError with a reason a user can act on."""
    try:
        return _train(job)
    except TrainingError:
        raise
    except InvalidDataset as error:
        raise TrainingError("invalid_input", str(error)) from error
    except (torch.OutOfMemoryError, MemoryError) as error:
        hp = job.hyperparameters
        raise TrainingError(
            "out_of_memory",
            f"out of memory with batch_size={hp.batch_size}, max_seq_length={hp.max_seq_length}, rank={hp.rank}: "
            f"lower batch_size or max_seq_length ({type(error).__name__})",
        ) from error


def _train(job: TrainingJob) -> TrainingResult:
    if job.hyperparameters.method == "sft_then_dpo":
        return _train_in_stages(job)
    finished = _finished(job)
    if finished is not None:
        return finished
    hp = job.hyperparameters
    device = pick_device()
    if device.type == "cpu":
        use_free_cpus(job.threads)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    # The records are read before the model: a malformed dataset is reported without loading weights.
    records = _records(job)
    tokenizer = _tokenizer(job)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples, step_loss = _objective(tokenizer, records, hp, pad_id, device)
    steps_per_epoch = math.ceil(len(examples) / hp.batch_size)
    total_steps = _total_steps(len(examples), hp)

    torch.manual_seed(hp.seed)
    model = _lora_model(load_model(job.model_path, device), hp, job.start_adapter)
    if hp.method == "dpo":
        examples = _referenced(job, model, examples, pad_id, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=0.0)
    warmup = max(1, int(total_steps * job.warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, total_steps))

    start_step = _restore(job, model, optimizer, scheduler)
    if job.on_start:
        job.on_start(TrainingPlan(total_steps=total_steps, resumed_from_step=start_step, device=str(device)))

    model.train()
    losses: list[float] = []
    # DPO's per-pair margins of the current logging interval, and of the last one finished (reported in the metrics).
    margins: list[torch.Tensor] = []
    final_margins: list[torch.Tensor] = []
    tokens_seen = 0  # real tokens, prompt and answer, no padding
    reported = 0
    began = time.perf_counter()
    for step in range(start_step, total_steps):
        if job.should_cancel():
            raise TrainingError("cancelled", f"cancelled at step {step} of {total_steps}")
        if job.should_pause():
            if step > start_step and step % job.checkpoint_every != 0:
                _save_checkpoint(job, step, model, optimizer, scheduler)
            raise TrainingPaused(step)
        outcome = step_loss(model, _batch_for(step, examples, hp, steps_per_epoch))
        outcome.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(outcome.loss.item())
        if outcome.margins is not None:
            margins.append(outcome.margins)
        tokens_seen += outcome.tokens
        done = step + 1
        if done % job.checkpoint_every == 0 and done < total_steps:
            _save_checkpoint(job, done, model, optimizer, scheduler)
            if job.on_checkpoint:
                job.on_checkpoint(done)
        if done % job.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - began
            steps_here = done - start_step
            if job.on_progress:
                job.on_progress(
                    Progress(
                        step=done,
                        total_steps=total_steps,
                        epoch=done / steps_per_epoch,
                        loss=sum(losses[reported:]) / len(losses[reported:]),
                        learning_rate=scheduler.get_last_lr()[0],
                        tokens_per_second=tokens_seen / elapsed if elapsed > 0 else 0.0,
                        eta_seconds=elapsed / steps_here * (total_steps - done),
                    )
                )
            reported = len(losses)
            final_margins, margins = margins, []
    duration = time.perf_counter() - began
    result = TrainingResult(
        adapter_dir=job.adapter_dir,
        total_steps=total_steps,
        resumed_from_step=start_step,
        losses=losses,
        metrics={
            "final_loss": losses[-1] if losses else float("nan"),
            "duration_s": duration,
            "tokens_per_second": tokens_seen / duration if duration > 0 else 0.0,
            "total_steps": float(total_steps),
            "resumed_from_step": float(start_step),
            "examples": float(len(examples)),
            **_reward_metrics(final_margins),
        },
    )
    # The result goes down before the adapter is renamed into place: an adapter directory implies a result.
    _write_atomically(
        job.work_dir / "result.json",
        json.dumps(
            {"total_steps": total_steps, "resumed_from_step": start_step, "losses": losses, "metrics": result.metrics}
        ),
    )
    _save_adapter(model, job.adapter_dir)
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    return result


def _records(job: TrainingJob) -> list[Any]:
    if job.hyperparameters.method == "dpo":
        return read_preference_jsonl(job.dataset_path)
    return read_chat_jsonl(job.dataset_path)


def _tokenizer(job: TrainingJob) -> Any:
    try:
        return load_tokenizer(job.model_path)
    except (OSError, ValueError) as error:
        raise TrainingError("invalid_input", f"cannot load the base model at {job.model_path}: {error}") from error


def _total_steps(examples: int, hp: Hyperparameters) -> int:
    return max(1, round(math.ceil(examples / hp.batch_size) * hp.epochs))


def _planned_steps(job: TrainingJob) -> int:
    """The steps a one-stage job will take, from its records alone (no weights loaded); reads, and so checks, them."""
    hp = job.hyperparameters
    tokenizer = _tokenizer(job)
    records = _records(job)
    if hp.method == "dpo":
        return _total_steps(len(tokenize_preferences(tokenizer, records, hp.max_seq_length)), hp)
    return _total_steps(len(tokenize_dataset(tokenizer, records, hp.max_seq_length)), hp)


def _train_in_stages(job: TrainingJob) -> TrainingResult:
    """sft_then_dpo: SFT on the chat records, then DPO on the preference records from the SFT stage's adapter.

    DPO holds the policy to its reference; the reference here is the SFT stage's adapter, not the base model, so
    DPO refines what SFT taught (its loss starts at ln 2, policy == reference) instead of pulling back from it.
    Each stage keeps its own work directory: a finished stage is found there and not trained again. Steps count
    across both stages; on_start is called once, by whichever stage this run begins in.
    """
    if job.preference_path is None:
        raise TrainingError("invalid_input", "sft_then_dpo needs a preference dataset for its DPO stage")
    hp = job.hyperparameters
    sft = replace(
        job,
        hyperparameters=hp.model_copy(update={"method": "sft"}),
        work_dir=job.work_dir / "sft",
        preference_path=None,
    )
    dpo = replace(
        job,
        dataset_path=job.preference_path,
        hyperparameters=hp.model_copy(update={"method": "dpo", "learning_rate": hp.dpo_learning_rate}),
        work_dir=job.work_dir / "dpo",
        start_adapter=sft.adapter_dir,
        preference_path=None,
    )
    done = _finished(dpo)
    if done is not None:
        # Trained before a worker died unreported: nothing runs again; the DPO stage's run is the last one known.
        sft_done = _finished(sft)
        return _combined(sft_done, done, (sft_done.total_steps if sft_done else 0) + done.resumed_from_step)
    # Both datasets are read before any training: a malformed preference dataset fails the job before SFT runs.
    sft_steps, dpo_steps = _planned_steps(sft), _planned_steps(dpo)
    total = sft_steps + dpo_steps
    # Where this run began, across both stages: set by the first stage that starts training in it.
    began: list[int] = []
    seconds_per_step = [0.0]

    def staged(name: str, offset: int) -> dict[str, Any]:
        def on_start(plan: TrainingPlan) -> None:
            if not began:
                began.append(offset + plan.resumed_from_step)
                if job.on_start:
                    job.on_start(replace(plan, total_steps=total, resumed_from_step=began[0]))

        def on_progress(progress: Progress) -> None:
            left_in_stage = progress.total_steps - progress.step
            if left_in_stage:
                seconds_per_step[0] = progress.eta_seconds / left_in_stage
            # The SFT stage's estimate covers its own steps; the DPO stage's are guessed at the SFT pace until it runs.
            later = dpo_steps * seconds_per_step[0] if name == "sft" else 0.0
            if job.on_progress:
                job.on_progress(
                    replace(
                        progress,
                        step=offset + progress.step,
                        total_steps=total,
                        stage=name,
                        eta_seconds=progress.eta_seconds + later,
                    )
                )

        def on_checkpoint(step: int) -> None:
            if job.on_checkpoint:
                job.on_checkpoint(offset + step)

        return {"on_start": on_start, "on_progress": on_progress, "on_checkpoint": on_checkpoint}

    sft_result = _train(replace(sft, **staged("sft", 0)))
    try:
        dpo_result = _train(replace(dpo, **staged("dpo", sft_result.total_steps)))
    except TrainingPaused as paused:
        raise TrainingPaused(sft_result.total_steps + paused.step) from None
    return _combined(sft_result, dpo_result, began[0] if began else sft_result.total_steps)


def _combined(sft: TrainingResult | None, dpo: TrainingResult | None, resumed_from_step: int) -> TrainingResult:
    """One result of both stages: the DPO stage's adapter and metrics, and each stage's own under its prefix."""
    if sft is None or dpo is None:
        raise TrainingError("internal", "a stage of the sft_then_dpo job left no result")
    total = sft.total_steps + dpo.total_steps
    metrics = {
        **dpo.metrics,
        "total_steps": float(total),
        "resumed_from_step": float(resumed_from_step),
        "duration_s": sft.metrics.get("duration_s", 0.0) + dpo.metrics.get("duration_s", 0.0),
        **{f"sft_{name}": value for name, value in sft.metrics.items()},
        **{f"dpo_{name}": value for name, value in dpo.metrics.items()},
    }
    return TrainingResult(
        adapter_dir=dpo.adapter_dir,
        total_steps=total,
        resumed_from_step=resumed_from_step,
        losses=sft.losses + dpo.losses,
        metrics=metrics,
    )


def _finished(job: TrainingJob) -> TrainingResult | None:
    """The result of a job whose adapter was already written (a worker died after training, before reporting)."""
    if not (job.adapter_dir / "adapter_model.safetensors").exists():
        return None
    saved = json.loads((job.work_dir / "result.json").read_text())
    return TrainingResult(adapter_dir=job.adapter_dir, **saved)


def _objective(
    tokenizer: Any, records: list[Any], hp: Hyperparameters, pad_id: int, device: torch.device
) -> tuple[list[Any], Callable[[Any, list[Any]], StepLoss]]:
    """The tokenized training items of the job's method, and the loss of one step over a batch of them."""
    if hp.method == "dpo":
        pairs = tokenize_preferences(tokenizer, records, hp.max_seq_length)
        return pairs, lambda model, batch: preference_loss(model, batch, hp.dpo_beta, pad_id, device)
    examples = tokenize_dataset(tokenizer, records, hp.max_seq_length)
    if not any(example.trained_tokens for example in examples):
        raise TrainingError("invalid_input", "no assistant tokens in the dataset: nothing to train on")
    return examples, lambda model, batch: assistant_loss(model, pack(batch, hp.max_seq_length, pad_id), device)


def _reward_metrics(margins: list[torch.Tensor]) -> dict[str, float]:
    """DPO's view of the last logging interval: how often, and by how much, the policy prefers the chosen answer."""
    if not margins:
        return {}
    flat = torch.cat(margins)
    return {
        "reward_accuracy": (flat > 0).float().mean().item(),
        "reward_margin": flat.mean().item(),
    }


def _lora_model(model: Any, hp: Hyperparameters, start_adapter: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    ignore_peft_deprecation()
    if start_adapter is not None:
        if not (start_adapter / "adapter_config.json").is_file():
            raise TrainingError("invalid_input", f"no LoRA adapter to start from at {start_adapter}")
        _check_shape(json.loads((start_adapter / "adapter_config.json").read_text()), hp)
        try:
            return PeftModel.from_pretrained(model, start_adapter, is_trainable=True)
        except (ValueError, RuntimeError, KeyError) as error:  # another base model's, or not a LoRA adapter
            raise TrainingError(
                "invalid_input", f"the adapter at {start_adapter} does not fit this base model: {error}"
            ) from error
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = sorted(set(hp.target_modules) - names)
    if unknown:
        raise TrainingError("invalid_input", f"target_modules {unknown} do not exist in this model")
    config = LoraConfig(
        r=hp.rank,
        lora_alpha=hp.alpha,
        lora_dropout=hp.dropout,
        target_modules=list(hp.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _check_shape(config: dict[str, Any], hp: Hyperparameters) -> None:
    """The job's hyperparameters must state the starting adapter's LoRA shape: training keeps that shape, and
    the hyperparameters travel on training.completed into the registry as what the adapter is."""
    shape = {
        "rank": (config.get("r"), hp.rank),
        "alpha": (config.get("lora_alpha"), hp.alpha),
        "dropout": (config.get("lora_dropout"), hp.dropout),
        "target_modules": (sorted(config.get("target_modules") or []), sorted(hp.target_modules)),
    }
    differ = {name: adapter for name, (adapter, asked) in shape.items() if adapter != asked}
    if differ:
        stated = ", ".join(f"{name}={value}" for name, value in differ.items())
        raise TrainingError(
            "invalid_input", f"the adapter to start from has {stated}: ask for the same to go on training it"
        )


def _referenced(
    job: TrainingJob, model: Any, pairs: list[Any], pad_id: int, device: torch.device
) -> list[ReferencedPair]:
    """The pairs with the reference's log-probabilities: computed before the first step and kept in the work
    directory, because a resumed job's weights are no longer the reference."""
    saved = job.work_dir / "reference.json"
    if saved.exists():
        values = json.loads(saved.read_text())
        return [ReferencedPair(pair, chosen, rejected) for pair, (chosen, rejected) in zip(pairs, values, strict=True)]
    referenced = reference_logprobs(model, pairs, job.hyperparameters.batch_size, pad_id, device)
    _write_atomically(saved, json.dumps([[item.chosen, item.rejected] for item in referenced]))
    return referenced


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batch_for(step: int, examples: list[Any], hp: Hyperparameters, steps_per_epoch: int) -> list[Any]:
    """The examples of one step: the data position is the step number, so resuming needs nothing else."""
    epoch, index = divmod(step, steps_per_epoch)
    order = epoch_order(len(examples), hp.seed, epoch)
    return [examples[i] for i in order[index * hp.batch_size : (index + 1) * hp.batch_size]]


def _adapter_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().cpu().contiguous() for name, tensor in get_peft_model_state_dict(model).items()}


def _save_adapter(model: Any, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".adapter-"))
    model.save_pretrained(staging, safe_serialization=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def _save_checkpoint(job: TrainingJob, step: int, model: Any, optimizer: Any, scheduler: Any) -> None:
    from safetensors.torch import save_file

    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=job.checkpoint_dir, prefix=".tmp-"))
    save_file(_adapter_state(model), str(staging / "adapter.safetensors"))
    # Optimiser state is tensors and numbers only, so it loads back with weights_only=True (no pickled code).
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        staging / "state.pt",
    )
    (staging / "meta.json").write_text(json.dumps({"step": step}))
    final = job.checkpoint_dir / f"step-{step:08d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _write_atomically(job.checkpoint_dir / "latest", final.name)
    for old in sorted(job.checkpoint_dir.glob("step-*"))[: -job.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _restore(job: TrainingJob, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Load the latest checkpoint if there is one; returns the step to continue from (0 for a fresh job)."""
    pointer = job.checkpoint_dir / "latest"
    if not pointer.exists():
        return 0
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    checkpoint = job.checkpoint_dir / pointer.read_text().strip()
    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter.safetensors")))
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(json.loads((checkpoint / "meta.json").read_text())["step"])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
