"""`flywheel bench all`: every service's benchmark in one run, one table of ratios against baselines
measured in the same run, with a description of the machine, written to bench/results/ (markdown and json).

Each benchmark is its service's (`flywheel bench train|serve|ingest|traces`, in services/<name>/cli.py, each
declaring its BENCHMARKS): this group holds `all` and gets the services' bench commands when main.py mounts
them. Timings are never asserted anywhere: only ratios measured side by side on one machine in one run
mean something.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from services.cli.service_commands import benchmarks
from services.runtime.bench import Row, machine, machine_line
from services.runtime.errors import ConfigurationError

app = typer.Typer(help="Benchmarks that print ratios measured side by side in one run.", no_args_is_help=True)

RESULTS = Path("bench/results")


def to_markdown(
    rows: list[Row], described: dict[str, Any], size: str, started: datetime, seconds: float, ran: list[str]
) -> str:
    not_run = [name for name in benchmarks() if name not in ran]
    out = [
        f"# flywheel bench all ({size}) - {started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s",
        "",
        f"Benchmarks run: {', '.join(ran)}" + (f"; not run this time: {', '.join(not_run)}" if not_run else "") + ".",
        "",
        machine_line(described),
        "",
        "| benchmark | measure | flywheel | baseline | ratio flywheel/baseline | better |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error:
            out.append(f"| {row.benchmark} | {row.measure} | failed: {row.error} | | | |")
            continue
        flywheel = f"{row.flywheel:,.1f} {row.unit}" + (f" ({row.flywheel_label})" if row.flywheel_label else "")
        baseline = (
            f"{row.baseline:,.1f} {row.unit}" + (f" ({row.baseline_label})" if row.baseline_label else "")
            if row.baseline is not None
            else "-"
        )
        ratio = f"**{_ratio(row.ratio)}x**" if row.ratio is not None else "-"
        out.append(f"| {row.benchmark} | {row.measure} | {flywheel} | {baseline} | {ratio} | {row.better} |")
    return "\n".join(out) + "\n"


def _ratio(ratio: float) -> str:
    # Two decimals, or three significant digits below 0.01: a cache hit's 0.005x is not 0.00x.
    return f"{ratio:.2f}" if ratio >= 0.01 else f"{ratio:.3g}"


@app.command("all")
def all_benchmarks(
    quick: bool = typer.Option(False, "--quick", help="The CI size: small inputs, minutes instead of tens of minutes."),
    only: list[str] = typer.Option(
        [],
        help="Run only these benchmarks (train, serve, gateway, injection, dtype, ingest, traces; repeat the option).",
    ),
    out: Path = typer.Option(RESULTS, help="Where the markdown and json tables go."),
) -> None:
    """Train, serve, gateway, injection, dtype, ingest and traces benchmarks; one table of ratios with the machine's description in bench/results/."""
    size = "quick" if quick else "full"
    known = benchmarks()
    unknown = sorted(set(only) - set(known))
    if unknown:
        raise ConfigurationError(f"--only: unknown benchmark {', '.join(unknown)}; choose from {', '.join(known)}")
    started, clock = datetime.now(UTC), time.monotonic()
    described = machine()
    rows: list[Row] = []
    ran = [name for name in known if not only or name in only]
    for name in ran:
        typer.echo(f"== bench {name} ({size})")
        try:
            rows.extend(known[name].run(known[name].sizes[size], typer.echo))
        except Exception as error:  # noqa: BLE001 - a failed benchmark is a row of the table, the others still run
            rows.append(Row(name, "-", None, None, "", "", error=f"{type(error).__name__}: {error}"))
    seconds = time.monotonic() - clock
    markdown = to_markdown(rows, described, size, started, seconds, ran)
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"{started:%Y%m%dT%H%M%SZ}-{size}"
    document = {
        "size": size,
        "benchmarks": ran,
        "started_at": started.isoformat(),
        "seconds": seconds,
        "machine": described,
        "rows": [asdict(row) | {"ratio": row.ratio} for row in rows],
    }
    for name in (stamp, f"latest-{size}"):
        (out / f"{name}.md").write_text(markdown)
        (out / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    typer.echo("\n" + markdown)
    typer.echo(f"written to {out / (stamp + '.md')} and {out / (stamp + '.json')}")
    if any(row.error for row in rows):
        raise typer.Exit(1)
