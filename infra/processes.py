"""What the local Kafka and PostgreSQL share: ports, state files, and stopping exactly the process we started."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class InfraStatus:
    """What `flywheel infra status` reports about one local service."""

    name: str
    running: bool
    pid: int | None = None
    address: str | None = None
    data_dir: Path | None = None
    log_file: Path | None = None
    started_at: str | None = None
    note: str | None = None


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on host:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Java and PostgreSQL both listen with SO_REUSEADDR, so a port in TIME_WAIT after `down` counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = LOOPBACK, avoid: Iterable[int] = ()) -> int:
    """A port the kernel says is free now (another process may still take it before we listen)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def pick_port(preferred: int, avoid: Iterable[int] = ()) -> int:
    """The conventional port when it is free, otherwise any free one."""
    avoid = set(avoid)
    if preferred not in avoid and port_is_free(preferred):
        return preferred
    return free_port(avoid=avoid)


def process_alive(pid: int) -> bool:
    """Whether pid runs; a zombie (dead, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name, which may itself contain spaces or parentheses.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def process_started(pid: int) -> int | None:
    """When pid started (clock ticks since boot), None when it is gone: with the pid, this names one process
    even after its pid is given to another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_cmdline(pid: int) -> list[str]:
    """The argv of a running process, empty when it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def is_our_process(pid: int, *markers: str) -> bool:
    """Whether pid is alive and its command line mentions every marker (guards against a recycled pid)."""
    if not process_alive(pid):
        return False
    cmdline = " ".join(process_cmdline(pid))
    return all(marker in cmdline for marker in markers)


def terminate(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if the process outlives timeout; returns once it is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not process_alive(pid), wait):
            return


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll condition until it holds or timeout seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def read_state(path: Path) -> dict[str, Any] | None:
    """A recorded state file, or None when there is none or it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Record state atomically, readable by the owner only (it may hold a password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])
