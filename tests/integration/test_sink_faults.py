"""The feedback sink as its own process (`flywheel run feedback`) under faults: SIGKILLed several times
while inference.logged events stream in, and ClickHouse unavailable for a while. Afterwards ClickHouse
holds every event exactly once, counted without FINAL.

N defaults to a CI-sized 5000; the issue's figure (100k events, 3 kills) is one command:

    FLYWHEEL_FAULT_EVENTS=100000 .venv/bin/python -m pytest tests/integration/test_sink_faults.py -s -k sigkill

The sink owns its chDB data directory while it runs (one process per directory), so the counts are
read in a subprocess after the last sink has stopped. The process handling and read-outs are shared
with the ledger-based fault tests in tests/faults/.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from contracts.envelope import wrap
from contracts.events import InferenceLogged
from contracts.topics import topic_for
from tests.faults import support as faults
from tests.faults.support import ServiceProcess, eventually, read_stored

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EVENTS = int(os.environ.get("FLYWHEEL_FAULT_EVENTS", "5000"))
KILLS = 3
GROUP = "feedback"


def sink_process(tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, **extra_env: str) -> ServiceProcess:
    """`flywheel run feedback` in a subprocess with its own home and port; stopped by pid, always."""
    return ServiceProcess(tmp_path, kafka_bootstrap, topic_prefix, ["feedback"], home=tmp_path / "home", **extra_env)


async def group_lag(bootstrap: str, topic: str) -> int:
    """Records of `topic` the sink's group has not committed yet."""
    return await faults.group_lag(bootstrap, GROUP, [topic])


class Stream:
    """Publishes `total` inference.logged events in paced chunks, so that they arrive across restarts."""

    def __init__(self, bootstrap: str, topic_prefix: str, total: int, chunk: int, pause_s: float) -> None:
        self.bootstrap, self.topic = bootstrap, topic_for(InferenceLogged, topic_prefix)
        self.total, self.chunk, self.pause_s = total, chunk, pause_s
        self.sent = 0

    async def run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=20, max_batch_size=256 * 1024
        )
        await producer.start()
        try:
            while self.sent < self.total:
                n = min(self.chunk, self.total - self.sent)
                futures = []
                for i in range(self.sent, self.sent + n):
                    envelope = wrap(
                        InferenceLogged(
                            inference_id=f"inf-{i}",
                            model_name="smollm2",
                            prompt_tokens=10,
                            completion_tokens=5,
                            latency_total_ms=float(i % 997),
                        ),
                        producer="fault-test",
                    )
                    futures.append(
                        await producer.send(self.topic, envelope.model_dump_json().encode(), key=f"inf-{i}".encode())
                    )
                await asyncio.gather(*futures)
                self.sent += n
                await asyncio.sleep(self.pause_s)
        finally:
            await producer.stop()


def print_figures(title: str, figures: dict[str, object]) -> None:
    print(f"\n{title}")
    for name, value in figures.items():
        print(f"  {name:<12} {value:>10}")


async def drain_and_count(sink: ServiceProcess, bootstrap: str, topic: str, timeout_s: float) -> tuple[int, int]:
    """Wait until the group has committed every record of `topic`, stop the sink, and count the stored rows."""
    deadline = time.monotonic() + timeout_s
    while (lag := await group_lag(bootstrap, topic)) > 0:
        assert sink.process is not None and sink.process.poll() is None, f"the sink exited:\n{sink.log_tail()}"
        assert time.monotonic() < deadline, f"lag still {lag} after {timeout_s:.0f}s:\n{sink.log_tail()}"
        await asyncio.sleep(1.0)
    sink.stop()
    stored = (await asyncio.to_thread(read_stored, sink.home, ["inference_log"]))["inference_log"]
    return stored.rows, len(stored.event_ids)


