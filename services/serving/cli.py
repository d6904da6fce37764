"""The serving service's part of the `flywheel` command, by group in `app` (services/cli/main.py mounts it,
finding this module by name): `flywheel bench serve`, `flywheel bench gateway` and `flywheel bench injection`,
serving's benchmarks, also part of `flywheel bench all`; and `flywheel guard train-injection`, which fits the
gateway's prompt-injection classifier."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from services.runtime.bench import Benchmark, Echo, Row

app = typer.Typer()
bench_app = typer.Typer()
app.add_typer(bench_app, name="bench")
guard_app = typer.Typer(help="The gateway's guards: the prompt-injection classifier.", no_args_is_help=True)
app.add_typer(guard_app, name="guard")


@bench_app.command("serve")
def bench_serve(
    requests: int = typer.Option(32, min=1, help="Requests per measurement."),
    max_tokens: int = typer.Option(8, min=1, help="New tokens per request."),
    concurrency: list[int] = typer.Option([1, 8, 32], help="Client concurrency levels (repeat the option)."),
    adapters: int = typer.Option(8, min=1, help="LoRA adapters for the mixed-batch comparison."),
) -> None:
    """Triton continuous batching vs per-request generate; mixed adapters vs swapping; gateway overhead."""
    from services.serving.bench import run_bench

    run_bench(
        requests=requests, max_tokens=max_tokens, concurrencies=tuple(concurrency), adapters=adapters, echo=typer.echo
    )


_THROUGHPUT = re.compile(
    r"^(per-request generate|Triton continuous batching), concurrency (\d+)\s+([\d.]+) req/s\s+p50\s+([\d.]+) ms"
)
_SWITCH = re.compile(r"mixed batches: ([\d.]+) s, switching: ([\d.]+) s")
_STACKED = re.compile(
    r"stacked adapters against peft's loop, the same mixed batch of (\d+): ([\d.]+) ms against ([\d.]+) ms a generated token"
)
_LORA_COST = re.compile(
    r"mixed adapters against the base model alone, the same batch of (\d+): ([\d.]+) ms against ([\d.]+) ms a generated token"
)
_LATENCY = re.compile(r"^(direct Triton gRPC stream|through the gateway[^\d]*?)\s+([\d.]+) req/s\s+p50\s+([\d.]+) ms")


def _printed(run: Callable[..., None], size: dict[str, Any], echo: Echo) -> list[str]:
    """Runs a benchmark that prints its figures (it does not return them), echoing and keeping its lines."""
    lines: list[str] = []

    def keep(line: str) -> None:
        lines.extend(line.splitlines())
        echo(line)

    run(echo=keep, **size)
    return lines


def _serve_rows(size: dict[str, Any], echo: Echo) -> list[Row]:
    from services.serving.bench import run_bench

    return serve_rows(_printed(run_bench, size, echo), size)


def serve_rows(lines: list[str], size: dict[str, Any]) -> list[Row]:
    """The table rows in the serving benchmark's printed figures."""
    rows: list[Row] = []
    throughput: dict[str, dict[str, float]] = {}
    latency: dict[str, float] = {}
    for line in lines:
        if match := _THROUGHPUT.match(line.strip()):
            throughput.setdefault(match[2], {})[match[1]] = float(match[3])
        elif match := _SWITCH.search(line):
            rows.append(
                Row(
                    "serve",
                    f"seconds for {size['requests']} requests over {size['adapters']} LoRA adapters",
                    float(match[1]),
                    float(match[2]),
                    "s",
                    "lower",
                    "mixed-adapter batches",
                    "one request at a time, adapter switched",
                )
            )
        elif match := _STACKED.match(line.strip()):
            rows.append(
                Row(
                    "serve",
                    f"time a generated token, a batch of {match[1]} over {size['adapters']} LoRA adapters, stacked against peft",
                    float(match[2]),
                    float(match[3]),
                    "ms",
                    "lower",
                    "stacked adapter weights (batched LoRA)",
                    "peft's loop over each adapter's rows",
                )
            )
        elif match := _LORA_COST.match(line.strip()):
            rows.append(
                Row(
                    "serve",
                    f"time a generated token, a batch of {match[1]} over {size['adapters']} LoRA adapters",
                    float(match[2]),
                    float(match[3]),
                    "ms",
                    "lower",
                    "mixed-adapter batch",
                    "the same batch on the base model alone",
                )
            )
        elif match := _LATENCY.match(line.strip()):
            latency["gateway" if match[1].startswith("through") else "direct"] = float(match[3])
    for concurrency, sides in throughput.items():
        rows.append(
            Row(
                "serve",
                f"throughput, {size['requests']} requests x {size['max_tokens']} tokens, concurrency {concurrency}",
                sides.get("Triton continuous batching"),
                sides.get("per-request generate"),
                "req/s",
                "higher",
                "Triton continuous batching",
                "per-request generate",
            )
        )
    if latency:
        rows.append(
            Row(
                "serve",
                "p50 latency, concurrency 1",
                latency.get("gateway"),
                latency.get("direct"),
                "ms",
                "lower",
                "through the OpenAI gateway",
                "direct Triton gRPC (overhead: ratio above 1)",
            )
        )
    if not rows:
        raise RuntimeError("the serving benchmark printed no figures this command recognises")
    return rows


