"""Network and broker faults between the services and Kafka, with the sink as its own process and every
client going through the TCP proxy the broker advertises: added latency, connection resets, a blackhole
longer than the producer's request timeout, and a broker stop/restart, while inference.logged and
feedback.received stream in. Afterwards every acknowledged event is in ClickHouse exactly once
(read without FINAL). Sends the broker never acknowledged are indeterminate and only counted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

GROUP = "feedback"


async def test_latency_resets_blackhole_and_broker_restart_lose_and_duplicate_nothing(
    tmp_path: Path, proxied: ProxiedKafka, proxied_topics: str
) -> None:
    topics = [topic_for(event, proxied_topics) for event in TABLES]
    ledger = Ledger()
    total = size(4000, 60_000)
    producer = LedgerProducer(
        proxied.bootstrap,
        proxied_topics,
        ledger,
        total=total,
        chunk=max(total // 120, 25),
        pause_s=0.4,
        request_timeout_ms=10_000,
    )
    sink = ServiceProcess(tmp_path, proxied.bootstrap, proxied_topics)
    proxy = proxied.proxy
    recovery: dict[str, float] = {}
    notes: dict[str, object] = {}
    producing: asyncio.Task[None] | None = None

    async def streamed(fraction: float) -> None:
        await eventually(
            lambda: producer.sent >= total * fraction or producing.done(),
            600,
            f"{fraction:.0%} of the events streamed in",
            alive=sink,
        )

    try:
        sink.start()
        await sink.wait_ready()
        producing = asyncio.create_task(producer.run())

        await streamed(0.1)
        proxy.proxy.latency_s = 0.3  # each direction, each chunk
        await asyncio.sleep(8)
        proxy.heal()
        recovery["latency 300 ms x 8 s"] = await catch_up(sink, proxied.bootstrap, GROUP, topics, 300)

        await streamed(0.3)
        cut = 0
        for _ in range(3):
            cut += await asyncio.to_thread(proxy.reset_all)
            await asyncio.sleep(2)
        notes["connections reset"] = cut
        recovery["3 rounds of resets"] = await catch_up(sink, proxied.bootstrap, GROUP, topics, 300)

        await streamed(0.5)
        proxy.proxy.blackhole = True  # a partition: connections stay open, nothing gets through
        await asyncio.sleep(20)
        dropped = proxy.proxy.counters.dropped
        proxy.heal()
        await asyncio.to_thread(
            proxy.reset_all
        )  # the half-dead connections would otherwise wait for their own timeouts
        notes["bytes dropped by the blackhole"] = dropped
        recovery["blackhole 20 s"] = await catch_up(sink, proxied.bootstrap, GROUP, topics, 300)

        await streamed(0.7)
        down = time.monotonic()
        await asyncio.to_thread(proxied.restart_broker)
        notes["broker down (stop + start) s"] = f"{time.monotonic() - down:.1f}"
        recovery["broker restart"] = await catch_up(sink, proxied.bootstrap, GROUP, topics, 300)

        await asyncio.wait_for(producing, 900)
        await wait_drained(sink, proxied.bootstrap, GROUP, topics, 300)
        dlq = await dead_lettered(proxied.bootstrap, proxied_topics, TABLES)
        assert sink.running() and sink.started == 1, "the sink process died under network faults"
    finally:
        if producing is not None:
            producing.cancel()
        proxy.heal()
        sink.stop()
    stored = read_stored(sink.home)
    figures = [ledger.check(table, stored[table], dead_lettered=dlq) for table in TABLES.values()]
    notes["proxy"] = proxy.proxy.counters
    print_table(
        "network faults through the proxy: latency, resets, blackhole, broker restart", figures, notes, recovery
    )
    assert producer.sent == total
    for f in figures:
        assert f.acked > 0
        assert (f.lost, f.duplicated, f.unexpected, f.dead_lettered) == (0, 0, 0, 0), f
        # Sends that failed on a timeout may have landed anyway: they count as neither lost nor unexpected.
        assert f.acked <= f.distinct <= f.acked + f.failed, f
