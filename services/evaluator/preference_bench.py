"""`flywheel bench preference`: does DPO on the demo's feedback beat SFT on the same feedback, by the gate?

On the demo's Acme Nimbus data (services/demo/data): the training split stands for reviewer
corrections (each row's last answer is the right one), the golden split for held-out paraphrases of
the same facts. The pairs are what the demo's feedback gives `flywheel ops preference-dataset`: chosen,
the reviewer's correction; rejected, the answer it replaced, which is the base model's own greedy
answer to that prompt. One LoRA adapter is trained with SFT on the corrections, one with DPO on the
pairs, and one with DPO on the pairs going on from the SFT adapter (SFT then DPO, held to the SFT
adapter as its reference), all with the same hyperparameters; they and the base model answer the
golden prompts, and the evaluator's gate compares them paired: DPO against SFT, SFT then DPO against
SFT, SFT against the base model, DPO against it.

Why here, and why training goes through `flywheel train local` in a subprocess: services never import
each other. The question is an evaluation (the metric suites, the policies and the gate are the
evaluator's), so the benchmark is the evaluator's and reaches the trainer as a user does, through
its command, reading the adapter directory it prints; the process boundary is the one `flywheel bench
train` already puts around its sides. The base model's answers come from the inference engine serving
runs (generation.LoadedModel), as the answers a reviewer corrects do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.events import Hyperparameters, MetricComparison
from services.evaluator.gate import AUTO, GatePolicy, Verdict, compare_targets, decide, policy_for
from services.evaluator.generation import LoadedModel
from services.evaluator.golden import GoldenExample, parse_golden
from services.evaluator.suite import LOWER_IS_BETTER, SUITES, TargetScores, score_target
from services.runtime.bench import Echo
from services.runtime.scoring import Embedder

MODEL = "smollm2-135m-instruct"
SUITE = "default"
# The evaluator's defaults (EvaluatorSettings): answers as long, and intervals as tight, as a gated evaluation's.
MAX_TOKENS = 64
RESAMPLES = 2000


def chosen_facts(golden_rows: Sequence[dict[str, Any]], facts: int) -> set[str]:
    """The first `facts` distinct golden answers: each is one fact, with its training rows and its paraphrases."""
    return set(list(dict.fromkeys(row["messages"][-1]["content"] for row in golden_rows))[:facts])


def rows_about(rows: Sequence[dict[str, Any]], facts: set[str]) -> list[dict[str, Any]]:
    return [row for row in rows if row["messages"][-1]["content"] in facts]


def correction_pairs(
    corrections: Sequence[dict[str, Any]], replaced: Sequence[str], model_name: str
) -> list[dict[str, Any]]:
    """Preference records as the registry takes them: each correction is chosen over the answer it replaced.

    A correction identical to the answer it replaced corrects nothing; the registry refuses such a pair
    (and `flywheel ops preference-dataset` drops it), so it is left out here too.
    """
    pairs = []
    for row, answer in zip(corrections, replaced, strict=True):
        *prompt, correction = row["messages"]
        if not answer.strip() or answer.strip() == correction["content"].strip():
            continue
        pairs.append(
            {
                "prompt": prompt,
                "chosen": correction["content"],
                "rejected": answer,
                "provenance": {
                    "kind": "correction",
                    "model_name": model_name,
                    "rejected": {"answered_by": "the base model, greedy"},
                },
            }
        )
    return pairs


def _jsonl(records: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


@dataclass(frozen=True)
class Gate:
    candidate: str
    baseline: str
    comparisons: dict[str, MetricComparison]
    verdict: Verdict


@dataclass(frozen=True)
class PreferenceBench:
    policy: GatePolicy
    why: str
    gates: list[Gate]
    examples: list[GoldenExample]
    answers: dict[str, list[str]]  # each target's golden answers, aligned with examples
    seconds: dict[str, float]


def run_preference_bench(
    base_dir: Path,
    data_dir: Path,
    work_dir: Path,
    *,
    facts: int,
    hyperparameters: Hyperparameters,
    echo: Echo,
    dpo_learning_rate: float | None = None,
) -> PreferenceBench:
    """`dpo_learning_rate`: the DPO adapters' peak rate, when it is not `hyperparameters`' (DPO usually runs
    at a far smaller rate than SFT on LoRA)."""
    seconds: dict[str, float] = {}
    golden_rows = [json.loads(line) for line in (data_dir / "golden.jsonl").read_text().splitlines()]
    train_rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    picked = chosen_facts(golden_rows, facts)
    corrections = rows_about(train_rows, picked)
    examples = parse_golden(_jsonl(rows_about(golden_rows, picked)))
    # Keyed by the data and the hyperparameters: a rerun reuses finished adapters (the trainer returns them).
    key = hashlib.sha256((_jsonl(corrections) + hyperparameters.model_dump_json()).encode()).hexdigest()[:12]
    work_dir = work_dir / f"{facts}-facts-{key}"
    work_dir.mkdir(parents=True, exist_ok=True)
    echo(f"{len(picked)} facts: {len(corrections)} corrections to train on, {len(examples)} held-out golden questions")

    clock = time.monotonic()
    base = LoadedModel.load(base_dir, label="base")
    echo(f"inference engine: {base.engine.model.dtype}")
    replaced = [
        generation.text
        for generation in base.generate([row["messages"][:-1] for row in corrections], max_tokens=MAX_TOKENS)
    ]
    pairs = correction_pairs(corrections, replaced, MODEL)
    seconds["base answers to the corrected prompts"] = time.monotonic() - clock
    echo(
        f"{len(pairs)} preference pairs ({len(corrections) - len(pairs)} corrections equal to the base answer left out)"
    )
    for pair in pairs[:3]:
        echo(f"  e.g. {pair['prompt'][-1]['content']!r}: chosen {pair['chosen']!r} over {pair['rejected']!r}")
    (work_dir / "corrections.jsonl").write_text(_jsonl(corrections))
    (work_dir / "pairs.jsonl").write_text(_jsonl(pairs))

    embedder = Embedder()
    clock = time.monotonic()
    scores = {"base model": _score(base, examples, embedder)}
    seconds["golden answers of the base model"] = time.monotonic() - clock
    del base
    adapters: dict[str, Path] = {}
    for label, method, data, start in (
        ("SFT adapter", "sft", work_dir / "corrections.jsonl", None),
        ("DPO adapter", "dpo", work_dir / "pairs.jsonl", None),
        # DPO going on from the SFT adapter, held to it: the preferences without losing what SFT learned.
        ("SFT then DPO adapter", "dpo", work_dir / "pairs.jsonl", "SFT adapter"),
    ):
        clock = time.monotonic()
        hp = hyperparameters.model_copy(update={"method": method})
        if method == "dpo" and dpo_learning_rate is not None:
            hp = hp.model_copy(update={"learning_rate": dpo_learning_rate})
        # Each adapter's directory is named by what it is trained with, so a rerun reuses only the same ones.
        recipe = hashlib.sha256(hp.model_dump_json().encode()).hexdigest()[:8]
        name = f"{method}-from-sft-{recipe}" if start else f"{method}-{recipe}"
        adapter = adapters[label] = _train(
            base_dir, data, work_dir / name, hp, echo, start_adapter=adapters[start] if start else None
        )
        seconds[f"training the {label}"] = time.monotonic() - clock
        clock = time.monotonic()
        scores[label] = _score(LoadedModel.load(base_dir, adapter_dir=adapter, label=label), examples, embedder)
        seconds[f"golden answers of the {label}"] = time.monotonic() - clock

    policy, why = policy_for(MODEL, {}, AUTO, references=[example.reference for example in examples])
    gates = []
    for candidate, baseline in (
        ("DPO adapter", "SFT adapter"),
        ("SFT then DPO adapter", "SFT adapter"),
        ("SFT adapter", "base model"),
        ("DPO adapter", "base model"),
    ):
        comparisons = compare_targets(policy, scores[candidate], scores[baseline], resamples=RESAMPLES)
        gates.append(Gate(candidate, baseline, comparisons, decide(policy, comparisons)))
    answers = {label: target.predictions for label, target in scores.items()}
    return PreferenceBench(policy, why, gates, examples, answers, seconds)


def _score(model: LoadedModel, examples: list[GoldenExample], embedder: Embedder) -> TargetScores:
    """The evaluator's default suite on `model`'s greedy answers, as a gated evaluation scores a target."""
    prompts = [example.messages for example in examples]
    generations = model.generate(prompts, max_tokens=MAX_TOKENS)
    perplexities = model.perplexity(prompts, [example.reference for example in examples])
    return asyncio.run(score_target(SUITES[SUITE], examples, generations, perplexities=perplexities, embedder=embedder))


def _train(
    base_dir: Path, data: Path, work_dir: Path, hp: Hyperparameters, echo: Echo, *, start_adapter: Path | None = None
) -> Path:
    """Train through `flywheel train local` (from `start_adapter` when given), echoing its progress; the
    adapter directory it prints."""
    args = [
        sys.executable,
        "-u",  # unbuffered: each step's line shows as it happens, not when a pipe's buffer fills
        "-m",
        "services.cli.main",
        "train",
        "local",
        "--no-score",
        f"--model-path={base_dir}",
        f"--data={data}",
        f"--work-dir={work_dir}",
        f"--method={hp.method}",
        f"--dpo-beta={hp.dpo_beta}",
        f"--rank={hp.rank}",
        f"--alpha={hp.alpha}",
        f"--learning-rate={hp.learning_rate}",
        f"--epochs={hp.epochs}",
        f"--batch-size={hp.batch_size}",
        f"--max-seq-length={hp.max_seq_length}",
        f"--seed={hp.seed}",
        f"--target-modules={','.join(hp.target_modules)}",
        *([f"--start-adapter={start_adapter}"] if start_adapter else []),
    ]
    echo(f"== train {hp.method}{f' from {start_adapter}' if start_adapter else ''}")
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / "stderr.log"
    with (
        log.open("w") as errors,
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errors, text=True) as process,
    ):
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line.rstrip())
            echo(f"  {line.rstrip()}")
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"flywheel train local --method {hp.method} failed: {log.read_text().strip()[-2000:]}")
    return Path(json.loads(lines[-1])["adapter"])


def gate_report(gate: Gate, policy: GatePolicy, why: str) -> list[str]:
    """One comparison as the evaluator's report states it: each metric's means, paired difference and interval, then the verdict."""
    pct = f"{policy.confidence:.0%}"
    lines = [
        f"== gate: {gate.candidate} (candidate) vs {gate.baseline} (baseline), policy {policy.key} ({why})",
        f"{'metric':20s} {'baseline':>9s} {'candidate':>9s} {'difference':>10s}  {pct + ' interval (paired bootstrap)':32s} {'n':>3s}  better",
    ]
    for metric in gate.comparisons.values():
        if metric.difference is None or metric.ci_low is None or metric.ci_high is None or metric.baseline is None:
            lines.append(f"{metric.metric:20s} {'n/a':>9s} {'n/a':>9s}")
            continue
        better = "lower" if metric.metric in LOWER_IS_BETTER else "higher"
        lines.append(
            f"{metric.metric:20s} {metric.baseline:9.4f} {metric.candidate:9.4f} {metric.difference:+10.4f}  "
            f"[{metric.ci_low:+.4f}, {metric.ci_high:+.4f}]{'':14s} {metric.examples:3d}  {better}"
        )
    lines.append(f"verdict: {'PASSED' if gate.verdict.passed else 'FAILED'}")
    lines.extend(f"  {reason}" for reason in gate.verdict.reasons)
    return lines
