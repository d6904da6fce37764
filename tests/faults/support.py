"""What the fault tests share: the ledger of produced events, service processes started and stopped by
pid, the reading of a stopped sink's ClickHouse, and the table of figures each test prints.

Sizes: CI runs a reduced size; `FLYWHEEL_FAULTS_SIZE=full` runs the full one:

    FLYWHEEL_FAULTS_SIZE=full .venv/bin/python -m pytest tests/faults -s
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from contracts.envelope import Envelope, wrap
from contracts.events import (
    EVENTS,
    AdapterRegistered,
    DatasetPublished,
    EvaluationCompleted,
    EvaluationRequested,
    FeedbackReceived,
    FeedbackReviewed,
    InferenceLogged,
    ModelRegistered,
    PromptPublished,
    SpanLogged,
    StageChanged,
    TrainingCompleted,
    TrainingRequested,
)
from contracts.publisher import encode
from contracts.topics import dlq_for, topic_for
from infra.processes import free_port

REPO = Path(__file__).resolve().parents[2]
FLYWHEEL = [str(Path(sys.executable).parent / "flywheel")]


# Malformed messages a consumer must dead-letter (`<topic>.dlq`) and go on; and which events each consumer
# group of the services the fault tests run (all but serving) consumes.
POISON = [b"not json at all", b"{}", json.dumps({"event_id": "not-a-uuid", "event_type": "x"}).encode(), b""]
POISON_KEY = b"poison"
GROUPS: dict[str, set[type]] = {
    "registry": {TrainingCompleted, EvaluationCompleted},
    "trainer": {TrainingRequested, ModelRegistered, DatasetPublished, AdapterRegistered},
    "evaluator": {
        ModelRegistered,
        DatasetPublished,
        StageChanged,
        PromptPublished,
        AdapterRegistered,
        EvaluationRequested,
    },
    "feedback": {InferenceLogged, FeedbackReceived, FeedbackReviewed, SpanLogged},
    "monitor": {StageChanged},
}
# Each group dead-letters each poison message of each topic it consumes, once.
EXPECTED_POISON = Counter(
    {(group, event.event_type): len(POISON) for group, events in GROUPS.items() for event in events}
)


async def send_poison(producer: AIOKafkaProducer, prefix: str) -> None:
    """POISON on every topic of the contract, keyed POISON_KEY so its dead letters can be told apart."""
    for event in EVENTS:
        for value in POISON:
            await producer.send_and_wait(topic_for(event, prefix), value=value, key=POISON_KEY)


def poison_dead_lettered(letters: Iterable[DeadLetter]) -> Counter[tuple[str, str]]:
    """(consumer group, event type) -> poison messages it dead-lettered."""
    return Counter((letter.group, letter.event_type) for letter in letters if letter.key == POISON_KEY)


FULL = os.environ.get("FLYWHEEL_FAULTS_SIZE", "ci") == "full"
TABLES = {InferenceLogged: "inference_log", FeedbackReceived: "feedback"}


def size(ci: int, full: int) -> int:
    """The CI size, or the full one under FLYWHEEL_FAULTS_SIZE=full."""
    return full if FULL else ci


# ---------------------------------------------------------------------------------------------- ledger


@dataclass
class Ledger:
    """Every event a test produced and what the broker answered: acked, failed, or not answered yet.

    A failed send is indeterminate (a timeout may hide a write that landed), so it counts neither as
    lost nor as unexpected; an acknowledged event must be stored exactly once.
    """

    outcomes: dict[str, dict[str, str]] = field(default_factory=lambda: {table: {} for table in TABLES.values()})

    def record(self, table: str, event_id: str, outcome: str) -> None:
        self.outcomes[table][event_id] = outcome

    def acked(self, table: str) -> set[str]:
        return {event_id for event_id, outcome in self.outcomes[table].items() if outcome == "acked"}

    def failed(self, table: str) -> set[str]:
        return {event_id for event_id, outcome in self.outcomes[table].items() if outcome == "failed"}

    def check(self, table: str, stored: StoredCount, dead_lettered: int = 0) -> Figures:
        """Jepsen-style: lost = acknowledged but absent; duplicated = rows - distinct event ids (no FINAL)."""
        produced = self.outcomes[table]
        acked = self.acked(table)
        return Figures(
            table=table,
            produced=len(produced),
            acked=len(acked),
            failed=len(self.failed(table)),
            stored=stored.rows,
            distinct=len(stored.event_ids),
            lost=len(acked - stored.event_ids),
            duplicated=stored.rows - len(stored.event_ids),
            unexpected=len(stored.event_ids - set(produced)),
            dead_lettered=dead_lettered,
        )


@dataclass
class Figures:
    table: str
    produced: int
    acked: int
    failed: int
    stored: int
    distinct: int
    lost: int
    duplicated: int
    unexpected: int
    dead_lettered: int = 0

    def row(self) -> list[str]:
        return [
            self.table,
            *(
                str(v)
                for v in (
                    self.produced,
                    self.acked,
                    self.failed,
                    self.stored,
                    self.lost,
                    self.duplicated,
                    self.unexpected,
                    self.dead_lettered,
                )
            ),
        ]


COLUMNS = ["table", "produced", "acked", "failed", "in_clickhouse", "lost", "duplicated", "unexpected", "dlq"]


def _print_rows(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def print_table(
    title: str,
    figures: Iterable[Figures],
    notes: dict[str, object] | None = None,
    recovery: dict[str, float] | None = None,
) -> None:
    """The figures of one fault test, printed for `pytest -s` and the CI log. `recovery`: seconds from
    the end of each fault until the consumers had caught up with everything produced before it ended."""
    print(f"\n== {title} ({'full' if FULL else 'ci'} size)")
    _print_rows([COLUMNS, *(f.row() for f in figures)])
    if recovery:
        _print_rows([["fault", "recover_s"], *([name, f"{seconds:.1f}"] for name, seconds in recovery.items())])
    for name, value in (notes or {}).items():
        print(f"  {name}: {value}")


def print_rows(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A table of a test's own (jobs, promotions ...), printed beside its figures."""
    print(f"\n== {title}")
    _print_rows([header, *([str(cell) for cell in row] for row in rows)])