SERVE = Benchmark(
    name="serve",
    sizes={
        "quick": {"requests": 8, "max_tokens": 8, "concurrencies": (1, 8), "adapters": 4},
        "full": {"requests": 32, "max_tokens": 8, "concurrencies": (1, 8, 32), "adapters": 8},
    },
    run=_serve_rows,
)


@bench_app.command("gateway")
def bench_gateway(
    pairs: int = typer.Option(200, min=2, help="Alternating guard-on / guard-off pairs."),
    requests: int = typer.Option(32, min=1, help="Prompts generated, then asked again, for the cache."),
    max_tokens: int = typer.Option(8, min=1, help="New tokens per request."),
) -> None:
    """The output guard's cost (all checks on against off) and a response-cache hit against a generation."""
    from services.serving.gateway_bench import run_gateway_bench

    run_gateway_bench(pairs=pairs, requests=requests, max_tokens=max_tokens, echo=typer.echo)


_LATENCIES = re.compile(r"^(?P<label>.+?)\s+p50\s+(?P<p50>-?[\d.]+) ms\s+p95\s+(?P<p95>-?[\d.]+) ms")


def _gateway_rows(size: dict[str, Any], echo: Echo) -> list[Row]:
    from services.serving.gateway_bench import run_gateway_bench

    return gateway_rows(_printed(run_gateway_bench, size, echo), size)


