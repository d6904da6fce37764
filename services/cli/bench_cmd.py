"""`flywheel bench ingest`: the sink's end-to-end ingest rate against a per-event insert baseline."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from services.runtime.settings import FlywheelSettings, load_settings


def ingest(
    events: Annotated[int, typer.Option(min=1, help="Events published and stored through the batched sink.")] = 50_000,
    baseline_events: Annotated[int, typer.Option(min=1, help="Events stored one insert each, for the baseline.")] = 2_000,
    steady_rate: Annotated[int, typer.Option(min=0, help="Events/s of the steady-load phase that measures lag (0 skips it).")] = 1_000,
    steady_seconds: Annotated[float, typer.Option(min=0, help="Length of the steady-load phase.")] = 10.0,
) -> None:
    """Events/s from Kafka into ClickHouse through the batched sink vs one insert per event, same run."""
    from services.feedback.bench import ingest_benchmark
    from services.feedback.settings import FeedbackSettings

    settings = load_settings(FlywheelSettings)
    feedback = load_settings(FeedbackSettings)
    result = asyncio.run(ingest_benchmark(settings, feedback, events=events, baseline_events=min(baseline_events, events), steady_rate=steady_rate, steady_seconds=steady_seconds))
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