async def test_sigkill_while_events_stream_in_loses_and_duplicates_nothing(
    tmp_path: Path, kafka_bootstrap: str, topics: str
) -> None:
    topic = topic_for(InferenceLogged, topics)
    sink = sink_process(tmp_path, kafka_bootstrap, topics)
    # About KILLS + 1 sink lifetimes of streaming: each chunk lands while some sink is up, down or starting.
    stream = Stream(kafka_bootstrap, topics, EVENTS, chunk=max(EVENTS // 40, 50), pause_s=0.25)
    kills = 0
    lag_at_kills: list[int] = []  # records left uncommitted by each kill (and sent just after it)
    producing = asyncio.create_task(stream.run())
    try:
        for _ in range(KILLS):
            sink.start()
            await sink.wait_ready()
            # Kill mid-stream: after the sink has been consuming for a moment, at a random point in a batch.
            before = stream.sent
            await eventually(
                lambda b=before: stream.sent >= min(EVENTS, b + EVENTS // 8) or producing.done(),
                120,
                "more events streamed in",
            )
            # The sink keeps up between chunks; killing just after a chunk lands hits it mid-batch.
            landed = stream.sent
            while stream.sent == landed and not producing.done():
                await asyncio.sleep(0.01)
            await asyncio.sleep(random.uniform(0.0, 0.2))
            sink.kill()
            kills += 1
            lag_at_kills.append(await group_lag(kafka_bootstrap, topic))
        sink.start()
        await sink.wait_ready()
        await asyncio.wait_for(producing, 600)
        stored, distinct = await drain_and_count(sink, kafka_bootstrap, topic, timeout_s=600)
    finally:
        producing.cancel()
        sink.stop()
    print_figures(
        f"SIGKILL test ({sink.started} sink starts)",
        {
            "sent": stream.sent,
            "stored": stored,
            "lost": stream.sent - distinct,
            "duplicated": stored - distinct,
            "kills": kills,
            "uncommitted": ",".join(map(str, lag_at_kills)),
        },
    )
    assert stream.sent == EVENTS
    assert kills == KILLS
    assert (stored, distinct) == (EVENTS, EVENTS), f"lost {EVENTS - distinct}, duplicated {stored - distinct}"


async def test_clickhouse_unavailable_while_events_stream_in_then_back_loses_and_duplicates_nothing(
    tmp_path: Path, kafka_bootstrap: str, topics: str
) -> None:
    topic = topic_for(InferenceLogged, topics)
    outage = tmp_path / "clickhouse-down"
    sink = sink_process(
        tmp_path,
        kafka_bootstrap,
        topics,
        FLYWHEEL_FAILPOINTS=f"feedback.clickhouse_unavailable=fail-while-exists:{outage}",
    )
    total = min(EVENTS, 3000)
    stream = Stream(kafka_bootstrap, topics, total, chunk=max(total // 20, 50), pause_s=0.25)
    producing: asyncio.Task[None] | None = None
    try:
        sink.start()
        await sink.wait_ready()
        producing = asyncio.create_task(stream.run())
        await eventually(lambda: stream.sent >= total // 4, 120, "a quarter of the events streamed in", alive=sink)
        outage.touch()  # ClickHouse goes away while events keep coming
        await eventually(lambda: sink.ready() == 503, 30, "the sink to report ClickHouse unavailable", alive=sink)
        sent_at_outage = stream.sent
        await eventually(
            lambda: stream.sent >= min(total, sent_at_outage + total // 4),
            120,
            "events streamed in during the outage",
            alive=sink,
        )
        await asyncio.sleep(3.0)  # a few retry rounds of the batch in flight
        lag_during_outage = await group_lag(kafka_bootstrap, topic)
        assert lag_during_outage > 0, "nothing was waiting during the outage: the failpoint did not hold the sink"
        outage.unlink()  # ClickHouse is back; the sink catches up by itself
        await asyncio.wait_for(producing, 300)
        stored, distinct = await drain_and_count(sink, kafka_bootstrap, topic, timeout_s=300)
    finally:
        if producing is not None:
            producing.cancel()
        sink.stop()
    retried = sink.log.read_text(errors="replace").count("ClickHouse unavailable")
    print_figures(
        "ClickHouse outage test",
        {
            "sent": stream.sent,
            "stored": stored,
            "lost": stream.sent - distinct,
            "duplicated": stored - distinct,
            "lag_in_outage": lag_during_outage,
            "retries_logged": retried,
        },
    )
    assert retried > 0, "the sink never logged a retry while ClickHouse was unavailable"
    assert (stored, distinct) == (total, total), f"lost {total - distinct}, duplicated {stored - distinct}"
