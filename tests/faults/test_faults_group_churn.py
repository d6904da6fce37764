"""Consumers joining and leaving the sink's group every few seconds while inference.logged and
feedback.received (6 partitions each) stream in: partitions move under batches in flight, commits
after a rebalance are refused. Nothing acknowledged may be lost, nothing stored twice (read without
FINAL), and no member may crash on CommitFailedError.

The members are sink consumers in this process (each its own broker connection and group member) over
one ClickHouse database, as several sink processes share one ClickHouse server in production; embedded
chDB cannot be opened by two processes, hence one process here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest
from faststream.kafka import KafkaBroker

from services.feedback.handlers import BATCH_HANDLERS
from services.runtime.privacy import Redactor
from services.feedback.service import Sink
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.broker import create_broker
from services.runtime.consumer import DeadLetters
from services.runtime.service import subscribe_batches
from services.runtime.settings import FlywheelSettings
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.faults.conftest import ProxiedKafka
from tests.faults.support import (
    TABLES,
    Ledger,
    LedgerProducer,
    StoredCount,
    dead_lettered,
    eventually,
    print_table,
    size,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

GROUP = "feedback-churn"
CHURN_EVERY_S = 3.0
CHURNS = 8


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def count(self, text: str, level: int = logging.WARNING) -> int:
        return sum(
            1
            for r in self.records
            if r.levelno >= level and (text in r.getMessage() or (r.exc_info and text in repr(r.exc_info[1])))
        )


async def test_members_joining_and_leaving_every_few_seconds_lose_and_duplicate_nothing(
    tmp_path: Path, proxied: ProxiedKafka, proxied_topics: str, chdb_target: ClickHouseTarget
) -> None:
    clickhouse = chdb_target.open()
    clickhouse.migrate()
    store = FeedbackStore(lambda: clickhouse)
    sink = Sink(store, Redactor())
    settings = FlywheelSettings(
        home=tmp_path, kafka_bootstrap=proxied.bootstrap, topic_prefix=proxied_topics, shutdown_grace_s=5.0
    )
    feedback = FeedbackSettings(batch_max_records=200, batch_max_wait_ms=200)
    ledger = Ledger()
    total = size(3000, 40_000)
    producer = LedgerProducer(
        proxied.bootstrap, proxied_topics, ledger, total=total, chunk=max(total // 80, 20), pause_s=0.3
    )
    records = Records()
    watched = [logging.getLogger(name) for name in ("flywheel", "aiokafka", "faststream")]
    for logger in watched:
        logger.addHandler(records)

    members: list[KafkaBroker] = []
    joins = leaves = 0

    async def join() -> None:
        nonlocal joins
        broker = create_broker(settings, client_id=f"churn-{joins}")
        subscribe_batches(
            broker,
            BATCH_HANDLERS,
            sink,
            group=GROUP,
            dead_letters=DeadLetters(broker),
            topic_prefix=proxied_topics,
            max_retries=2,
            **feedback.batch_options(),
        )
        await broker.start()
        members.append(broker)
        joins += 1

    async def leave() -> None:
        nonlocal leaves
        broker = members.pop(random.randrange(len(members)))
        await broker.stop()
        leaves += 1

    producing = asyncio.create_task(producer.run())
    try:
        await join()
        while not producing.done() or joins + leaves < CHURNS:
            await asyncio.sleep(CHURN_EVERY_S)
            if len(members) < 2 or (len(members) < 4 and random.random() < 0.5):
                await join()
            else:
                await leave()
        await producing
        while len(members) > 1:
            await leave()

        def drained() -> bool:
            return all(store.count(table)[1] >= len(ledger.acked(table)) for table in TABLES.values())

        await eventually(drained, 300, "the remaining member to store every acknowledged event")
        await asyncio.sleep(2.0)  # a late duplicate would land now
        dlq = await dead_lettered(proxied.bootstrap, proxied_topics, TABLES)
    finally:
        producing.cancel()
        for broker in members:
            await broker.stop()
        for logger in watched:
            logger.removeHandler(records)

    figures = []
    for table in TABLES.values():
        ids = {row["id"] for row in clickhouse.query(f"SELECT toString(event_id) AS id FROM {table}")}
        figures.append(ledger.check(table, StoredCount(store.count(table)[0], ids), dead_lettered=dlq))
    refused_commits = records.count("commit after a batch")
    print_table(
        f"consumer group churn: a member joins or leaves every {CHURN_EVERY_S:.0f} s",
        figures,
        {
            "joins": joins,
            "leaves": leaves,
            "commits refused after a rebalance (handled)": refused_commits,
            "CommitFailedError escaping a handler": records.count("CommitFailedError", logging.ERROR),
        },
    )
    assert joins + leaves >= CHURNS and leaves >= 2, "too little churn to mean anything"
    assert records.count("CommitFailedError", logging.ERROR) == 0
    for f in figures:
        assert f.failed == 0 and f.acked == f.produced
        assert (f.lost, f.duplicated, f.unexpected, f.dead_lettered) == (0, 0, 0, 0), f
