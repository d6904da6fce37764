"""What serving ends when a tritonserver is gone: the processes of that server's family still running,
named by pid and start time, never a process that merely got one of their pids (the server's real family:
tests/faults/test_faults_triton.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from infra.processes import free_port, process_alive, process_started, wait_until
from services.serving.triton import TritonPorts, _end_leftovers, _flag, _ports_free_within

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_leftover_of_the_family_is_killed(sleeper: subprocess.Popen[bytes]) -> None:
    started = process_started(sleeper.pid)
    assert started is not None
    assert _end_leftovers({sleeper.pid: started}) == 1
    sleeper.wait(timeout=10)
    assert not process_alive(sleeper.pid)
    # Gone (reaped): nothing left to end.
    assert _end_leftovers({sleeper.pid: started}) == 0


def test_a_process_that_got_a_leftovers_pid_is_left_alone(sleeper: subprocess.Popen[bytes]) -> None:
    started = process_started(sleeper.pid)
    assert started is not None
    assert _end_leftovers({sleeper.pid: started - 1}) == 0
    assert not wait_until(lambda: not process_alive(sleeper.pid), 0.5)


def test_the_server_port_is_read_in_either_spelling_of_the_flag() -> None:
    assert _flag(["tritonserver", "--http-port", "8123", "--grpc-port", "8124"], "--http-port") == "8123"
    assert _flag(["tritonserver", "--http-port=8123"], "--http-port") == "8123"
    assert _flag(["tritonserver", "--grpc-port", "8124"], "--http-port") is None


def test_a_restart_takes_fresh_ports_when_another_process_holds_one() -> None:
    ports = TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())
    assert _ports_free_within(ports, 0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", ports.grpc))
        holder.listen()
        assert not _ports_free_within(ports, 0.5)