def gateway_rows(lines: list[str], size: dict[str, Any]) -> list[Row]:
    """The table rows in the gateway benchmark's printed figures."""
    from services.serving.gateway_bench import GUARDS_ON, PER_REQUEST_OVERHEAD, OVERHEAD_INTERVAL

    figures = {
        match["label"].strip(): (float(match["p50"]), float(match["p95"]))
        for line in lines
        if (match := _LATENCIES.match(line.strip()))
    }
    off, on = figures.get("guard off"), figures.get(GUARDS_ON)
    generated = figures.get("generated through the gateway (cache miss)")
    hit = figures.get("answered from the gateway's response cache")
    semantic = figures.get("answered from the semantic cache")
    streamed = figures.get("the guard's own check, streamed word by word")
    guards_own = figures.get("the guards' own time per call, as their spans say")
    rows: list[Row] = []
    if off and on:
        for index, percentile in enumerate(("p50", "p95")):
            rows.append(
                Row(
                    "gateway",
                    f"{percentile} latency, {size['max_tokens']} tokens, every guard on ({size['pairs']} pairs)",
                    on[index],
                    off[index],
                    "ms",
                    "lower",
                    "every input and output check on",
                    "guards off",
                )
            )
    stripped = [line.strip() for line in lines]
    for label, measure in (
        ("overhead: the pairs' differences", f"guard overhead, {size['max_tokens']} tokens"),
        (PER_REQUEST_OVERHEAD, "guard overhead per request, 1 token"),
    ):
        # Each overhead line is followed by its interval.
        at = next((index for index, line in enumerate(stripped) if line.startswith(label)), None)
        if at is None or at + 1 == len(stripped) or not stripped[at + 1].startswith(OVERHEAD_INTERVAL):
            continue
        interval = stripped[at + 1].removeprefix(OVERHEAD_INTERVAL).strip()
        rows.append(
            Row(
                "gateway",
                f"{measure}, p50 of the pairs' differences ({interval})",
                figures[label][0],
                None,
                "ms",
                "lower",
            )
        )
    if guards_own:
        rows.append(
            Row(
                "gateway",
                "the guards' own time per call (input, injection screen, output), p50",
                guards_own[0],
                None,
                "ms",
                "lower",
            )
        )
    if streamed:
        rows.append(
            Row("gateway", "the output guard's own check per streamed answer, p50", streamed[0], None, "ms", "lower")
        )
    if generated and hit:
        rows.append(
            Row(
                "gateway",
                f"p50 latency of a repeated greedy request, {size['max_tokens']} tokens",
                hit[0],
                generated[0],
                "ms",
                "lower",
                "answered from the response cache",
                "generated through the gateway",
            )
        )
    if generated and semantic:
        rows.append(
            Row(
                "gateway",
                f"p50 latency of a reworded greedy request, {size['max_tokens']} tokens",
                semantic[0],
                generated[0],
                "ms",
                "lower",
                "answered from the semantic cache",
                "generated through the gateway",
            )
        )
    if not rows:
        raise RuntimeError("the gateway benchmark printed no figures this command recognises")
    return rows


GATEWAY = Benchmark(
    name="gateway",
    sizes={
        "quick": {"pairs": 16, "requests": 8, "max_tokens": 8},
        "full": {"pairs": 200, "requests": 32, "max_tokens": 8},
    },
    run=_gateway_rows,
)


@bench_app.command("injection")
def bench_injection(
    timings: int = typer.Option(50, min=1, help="Timed calls of the detector per prompt length."),
) -> None:
    """Precision and recall of the gateway's prompt-injection check on the labelled set (5-fold), against a
    length-only baseline; and the detector's time per prompt."""
    from services.runtime.settings import FlywheelSettings
    from services.serving.injection_bench import run_injection_bench

    run_injection_bench(cache=FlywheelSettings().cache, echo=typer.echo, timings=timings)


@guard_app.command("train-injection")
def guard_train_injection(
    out: Path = typer.Option(None, help="Where to write the weights (default: the shipped injection_model.json)."),
) -> None:
    """Fit the prompt-injection classifier on the whole labelled set and write its weights."""
    from services.runtime.scoring.injection import MODEL_PATH
    from services.runtime.settings import FlywheelSettings
    from services.serving.injection_bench import train_injection_model

    train_injection_model(cache=FlywheelSettings().cache, out=out or MODEL_PATH, echo=typer.echo)


def _injection_rows(size: dict[str, Any], echo: Echo) -> list[Row]:
    from services.runtime.settings import FlywheelSettings
    from services.serving.injection_bench import run_injection_bench

    bench = run_injection_bench(cache=FlywheelSettings().cache, echo=echo, timings=size["timings"])
    *signals, length = bench.results
    rows = [
        Row(
            "injection",
            f"{measure} on the labelled set (5-fold)",
            100 * getattr(signal, measure),
            100 * getattr(length, measure),
            "%",
            "higher",
            signal.label,
            "prompt length alone (best cut)",
        )
        for signal in signals
        for measure in ("precision", "recall")
    ]
    rows.append(Row("injection", "prompts the guard asked MiniLM about", 100 * bench.meaning_share, None, "%", "lower"))
    rows.extend(
        Row("injection", f"detector time on {label}, p50", ms, None, "ms", "lower")
        for label, ms in bench.detector_ms.items()
    )
    return rows


