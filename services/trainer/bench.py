"""`flywheel bench train`: the trainer's step loop against a plain transformers Trainer + peft, same rows, same run.

Each side runs in its own subprocess so that peak memory is its own (max RSS on the CPU, the CUDA
allocator's peak on a GPU). Both see the same tokenized rows with the same prompt masking and the
same LoRA settings; what differs is what the trainer does about it: packed rows instead of padded
ones, and vocabulary logits only at the positions that carry a loss. tokens/s counts real tokens
(prompt and answer, no padding) over the measured steps, after one warm-up step. Tokens per
CPU-second is printed beside it: on a shared CPU the wall clock mostly measures the scheduler's
share (a side got 8% of a core for minutes in the recorded run), the CPU time the work itself.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from contracts.events import Hyperparameters
from services.trainer.data import IGNORE, read_chat_jsonl, tokenize_dataset


def run_bench(
    model_dir: Path,
    data: Path,
    *,
    rows: int,
    steps: int,
    batch_size: int,
    max_seq_length: int,
    rounds: int,
    threads: int,
    echo: Callable[[str], None],
) -> dict[str, dict]:
    """Run both sides `rounds` times in ABBA order; tokens/s pools every round of a side, peak memory is its largest.

    On a shared machine the load drifts while the bench runs: alternating which side goes first
    cancels a steady drift, and pooling the rounds weighs each side over the same stretch of time.
    """
    order = [
        side
        for index in range(rounds)
        for side in (("baseline", "trainer") if index % 2 == 0 else ("trainer", "baseline"))
    ]
    runs: dict[str, list[dict]] = {"baseline": [], "trainer": []}
    for side in order:
        args = [
            sys.executable,
            "-m",
            "services.trainer.bench",
            side,
            str(model_dir),
            str(data),
            str(rows),
            str(steps),
            str(batch_size),
            str(max_seq_length),
            str(threads),
        ]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"bench side {side} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
            )
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs[side].append(run)
        echo(
            f"{side:9s} round {len(runs[side])}: tokens/s {run['tokens_per_second']:8.1f}   tokens/CPU-s {run['tokens'] / run['cpu_seconds']:8.1f}"
            f"   peak memory {run['peak_mb']:8.1f} MB   ({run['tokens']} tokens in {run['seconds']:.1f}s, {run['cpu_seconds']:.1f} CPU-s, {run['device']})"
        )
    results = {
        side: {
            "tokens_per_second": sum(r["tokens"] for r in side_runs) / sum(r["seconds"] for r in side_runs),
            "tokens_per_cpu_second": sum(r["tokens"] for r in side_runs) / sum(r["cpu_seconds"] for r in side_runs),
            "peak_mb": max(r["peak_mb"] for r in side_runs),
            "device": side_runs[0]["device"],
            "rounds": side_runs,
        }
        for side, side_runs in runs.items()
    }
    for side in ("baseline", "trainer"):
        echo(
            f"{side:9s} pooled:  tokens/s {results[side]['tokens_per_second']:8.1f}   tokens/CPU-s {results[side]['tokens_per_cpu_second']:8.1f}"
            f"   peak memory {results[side]['peak_mb']:8.1f} MB"
        )
    ratio = results["trainer"]["tokens_per_second"] / results["baseline"]["tokens_per_second"]
    cpu_ratio = results["trainer"]["tokens_per_cpu_second"] / results["baseline"]["tokens_per_cpu_second"]
    memory = results["trainer"]["peak_mb"] / results["baseline"]["peak_mb"]
    # On a shared CPU the wall clock mostly measures the scheduler's share; CPU time measures the work.
    echo(
        f"trainer / baseline: tokens/s x{ratio:.2f}, tokens per CPU-second x{cpu_ratio:.2f}, peak memory x{memory:.2f}"
    )
    return results


def _hp(batch_size: int, max_seq_length: int) -> Hyperparameters:
    return Hyperparameters(
        rank=16,
        alpha=32,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        learning_rate=1e-3,
        epochs=1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainer_side(model_dir: Path, data: Path, rows: int, steps: int, hp: Hyperparameters) -> dict:
    from services.trainer import engine
    from services.trainer.data import pack
    from services.trainer.losses import assistant_loss
    from services.trainer.model import load_model, load_tokenizer, pick_device

    device = pick_device()
    tokenizer = load_tokenizer(model_dir)
    examples = tokenize_dataset(tokenizer, read_chat_jsonl(data)[:rows], hp.max_seq_length)
    torch.manual_seed(hp.seed)
    model = engine._lora_model(load_model(model_dir, device), hp)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate)
    steps_per_epoch = -(-len(examples) // hp.batch_size)
    tokens, started, cpu_started = 0, 0.0, 0.0
    for step in range(steps + 1):
        if step == 1:
            _sync(device)
            started, cpu_started = time.perf_counter(), time.process_time()
        batch = pack(engine._batch_for(step, examples, hp, steps_per_epoch), hp.max_seq_length, tokenizer.pad_token_id)
        assistant_loss(model, batch, device).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as the engine and the baseline Trainer (max_grad_norm=1.0) do
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 1:
            tokens += batch.tokens
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "tokens_per_second": tokens / seconds,
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mb": _peak_mb(device),
        "device": str(device),
    }


def _baseline_side(model_dir: Path, data: Path, rows: int, steps: int, hp: Hyperparameters) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from services.trainer import engine
    from services.trainer.model import load_model, load_tokenizer, pick_device

    device = pick_device()
    tokenizer = load_tokenizer(model_dir)
    examples = tokenize_dataset(tokenizer, read_chat_jsonl(data)[:rows], hp.max_seq_length)
    torch.manual_seed(hp.seed)
    model = engine._lora_model(load_model(model_dir, device), hp)
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    real_tokens: list[int] = []

    def counting_collate(features: list[dict]) -> dict:
        real_tokens.append(sum(len(f["input_ids"]) for f in features))
        return collate(features)

    class Clock(TrainerCallback):
        started = cpu_started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003 - transformers' callback signature
            if state.global_step == 1:
                _sync(device)
                Clock.started, Clock.cpu_started = time.perf_counter(), time.process_time()

    rows_as_dicts = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples
    ]
    args = TrainingArguments(
        output_dir=str(Path(tempfile.gettempdir()) / "flywheel-bench-baseline"),
        per_device_train_batch_size=hp.batch_size,
        max_steps=steps + 1,
        learning_rate=hp.learning_rate,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        bf16=device.type == "cuda",
        dataloader_num_workers=0,
        seed=hp.seed,
        disable_tqdm=True,
    )
    Trainer(
        model=model, args=args, train_dataset=rows_as_dicts, data_collator=counting_collate, callbacks=[Clock()]
    ).train()
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - Clock.started, time.process_time() - Clock.cpu_started
    tokens = sum(real_tokens[1 : steps + 1])
    return {
        "tokens_per_second": tokens / seconds,
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mb": _peak_mb(device),
        "device": str(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    side, model_dir, data, rows, steps, batch_size, max_seq_length, threads = sys.argv[1:9]
    # Both sides get the same thread count: the ratio then measures what each does with the cores.
    torch.set_num_threads(int(threads))
    run = _trainer_side if side == "trainer" else _baseline_side
    print(
        json.dumps(run(Path(model_dir), Path(data), int(rows), int(steps), _hp(int(batch_size), int(max_seq_length))))
    )