def inference(i: int, run: str) -> InferenceLogged:
    return InferenceLogged(
        inference_id=f"{run}-inf-{i}",
        model_name="smollm2",
        prompt_tokens=10,
        completion_tokens=5,
        latency_total_ms=float(i % 997),
    )


def feedback(i: int, run: str) -> FeedbackReceived:
    return FeedbackReceived(
        inference_id=f"{run}-inf-{i}", thumbs="up" if i % 3 else "down", rating=1 + i % 5, comment=f"comment {i}"
    )


class LedgerProducer:
    """Publishes inference.logged and feedback.received in paced chunks and records each outcome."""

    def __init__(
        self,
        bootstrap: str,
        topic_prefix: str,
        ledger: Ledger,
        *,
        total: int,
        chunk: int,
        pause_s: float,
        feedback_every: int = 2,
        request_timeout_ms: int = 15_000,
    ) -> None:
        self.bootstrap, self.prefix, self.ledger = bootstrap, topic_prefix, ledger
        self.total, self.chunk, self.pause_s, self.feedback_every = total, chunk, pause_s, feedback_every
        self.request_timeout_ms = request_timeout_ms
        self.run_id = uuid.uuid4().hex[:6]
        self.sent = 0

    def _envelopes(self, i: int) -> list[Envelope]:
        out: list[Envelope] = [wrap(inference(i, self.run_id), producer="fault-test")]
        if i % self.feedback_every == 0:
            out.append(wrap(feedback(i, self.run_id), producer="fault-test"))
        return out

    async def run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=10,
            request_timeout_ms=self.request_timeout_ms,
            retry_backoff_ms=200,
        )
        await _start_retrying(producer)
        try:
            while self.sent < self.total:
                n = min(self.chunk, self.total - self.sent)
                pending: list[tuple[str, str, asyncio.Future]] = []
                for i in range(self.sent, self.sent + n):
                    for envelope in self._envelopes(i):
                        table = TABLES[type(envelope.payload)]
                        event_id = str(envelope.event_id)
                        self.ledger.record(table, event_id, "pending")
                        key, value, headers = encode(envelope)
                        try:
                            future = await producer.send(
                                topic_for(envelope.payload, self.prefix), value=value, key=key, headers=headers
                            )
                        except Exception:  # noqa: BLE001 - a refused send is a failed outcome, recorded
                            self.ledger.record(table, event_id, "failed")
                            continue
                        pending.append((table, event_id, future))
                for (table, event_id, _), result in zip(
                    pending, await asyncio.gather(*(f for _, _, f in pending), return_exceptions=True), strict=True
                ):
                    self.ledger.record(table, event_id, "failed" if isinstance(result, BaseException) else "acked")
                self.sent += n
                await asyncio.sleep(self.pause_s)
        finally:
            await producer.stop()