INJECTION = Benchmark(name="injection", sizes={"quick": {"timings": 10}, "full": {"timings": 50}}, run=_injection_rows)


@bench_app.command("dtype")
def bench_dtype(
    requests: int = typer.Option(16, min=1, help="Requests timed per dtype."),
    max_tokens: int = typer.Option(32, min=2, help="New tokens per request."),
    golden: int = typer.Option(72, min=1, help="Golden questions of the demo answered by both dtypes."),
) -> None:
    """The model engine in bfloat16 against float32: prefill, decode, and how far greedy answers agree."""
    from services.serving.dtype_bench import run_dtype_bench

    run_dtype_bench(requests=requests, max_tokens=max_tokens, golden=golden, echo=typer.echo)


_DTYPE_FIRST = re.compile(r"^(float32|bfloat16)\s+prefill \+ first token\s+p50\s+([\d.]+) ms")
_DTYPE_STEP = re.compile(r"^(float32|bfloat16)\s+decode step\s+p50\s+[\d.]+ ms\s+([\d.]+) tokens/s")
_DTYPE_SAME = re.compile(r"^answers identical token for token\s+(\d+) of (\d+)")
_DTYPE_ROOFLINE = re.compile(
    r"^(float32|bfloat16)\s+roofline share\s+[\d.]+: ([\d.]+) of ([\d.]+) tokens/s \((\d+) MB a step at ([\d.]+) GB/s\)"
)


def _dtype_rows(size: dict[str, Any], echo: Echo) -> list[Row]:
    from services.serving.dtype_bench import run_dtype_bench

    return dtype_rows(_printed(run_dtype_bench, size, echo))


def dtype_rows(lines: list[str]) -> list[Row]:
    """The table rows in the dtype benchmark's printed figures."""
    first: dict[str, float] = {}
    step: dict[str, float] = {}
    rows: list[Row] = []
    for line in lines:
        if match := _DTYPE_FIRST.match(line.strip()):
            first[match[1]] = float(match[2])
        elif match := _DTYPE_STEP.match(line.strip()):
            step[match[1]] = float(match[2])
        elif match := _DTYPE_ROOFLINE.match(line.strip()):
            rows.append(
                Row(
                    "dtype",
                    f"batch-1 decode against the memory-bandwidth limit, {match[1]} (goal: a share of at least 0.6)",
                    float(match[2]),
                    float(match[3]),
                    "tokens/s",
                    "higher",
                    f"{match[1]} engine",
                    f"limit: {match[4]} MB a step at {match[5]} GB/s",
                )
            )
        elif match := _DTYPE_SAME.match(line.strip()):
            rows.append(
                Row(
                    "dtype",
                    "greedy answers identical to float32's",
                    float(match[1]),
                    float(match[2]),
                    "answers",
                    "higher",
                    "bfloat16",
                    "all golden questions",
                )
            )
    if first:
        rows.insert(
            0,
            Row(
                "dtype",
                "prefill + first token p50",
                first.get("bfloat16"),
                first.get("float32"),
                "ms",
                "lower",
                "bfloat16",
                "float32",
            ),
        )
    if step:
        rows.insert(
            1,
            Row(
                "dtype",
                "batch-1 decode",
                step.get("bfloat16"),
                step.get("float32"),
                "tokens/s",
                "higher",
                "bfloat16",
                "float32",
            ),
        )
    if not rows:
        raise RuntimeError("the dtype benchmark printed no figures this command recognises")
    return rows


DTYPE = Benchmark(
    name="dtype",
    sizes={
        "quick": {"requests": 4, "max_tokens": 8, "golden": 8},
        "full": {"requests": 16, "max_tokens": 32, "golden": 72},
    },
    run=_dtype_rows,
)

BENCHMARKS = (SERVE, GATEWAY, INJECTION, DTYPE)
