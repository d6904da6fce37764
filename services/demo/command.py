"""`flywheel demo`: a local Kafka (unless one is configured), the loop in one process, the report; and
the event loop it runs in, which SIGINT/SIGTERM stop gracefully (a second signal at once)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.demo.process import run_loop_in_process
from services.demo.report import LoopReport
from services.runtime.settings import FlywheelSettings, load_settings

console = Console(highlight=False)


def demo(
    home: Path = typer.Option(None, help="Data directory for this demo; default FLYWHEEL_HOME."),
    traffic: int = typer.Option(2, min=1, max=6, help="Requests per fact sent through the gateway in step 4."),
    step_timeout: float = typer.Option(
        3600.0,
        min=60,
        help="Seconds a step may wait for training or an evaluation (a shared CPU can need far more than the 20-minute target).",
    ),
    review: bool = typer.Option(
        False,
        "--review",
        help="Step 5 through a review queue: a rubric in the registry, a queue filled from step 4's traffic, two reviewers claiming and scoring its items.",
    ),
) -> None:
    """Run the loop end to end on real components (Kafka, ClickHouse, Triton, SmolLM2) and write a report."""
    overrides = {"home": home.resolve()} if home else {}
    settings = load_settings(FlywheelSettings, **overrides)
    settings = settings.model_copy(update={"home": settings.home.resolve()})
    report = LoopReport(started_at=datetime.now(UTC), home=str(settings.home))
    started = time.monotonic()
    kafka = None
    broker_started_here = False
    busy = 0
    interrupted = None
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
    ) as progress:
        try:
            task = progress.add_task("kafka: starting a local Apache Kafka broker", total=None)
            if settings.kafka_bootstrap:
                report.bootstrap = settings.kafka_bootstrap
            else:
                from infra.local_kafka import LocalKafka

                kafka = LocalKafka(settings.home, settings.cache)
                broker_started_here = not kafka.status().running
                report.bootstrap = kafka.start()
                report.cleanup.append(f"kafka broker pid {kafka.status().pid} at {report.bootstrap}")
            progress.update(task, description=f"kafka: ready at {report.bootstrap}", completed=1, total=1)
            busy, interrupted = _run_loop(
                run_loop_in_process(
                    settings.model_copy(update={"kafka_bootstrap": report.bootstrap}),
                    report,
                    progress,
                    traffic=traffic,
                    step_timeout=step_timeout,
                    review=review,
                )
            )
            if interrupted:
                report.cleanup.append(
                    f"interrupted by {interrupted}: the loop stopped where it was and every service was stopped"
                )
            if busy:
                report.cleanup.append(
                    f"{busy} worker thread(s) still busy after every service stopped (a training job the trainer's stop does not interrupt); "
                    "the demo exits without waiting: the job resumes from its last checkpoint on the next run"
                )
        finally:
            if kafka is not None and broker_started_here:
                task = progress.add_task("kafka: stopping the broker the demo started", total=None)
                kafka.stop()
                port = int(report.bootstrap.rsplit(":", 1)[1])
                from infra.processes import port_is_free

                report.cleanup.append(f"kafka stopped; port {port} {'free' if port_is_free(port) else 'STILL IN USE'}")
                progress.update(task, description="kafka: stopped", completed=1, total=1)
    report.seconds = time.monotonic() - started
    out = settings.home / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo-summary.txt").write_text(report.to_text())
    (out / "demo-report.html").write_text(report.to_html())
    console.print(report.to_text())
    console.print(f"report written to {out / 'demo-summary.txt'} and {out / 'demo-report.html'}")
    if busy:
        # Everything this process started is stopped and its report written; waiting for a thread no
        # service will stop would hold the demo for the rest of a training run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130 if interrupted else 0 if report.ok else 1)
    if interrupted:
        raise typer.Exit(130)
    if not report.ok:
        raise typer.Exit(1)


def _run_loop(main: Coroutine[Any, Any, None]) -> tuple[int, str | None]:
    """Run `main` until it ends or SIGINT/SIGTERM cancels it (a second one exits at once).

    Returns how many worker threads are still busy after it (they are not waited for) and the name
    of the signal that stopped it, if one did.
    """
    from services.runtime.service import force_exit

    executor = ThreadPoolExecutor(thread_name_prefix="flywheel-demo")
    loop = asyncio.new_event_loop()
    loop.set_default_executor(executor)
    task = loop.create_task(main, name="demo")
    received: list[int] = []

    def on_signal(sig: int) -> None:
        if received:
            force_exit(sig)
        received.append(sig)
        # Cancelling runs run_loop_in_process's finally: the services stop in order, the port is freed.
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    async def _cancel_leftovers() -> None:
        # A task still pending when the loop closes is reported as "Task was destroyed but it is pending!".
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}
        for leftover in leftovers:
            leftover.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    try:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not received:
                raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        loop.run_until_complete(_cancel_leftovers())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        executor.shutdown(wait=False, cancel_futures=True)

    def busy() -> int:
        return sum(
            1 for thread in threading.enumerate() if thread.name.startswith("flywheel-demo") and thread.is_alive()
        )

    deadline = time.monotonic() + 10  # idle workers exit once the shutdown wakes them
    while busy() and time.monotonic() < deadline:
        time.sleep(0.2)
    return busy(), signal.Signals(received[0]).name if received else None
