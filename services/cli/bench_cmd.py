"""`flywheel bench ...`: benchmarks that print ratios against a baseline measured in the same run.

`train`, `serve` and `ingest` each run one benchmark of a service (services/trainer/bench.py,
services/serving/bench.py, services/feedback/bench.py); `all` runs the three and writes one table of
ratios with a description of the machine to bench/results/ (markdown and json). Timings are never
asserted anywhere: only ratios measured side by side on one machine in one run mean something.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli import train_cmd
from services.runtime.errors import ConfigurationError
from services.runtime.settings import FlywheelSettings, load_settings

app = typer.Typer(help="Benchmarks that print ratios measured side by side in one run.", no_args_is_help=True)
app.command("train")(train_cmd.bench_train)

RESULTS = Path("bench/results")


@app.command("serve")
def serve(
    requests: int = typer.Option(32, min=1, help="Requests per measurement."),
    max_tokens: int = typer.Option(8, min=1, help="New tokens per request."),
    concurrency: list[int] = typer.Option([1, 8, 32], help="Client concurrency levels (repeat the option)."),
    adapters: int = typer.Option(8, min=1, help="LoRA adapters for the mixed-batch comparison."),
) -> None:
    """Triton continuous batching vs per-request generate; mixed adapters vs swapping; gateway overhead."""
    from services.serving.bench import run_bench

    run_bench(requests=requests, max_tokens=max_tokens, concurrencies=tuple(concurrency), adapters=adapters, echo=typer.echo)


@app.command("ingest")
def ingest(
    events: Annotated[int, typer.Option(min=1, help="Events published and stored through the batched sink.")] = 50_000,
    baseline_events: Annotated[int, typer.Option(min=1, help="Events stored one insert each, for the baseline.")] = 2_000,
    steady_rate: Annotated[int, typer.Option(min=0, help="Events/s of the steady-load phase that measures lag (0 skips it).")] = 1_000,
    steady_seconds: Annotated[float, typer.Option(min=0, help="Length of the steady-load phase.")] = 10.0,
) -> None:
    """Events/s from Kafka into ClickHouse through the batched sink vs one insert per event, same run."""
    from services.feedback.settings import FeedbackSettings

    settings = load_settings(FlywheelSettings)
    feedback = load_settings(FeedbackSettings)
    result = _ingest(settings, events=events, baseline_events=min(baseline_events, events), steady_rate=steady_rate, steady_seconds=steady_seconds)
    typer.echo(f"batched sink:     {result.events} events in {result.sink_seconds:.2f}s = {result.sink_rate:,.0f} events/s (batches up to {feedback.batch_max_records}, wait {feedback.batch_max_wait_ms} ms)")
    typer.echo(f"per-event insert: {result.baseline_events} events in {result.baseline_seconds:.2f}s = {result.baseline_rate:,.0f} events/s")
    typer.echo(f"ratio:            {result.sink_rate / result.baseline_rate:.1f}x")
    if result.steady is not None:
        lag = result.steady
        typer.echo(
            f"steady load:      {lag.rate} events/s for {steady_seconds:.0f}s ({lag.sent} events): lag p50 {lag.quantile(0.5)}, "
            f"p95 {lag.quantile(0.95)}, max {max(lag.samples, default=0)} events published but not yet stored; "
            f"drained {lag.drain_seconds:.2f}s after the last one"
        )


def _ingest(settings: FlywheelSettings, **sizes: Any) -> Any:
    from services.feedback.bench import ingest_benchmark
    from services.feedback.settings import FeedbackSettings

    return asyncio.run(ingest_benchmark(settings, load_settings(FeedbackSettings), **sizes))


# ------------------------------------------------------------------------------------------ bench all


@dataclass
class Row:
    benchmark: str
    measure: str
    flywheel: float | None
    baseline: float | None
    unit: str
    better: str  # "higher" or "lower": which direction of flywheel/baseline is the improvement
    flywheel_label: str = ""
    baseline_label: str = ""
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.flywheel is None or not self.baseline:
            return None
        return self.flywheel / self.baseline


SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "train": {"rows": 16, "steps": 2, "batch_size": 4, "max_seq_length": 256, "rounds": 1},
        "serve": {"requests": 8, "max_tokens": 8, "concurrencies": (1, 8), "adapters": 4},
        "ingest": {"events": 5_000, "baseline_events": 500, "steady_rate": 0, "steady_seconds": 0.0},
    },
    "full": {
        "train": {"rows": 96, "steps": 6, "batch_size": 8, "max_seq_length": 256, "rounds": 2},
        "serve": {"requests": 32, "max_tokens": 8, "concurrencies": (1, 8, 32), "adapters": 8},
        "ingest": {"events": 50_000, "baseline_events": 2_000, "steady_rate": 1_000, "steady_seconds": 10.0},
    },
}


def bench_train(size: dict[str, Any], echo: Callable[[str], None]) -> list[Row]:
    from services.trainer.bench import run_bench
    from services.trainer.model import free_cpu_threads

    results = run_bench(train_cmd.default_model_dir(), train_cmd.DEMO_DATA / "train.jsonl", threads=free_cpu_threads(), echo=echo, **size)
    trainer, baseline = results["trainer"], results["baseline"]
    labels = {"flywheel_label": "trainer (packed, masked)", "baseline_label": "transformers Trainer + peft"}
    shape = f"{size['rows']} rows, {size['steps']} steps of {size['batch_size']}, {size['rounds']} round(s), {trainer['device']}"
    return [
        Row("train", f"tokens/s ({shape})", trainer["tokens_per_second"], baseline["tokens_per_second"], "tokens/s", "higher", **labels),
        # On a shared CPU the wall clock mostly measures the scheduler's share; CPU time measures the work.
        Row("train", "tokens per CPU-second", trainer["tokens_per_cpu_second"], baseline["tokens_per_cpu_second"], "tokens/CPU-s", "higher", **labels),
        Row("train", "peak memory", trainer["peak_mb"], baseline["peak_mb"], "MB", "lower", **labels),
    ]


_THROUGHPUT = re.compile(r"^(per-request generate|Triton continuous batching), concurrency (\d+)\s+([\d.]+) req/s\s+p50\s+([\d.]+) ms")
_SWITCH = re.compile(r"mixed batches: ([\d.]+) s, switching: ([\d.]+) s")
_LATENCY = re.compile(r"^(direct Triton gRPC stream|through the gateway[^\d]*?)\s+([\d.]+) req/s\s+p50\s+([\d.]+) ms")


def bench_serve(size: dict[str, Any], echo: Callable[[str], None]) -> list[Row]:
    """Runs the serving benchmark and reads its printed figures (it prints, it does not return them)."""
    from services.serving.bench import run_bench

    lines: list[str] = []

    def keep(line: str) -> None:
        lines.extend(line.splitlines())
        echo(line)

    run_bench(echo=keep, **size)
    return serve_rows(lines, size)


def serve_rows(lines: list[str], size: dict[str, Any]) -> list[Row]:
    """The table rows in the serving benchmark's printed figures."""
    rows: list[Row] = []
    throughput: dict[str, dict[str, float]] = {}
    latency: dict[str, float] = {}
    for line in lines:
        if match := _THROUGHPUT.match(line.strip()):
            throughput.setdefault(match[2], {})[match[1]] = float(match[3])
        elif match := _SWITCH.search(line):
            rows.append(Row("serve", f"seconds for {size['requests']} requests over {size['adapters']} LoRA adapters", float(match[1]), float(match[2]), "s", "lower",
                            "mixed-adapter batches", "one request at a time, adapter switched"))
        elif match := _LATENCY.match(line.strip()):
            latency["gateway" if match[1].startswith("through") else "direct"] = float(match[3])
    for concurrency, sides in throughput.items():
        rows.append(Row("serve", f"throughput, {size['requests']} requests x {size['max_tokens']} tokens, concurrency {concurrency}",
                        sides.get("Triton continuous batching"), sides.get("per-request generate"), "req/s", "higher",
                        "Triton continuous batching", "per-request generate"))
    if latency:
        rows.append(Row("serve", "p50 latency, concurrency 1", latency.get("gateway"), latency.get("direct"), "ms", "lower",
                        "through the OpenAI gateway", "direct Triton gRPC (overhead: ratio above 1)"))
    if not rows:
        raise RuntimeError("the serving benchmark printed no figures this command recognises")
    return rows


