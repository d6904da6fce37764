"""`flywheel infra` starts real services that work, reuses them, cleans up after dead ones and stops only its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.local_kafka import LocalKafka
from infra.local_postgres import LocalPostgres
from infra.processes import free_port, port_is_free, process_alive, wait_until

pytestmark = pytest.mark.integration

FLYWHEEL = Path(sys.executable).with_name("flywheel")


def infra(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLYWHEEL_HOME": str(home)}
    env.pop("FLYWHEEL_KAFKA_BOOTSTRAP", None)
    return subprocess.run(
        [str(FLYWHEEL), "infra", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def kafka_state(home: Path) -> dict:
    return json.loads((home / "infra" / "kafka" / "state.json").read_text())


async def round_trip(bootstrap: str) -> bytes:
    topic = f"infra-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # Topics are never created on first use (auto.create.topics.enable=false).
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=topic, auto_offset_reset="earliest")
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    return record.value


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A FLYWHEEL_HOME whose broker is stopped after the test, however the test ended."""
    yield tmp_path
    LocalKafka(tmp_path, tmp_path).stop()


@pytest.fixture
def shared_home() -> Iterator[Path]:
    """A FLYWHEEL_HOME the `postgres` user can enter (pytest's own temp dir is private to root); all stopped after."""
    path = Path(tempfile.mkdtemp(prefix="flywheel-infra-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        LocalKafka(path, path).stop()
        LocalPostgres(path).stop()
        shutil.rmtree(path, ignore_errors=True)


async def test_up_serves_a_round_trip_and_down_frees_the_port(home: Path) -> None:
    port = free_port()
    started = infra(home, "up", "--port", str(port))
    assert started.returncode == 0, started.stderr
    state = kafka_state(home)
    assert state["bootstrap"] == f"127.0.0.1:{port}"

    status = infra(home, "status")
    assert f"kafka: running pid {state['pid']} at 127.0.0.1:{port}" in status.stdout

    assert await round_trip(state["bootstrap"]) == b"hello"

    stopped = infra(home, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert f"kafka: stopped (pid {state['pid']})" in stopped.stdout
    assert wait_until(lambda: not process_alive(state["pid"]), 10)
    assert port_is_free(port)
    assert not (home / "infra" / "kafka" / "state.json").exists()
    assert "kafka: stopped" in infra(home, "status").stdout


def test_up_twice_reuses_the_running_broker(home: Path) -> None:
    port = str(free_port())
    assert infra(home, "up", "--port", port).returncode == 0
    first = kafka_state(home)
    again = infra(home, "up", "--port", port)
    assert again.returncode == 0, again.stderr
    assert "kafka: already running" in again.stdout
    assert kafka_state(home)["pid"] == first["pid"]


async def test_up_after_the_broker_died_starts_a_new_one(home: Path) -> None:
    assert infra(home, "up", "--port", str(free_port())).returncode == 0
    dead = kafka_state(home)
    os.kill(dead["pid"], signal.SIGKILL)
    assert wait_until(lambda: not process_alive(dead["pid"]), 10)
    assert f"stale state: pid {dead['pid']} is not running" in infra(home, "status").stdout

    restarted = infra(home, "up", "--port", str(free_port()))
    assert restarted.returncode == 0, restarted.stderr
    assert "kafka: started" in restarted.stdout
    alive = kafka_state(home)
    assert alive["pid"] != dead["pid"]
    assert await round_trip(alive["bootstrap"]) == b"hello"


def test_down_never_signals_a_process_that_is_not_our_broker(home: Path) -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        state_file = home / "infra" / "kafka" / "state.json"
        state_file.parent.mkdir(parents=True)
        state_file.write_text(json.dumps({"pid": stranger.pid, "bootstrap": "127.0.0.1:1", "started_at": "earlier"}))
        stopped = infra(home, "down")
        assert stopped.returncode == 0, stopped.stderr
        assert "kafka: was not running" in stopped.stdout
        assert stranger.poll() is None
        assert not state_file.exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_up_on_a_taken_port_fails_with_one_actionable_line(home: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        result = infra(home, "up", "--port", str(port))
    assert result.returncode == 3
    assert (
        result.stderr.strip() == f"error: port {port} is in use: choose another with --port or stop what listens there"
    )


def test_postgres_up_accepts_connections_and_down_stops_it(shared_home: Path) -> None:
    port = free_port()
    started = infra(shared_home, "up", "--postgres", "--port", str(free_port()), "--postgres-port", str(port))
    assert started.returncode == 0, started.stderr
    state = json.loads((shared_home / "infra" / "postgres" / "state.json").read_text())
    assert state["url"].startswith("postgresql+psycopg://flywheel:") and state["url"].endswith(
        f"@127.0.0.1:{port}/flywheel"
    )
    assert "postgres: running" in infra(shared_home, "status").stdout

    with psycopg.connect(state["url"].replace("postgresql+psycopg://", "postgresql://")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    stopped = infra(shared_home, "down", "--all")
    assert stopped.returncode == 0, stopped.stderr
    assert f"postgres: stopped (pid {state['pid']})" in stopped.stdout
    assert wait_until(lambda: not process_alive(state["pid"]), 10)
    assert port_is_free(port)


async def test_the_session_broker_fixture_answers(kafka_bootstrap: str) -> None:
    assert await round_trip(kafka_bootstrap) == b"hello"


def test_the_session_database_fixture_is_a_fresh_database(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://")
    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        name, tables = conn.execute(
            "SELECT current_database(), (SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public')"
        ).fetchone()
    assert name.startswith("flywheel_test_") and tables == 0
