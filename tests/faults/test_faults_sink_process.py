"""The feedback sink as its own process (`flywheel run feedback`) under process faults while inference.logged
and feedback.received stream in through the proxied broker: a crash at the named failpoint
`consumer.batch.after_handler` (the batch is in ClickHouse, its offsets are not committed), SIGSTOP for
longer than the group's session timeout (the group moves on without it; its commit then fails), and
SIGKILL at a random moment. Every acknowledged event is then in ClickHouse exactly once, read without FINAL.

Builds on tests/integration/test_sink_faults.py (SIGKILLs and a ClickHouse outage on one topic, counts
only); this one keeps a ledger of every event id across both topics.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import httpx
import pytest

from contracts.topics import topic_for
from tests.faults.conftest import ProxiedKafka
from tests.faults.support import (
    TABLES,
    Ledger,
    LedgerProducer,
    ServiceProcess,
    catch_up,
    dead_lettered,
    eventually,
    print_table,
    read_stored,
    size,
    wait_drained,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

GROUP = "feedback"
# aiokafka's default session timeout is 10 s: a consumer stopped for longer is dropped from the group.
STOPPED_S = 15.0


async def test_failpoint_crash_sigstop_and_sigkill_of_the_sink_lose_and_duplicate_nothing(
    tmp_path: Path, proxied: ProxiedKafka, proxied_topics: str
) -> None:
    topics = [topic_for(event, proxied_topics) for event in TABLES]
    ledger = Ledger()
    total = size(3000, 50_000)
    producer = LedgerProducer(
        proxied.bootstrap, proxied_topics, ledger, total=total, chunk=max(total // 60, 25), pause_s=0.5
    )
    sink = ServiceProcess(
        tmp_path, proxied.bootstrap, proxied_topics, FLYWHEEL_FAILPOINTS="consumer.batch.after_handler=crash@4"
    )
    recovery: dict[str, float] = {}
    producing: asyncio.Task[None] | None = None
    try:
        sink.start()
        await sink.wait_ready()
        producing = asyncio.create_task(producer.run())

        # 1. The failpoint kills the sink after its 4th stored batch, before that batch's commit.
        await eventually(lambda: not sink.running(), 180, "the failpoint to kill the sink")
        assert sink.process is not None and sink.process.returncode == -signal.SIGKILL, sink.log_tail()
        assert sink.log_count("failpoint consumer.batch.after_handler: crashing") == 1
        del sink.env["FLYWHEEL_FAILPOINTS"]
        sink.start()
        recovery["failpoint_crash"] = await sink.wait_ready() + await catch_up(
            sink, proxied.bootstrap, GROUP, topics, 300
        )
        # The crashed batch was stored but not committed: the new sink got it again and stored none of it twice.
        redelivered = already_stored(sink)
        assert redelivered > 0, (
            "the batch stored before the crash was not redelivered: the failpoint hit after the commit?"
        )

        # 2. SIGSTOP past the session timeout: the group drops the sink mid-batch; SIGCONT, it rejoins.
        await eventually(
            lambda: producer.sent >= total // 2 or producing.done(), 300, "half the events streamed in", alive=sink
        )
        sink.signal(signal.SIGSTOP)
        await asyncio.sleep(STOPPED_S)
        sink.signal(signal.SIGCONT)
        recovery["sigstop"] = await catch_up(sink, proxied.bootstrap, GROUP, topics, 300)

        # 3. SIGKILL at a random moment while events stream in; restart.
        await asyncio.sleep(random.uniform(0.5, 3.0))
        sink.kill()
        killed_at = time.monotonic()
        sink.start()
        await sink.wait_ready()
        await catch_up(sink, proxied.bootstrap, GROUP, topics, 300)
        recovery["sigkill"] = time.monotonic() - killed_at

        await asyncio.wait_for(producing, 900)
        await wait_drained(sink, proxied.bootstrap, GROUP, topics, 300)
        dlq = await dead_lettered(proxied.bootstrap, proxied_topics, TABLES)
    finally:
        if producing is not None:
            producing.cancel()
        sink.stop()
    stored = read_stored(sink.home)
    figures = [ledger.check(table, stored[table], dead_lettered=dlq) for table in TABLES.values()]
    print_table(
        "sink process faults: failpoint crash after insert before commit, SIGSTOP 15 s, SIGKILL",
        figures,
        {
            "sink starts": sink.started,
            "events redelivered after the failpoint crash, found already stored": redelivered,
            "commits refused after SIGSTOP (logged)": sink.log_count("commit after a batch"),
        },
        recovery,
    )
    assert producer.sent == total
    for f in figures:
        assert f.acked > 0 and f.failed == 0, f"the broker refused sends with no network fault: {f}"
        assert (f.lost, f.duplicated, f.unexpected, f.dead_lettered) == (0, 0, 0, 0), f
        assert f.stored == f.acked, f


def already_stored(sink: ServiceProcess) -> int:
    """Events this sink process received that ClickHouse already held (its Prometheus counter)."""
    metrics = httpx.get(f"{sink.url}/metrics", timeout=10).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("flywheel_sink_rows_total{") and 'outcome="already_stored"' in line
        )
    )