def bench_ingest(size: dict[str, Any], echo: Callable[[str], None]) -> list[Row]:
    settings = load_settings(FlywheelSettings)
    kafka = None
    scratch = None
    if not settings.kafka_bootstrap and not (settings.infra_dir / "kafka" / "state.json").exists():
        from infra.local_kafka import LocalKafka

        scratch = tempfile.TemporaryDirectory(prefix="flywheel-bench-")
        kafka = LocalKafka(Path(scratch.name), settings.cache)
        echo("starting a local Apache Kafka broker for the ingest benchmark")
        settings = settings.model_copy(update={"kafka_bootstrap": kafka.start(), "home": Path(scratch.name)})
    try:
        result = _ingest(settings, **size)
    finally:
        if kafka is not None:
            kafka.stop()
        if scratch is not None:
            scratch.cleanup()
    echo(f"batched sink {result.sink_rate:,.0f} events/s, per-event insert {result.baseline_rate:,.0f} events/s")
    rows = [Row("ingest", f"Kafka -> ClickHouse events/s ({result.events} vs {result.baseline_events} events)", result.sink_rate, result.baseline_rate, "events/s", "higher",
                "batched idempotent sink (Arrow)", "one insert per event")]
    if result.steady is not None:
        rows.append(Row("ingest", f"lag p95 at {result.steady.rate} events/s (events published, not yet stored)", float(result.steady.quantile(0.95)), None, "events", "lower", "batched sink"))
    return rows