async def _start_retrying(
    client: AIOKafkaProducer | AIOKafkaConsumer | AIOKafkaAdminClient, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.start()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


# ------------------------------------------------------------------------------------------- processes


class ServiceProcess:
    """`flywheel run SERVICE` (or several services in one process) as a subprocess with its own home and
    port; stopped by pid, always. Several services in one process: chDB lets one process own a data
    directory, so the sink and the monitor must share one in embedded mode."""

    def __init__(
        self,
        workdir: Path,
        kafka_bootstrap: str,
        topic_prefix: str,
        services: Iterable[str] = ("feedback",),
        *,
        home: Path | None = None,
        **extra_env: str,
    ) -> None:
        self.services = list(services)
        name = "+".join(self.services)
        self.home = home or workdir / f"home-{name}"
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self.env = {
            **os.environ,
            "FLYWHEEL_HOME": str(self.home),
            "FLYWHEEL_HTTP_PORT": str(self.port),
            "FLYWHEEL_TOPIC_PREFIX": topic_prefix,
            "FLYWHEEL_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "FLYWHEEL_FEEDBACK_BATCH_MAX_RECORDS": "1000",
            "FLYWHEEL_FEEDBACK_BATCH_MAX_WAIT_MS": "200",
            "FLYWHEEL_SHUTDOWN_GRACE_S": "5",
            "PYTHONWARNINGS": "ignore",
            **extra_env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [*FLYWHEEL, "run", *self.services]

    def start(self) -> None:
        assert not self.running()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.started += 1

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> int | None:
        """The /readyz status code, or None while nothing answers."""
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code
        except httpx.HTTPError:
            return None

    async def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Seconds until /readyz answers 200."""
        started = time.monotonic()
        await eventually(
            lambda: self.ready() == 200, timeout_s, f"{'+'.join(self.services)} to answer /readyz", alive=self
        )
        return time.monotonic() - started

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(30)

    def stop(self) -> None:
        """SIGCONT (it may be stopped), SIGTERM and wait; SIGKILL if it does not stop. Safe when already stopped."""
        stop_all([self])

    def _ask_to_stop(self) -> bool:
        if not self.running():
            return False
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        os.kill(self.process.pid, signal.SIGTERM)
        return True

    def _wait_stopped(self, timeout_s: float) -> None:
        assert self.process is not None
        try:
            self.process.wait(max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def log_count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text) if self.log.exists() else 0

    def registry_beside(self) -> ServiceProcess:
        """A registry process in this process's home, with its environment: the doors of this one check
        API keys through it (found where it records its door under the home), as when a developer runs
        `flywheel run registry` beside `flywheel run SERVICE`. Services never open the registry's database."""
        extra = {
            name: value
            for name, value in self.env.items()
            if os.environ.get(name) != value
            and name not in ("FLYWHEEL_HOME", "FLYWHEEL_HTTP_PORT", "FLYWHEEL_TOPIC_PREFIX", "FLYWHEEL_KAFKA_BOOTSTRAP")
        }
        return ServiceProcess(
            self.log.parent,
            self.env["FLYWHEEL_KAFKA_BOOTSTRAP"],
            self.env["FLYWHEEL_TOPIC_PREFIX"],
            ["registry"],
            home=self.home,
            **extra,
        )


def stop_all(processes: Iterable[ServiceProcess], timeout_s: float = 60.0) -> None:
    """Stop several processes side by side: each graceful stop (its shutdown grace, its broker leaving the
    group) overlaps the others' instead of adding to them. SIGKILL for any still running at the deadline."""
    asked = [process for process in processes if process._ask_to_stop()]
    deadline = time.monotonic() + timeout_s
    for process in asked:
        process._wait_stopped(deadline - time.monotonic())


async def eventually(
    condition: Callable[[], object],
    timeout_s: float,
    what: str,
    alive: ServiceProcess | None = None,
    interval_s: float = 0.3,
) -> None:
    """Wait until `condition()` holds (run in a thread: it may block), failing early if `alive` exits."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if alive is not None and alive.process is not None and alive.process.poll() is not None:
            raise AssertionError(
                f"{alive.services} exited ({alive.process.returncode}) while waiting for {what}:\n{alive.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f}s waiting for {what}" + (f":\n{alive.log_tail()}" if alive else "")
            )
        await asyncio.sleep(interval_s)


# ------------------------------------------------------------------------------------- kafka read-outs


async def known_partitions(
    consumer: AIOKafkaConsumer, topics: Iterable[str], timeout_s: float = 30
) -> list[TopicPartition]:
    """Every partition of `topics`, once the broker lists each of them. A loaded broker may answer a
    metadata request before it lists a topic just created: read as having no partitions, that topic would
    pass for empty (no lag, no dead letters), so this asks again until each is known."""
    topics = list(topics)
    deadline = time.monotonic() + timeout_s
    while True:
        await consumer._client.force_metadata_update()  # noqa: SLF001 - a fresh consumer knows no topic until asked
        unknown = [topic for topic in topics if not consumer.partitions_for_topic(topic)]
        if not unknown:
            return [TopicPartition(topic, p) for topic in topics for p in consumer.partitions_for_topic(topic) or ()]
        assert time.monotonic() < deadline, f"topics unknown to the broker after {timeout_s:g} s: {unknown}"
        await asyncio.sleep(0.5)


async def group_lag(bootstrap: str, group: str, topics: Iterable[str]) -> int:
    """Records of `topics` that `group` has not committed yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        partitions = await known_partitions(consumer, topics)
        end = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
        return sum(end[tp] - max(committed[tp].offset, 0) if tp in committed else end[tp] for tp in partitions)
    finally:
        await consumer.stop()
        await admin.close()


async def topic_size(bootstrap: str, topic: str) -> int:
    """Records in `topic` (end minus beginning offsets of every partition)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        partitions = await known_partitions(consumer, [topic])
        end = await consumer.end_offsets(partitions)
        begin = await consumer.beginning_offsets(partitions)
        return sum(end[tp] - begin[tp] for tp in partitions)
    finally:
        await consumer.stop()


async def dead_lettered(bootstrap: str, prefix: str, events: Iterable[type]) -> int:
    return sum([await topic_size(bootstrap, dlq_for(topic_for(event, prefix))) for event in events])


@dataclass(frozen=True)
class DeadLetter:
    """One record of a `<topic>.dlq`: which consumer group gave up on which original record."""

    group: str
    event_type: str
    original: tuple[int, int]  # partition, offset in the original topic
    key: bytes | None


async def read_dead_letters(bootstrap: str, prefix: str, events: Iterable[type]) -> set[DeadLetter]:
    """Every record of the dead-letter topics of `events`. A set: a group killed between the dead-letter
    publish and its commit publishes the same original record again, which is one dead letter, not two."""
    topics = {dlq_for(topic_for(event, prefix)): event.event_type for event in events}  # type: ignore[attr-defined]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    letters: set[DeadLetter] = set()
    try:
        partitions = await known_partitions(consumer, topics)
        consumer.assign(partitions)
        end = await consumer.end_offsets(partitions)
        await consumer.seek_to_beginning(*partitions)
        while any([await consumer.position(tp) < end[tp] for tp in partitions]):
            for tp, records in (await consumer.getmany(timeout_ms=2000)).items():
                for record in records:
                    headers = {name: value.decode() for name, value in record.headers}
                    original = (
                        int(headers["x-flywheel-original-partition"]),
                        int(headers["x-flywheel-original-offset"]),
                    )
                    letters.add(
                        DeadLetter(headers["x-flywheel-consumer-group"], topics[tp.topic], original, record.key)
                    )
    finally:
        await consumer.stop()
    return letters


async def wait_drained(
    process: ServiceProcess, bootstrap: str, group: str, topics: list[str], timeout_s: float
) -> float:
    """Wait until `group` has committed every record of `topics`; seconds it took."""
    started = time.monotonic()
    while (lag := await group_lag(bootstrap, group, topics)) > 0:
        assert process.running(), f"{process.services} exited:\n{process.log_tail()}"
        assert time.monotonic() - started < timeout_s, f"lag still {lag} after {timeout_s:.0f}s:\n{process.log_tail()}"
        await asyncio.sleep(0.5)
    return time.monotonic() - started


# ------------------------------------------------------------------------------------ clickhouse reads


@dataclass
class StoredCount:
    rows: int
    event_ids: set[str]


READER = """
import json, sys
from pathlib import Path
from services.runtime.clickhouse import open_clickhouse
out = {}
with open_clickhouse(None, Path(sys.argv[1]), readonly=True) as store:
    for table in sys.argv[3:]:
        rows = store.query(f"SELECT count() AS n FROM {table}")[0]["n"]
        ids = [row["id"] for row in store.query(f"SELECT toString(event_id) AS id FROM {table}")]
        out[table] = {"rows": int(rows), "ids": ids}
Path(sys.argv[2]).write_text(json.dumps(out))
"""


def read_stored(home: Path, tables: Iterable[str] = TABLES.values()) -> dict[str, StoredCount]:
    """Row counts and event ids of the sink's tables, read WITHOUT FINAL from a stopped sink's chDB
    directory in a subprocess (chDB: one process per data directory, and this one may hold another)."""
    out = home.parent / f"stored-{uuid.uuid4().hex[:6]}.json"
    done = subprocess.run(
        [sys.executable, "-c", READER, str(home), str(out), *tables],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    return {table: StoredCount(value["rows"], set(value["ids"])) for table, value in data.items()}


async def catch_up(process: ServiceProcess, bootstrap: str, group: str, topics: list[str], timeout_s: float) -> float:
    """Seconds until `group` has committed everything the topics held when this was called: how long a
    consumer takes to recover from a fault that ended now, while new events keep arriving."""
    started = time.monotonic()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await _start_retrying(consumer)
    await _start_retrying(admin)
    try:
        partitions = await known_partitions(consumer, topics)
        target = await consumer.end_offsets(partitions)
        while True:
            committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
            if all(tp in committed and committed[tp].offset >= target[tp] for tp in partitions if target[tp] > 0):
                return time.monotonic() - started
            assert process.running(), f"{process.services} exited while catching up:\n{process.log_tail()}"
            assert time.monotonic() - started < timeout_s, (
                f"{group} did not catch up within {timeout_s:.0f}s:\n{process.log_tail()}"
            )
            await asyncio.sleep(0.3)
    finally:
        await consumer.stop()
        await admin.close()


ROWS_READER = """
import json, sys
from pathlib import Path
from services.runtime.clickhouse import open_clickhouse
with open_clickhouse(None, Path(sys.argv[1]), readonly=True) as store:
    rows = store.query(sys.argv[3])
Path(sys.argv[2]).write_text(json.dumps(rows, default=str))
"""


def query_stopped(home: Path, sql: str) -> list[dict[str, object]]:
    """The rows of one query over a stopped sink's chDB directory, read in a subprocess like `read_stored`."""
    out = home.parent / f"rows-{uuid.uuid4().hex[:6]}.json"
    done = subprocess.run(
        [sys.executable, "-c", ROWS_READER, str(home), str(out), sql],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())
