"""The serving service's part of the `flywheel` command, by group in `app` (services/cli/main.py mounts it,
finding this module by name): `flywheel bench serve`, serving's benchmark, also one of `flywheel bench all`'s."""

from __future__ import annotations

import re
from typing import Any

import typer

from services.runtime.bench import Benchmark, Echo, Row

app = typer.Typer()
bench_app = typer.Typer()
app.add_typer(bench_app, name="bench")


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
_LATENCY = re.compile(r"^(direct Triton gRPC stream|through the gateway[^\d]*?)\s+([\d.]+) req/s\s+p50\s+([\d.]+) ms")


def _serve_rows(size: dict[str, Any], echo: Echo) -> list[Row]:
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
BENCHMARKS = (SERVE,)
