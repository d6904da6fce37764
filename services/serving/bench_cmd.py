"""The `flywheel bench` command group; `serve` measures serving (services/serving/bench.py)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks that print ratios measured in one run.", no_args_is_help=True)


@app.command("serve")
def serve(
    requests: int = typer.Option(32, min=1, help="Requests per measurement."),
    max_tokens: int = typer.Option(8, min=1, help="New tokens per request."),
    concurrency: list[int] = typer.Option([1, 8, 32], help="Client concurrency levels (repeat the option)."),
    adapters: int = typer.Option(8, min=1, help="LoRA adapters for the mixed-batch comparison."),
) -> None:
    """Triton dynamic batching vs per-request generate; mixed adapters vs swapping; gateway overhead."""
    from services.serving.bench import run_bench

    run_bench(requests=requests, max_tokens=max_tokens, concurrencies=tuple(concurrency), adapters=adapters, echo=typer.echo)