BENCHMARKS: dict[str, Callable[[dict[str, Any], Callable[[str], None]], list[Row]]] = {"train": bench_train, "serve": bench_serve, "ingest": bench_ingest}


def machine() -> dict[str, Any]:
    """What the figures were measured on: they compare only within one run on one machine."""
    import torch

    meminfo = Path("/proc/meminfo")
    total_kb = next((int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")), 0) if meminfo.exists() else 0
    memory = f"{total_kb / 2**20:.1f} GiB" if total_kb else None
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), cpu)
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "memory": memory,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def to_markdown(rows: list[Row], described: dict[str, Any], size: str, started: datetime, seconds: float, ran: list[str]) -> str:
    out = [
        f"# flywheel bench all ({size}) - {started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s",
        "",
        f"Benchmarks run: {', '.join(ran)}" + (f"; not run this time: {', '.join(name for name in BENCHMARKS if name not in ran)}" if len(ran) < len(BENCHMARKS) else "") + ".",
        "",
        f"Machine: {described['cpu']}, {described['cpu_count']} cores, {described['memory']} memory, GPU {described['gpu'] or 'none'}; "
        f"{described['platform']}; Python {described['python']}, torch {described['torch']}; load average at start {described['load_average']}.",
        "",
        "| benchmark | measure | flywheel | baseline | ratio flywheel/baseline | better |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error:
            out.append(f"| {row.benchmark} | {row.measure} | failed: {row.error} | | | |")
            continue
        flywheel = f"{row.flywheel:,.1f} {row.unit}" + (f" ({row.flywheel_label})" if row.flywheel_label else "")
        baseline = f"{row.baseline:,.1f} {row.unit}" + (f" ({row.baseline_label})" if row.baseline_label else "") if row.baseline is not None else "-"
        ratio = f"**{row.ratio:.2f}x**" if row.ratio is not None else "-"
        out.append(f"| {row.benchmark} | {row.measure} | {flywheel} | {baseline} | {ratio} | {row.better} |")
    return "\n".join(out) + "\n"


@app.command("all")
def all_benchmarks(
    quick: bool = typer.Option(False, "--quick", help="The CI size: small inputs, minutes instead of tens of minutes."),
    only: list[str] = typer.Option([], help="Run only these benchmarks (train, serve, ingest; repeat the option)."),
    out: Path = typer.Option(RESULTS, help="Where the markdown and json tables go."),
) -> None:
    """Train, serve and ingest benchmarks; one table of ratios with the machine's description in bench/results/."""
    size = "quick" if quick else "full"
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise ConfigurationError(f"--only: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    started, clock = datetime.now(UTC), time.monotonic()
    described = machine()
    rows: list[Row] = []
    ran = [name for name in BENCHMARKS if not only or name in only]
    for name in ran:
        run = BENCHMARKS[name]
        typer.echo(f"== bench {name} ({size})")
        try:
            rows.extend(run(SIZES[size][name], typer.echo))
        except Exception as error:  # noqa: BLE001 - a failed benchmark is a row of the table, the others still run
            rows.append(Row(name, "-", None, None, "", "", error=f"{type(error).__name__}: {error}"))
    seconds = time.monotonic() - clock
    markdown = to_markdown(rows, described, size, started, seconds, ran)
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"{started:%Y%m%dT%H%M%SZ}-{size}"
    document = {"size": size, "benchmarks": ran, "started_at": started.isoformat(), "seconds": seconds, "machine": described, "rows": [asdict(row) | {"ratio": row.ratio} for row in rows]}
    for name in (stamp, f"latest-{size}"):
        (out / f"{name}.md").write_text(markdown)
        (out / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    typer.echo("\n" + markdown)
    typer.echo(f"written to {out / (stamp + '.md')} and {out / (stamp + '.json')}")
    if any(row.error for row in rows):
        raise typer.Exit(1)
