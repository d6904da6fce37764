"""What runs under a FLYWHEEL_HOME: each serving process records its door there, so the others find it.

A process serving HTTP writes `home/run/<pid>.json` (its services and its door's URL) once it listens
and removes it when it stops. A process that needs another's door and was given no URL for it (a
service checking API keys without FLYWHEEL_REGISTRY_URL, a client command) looks here. A record whose
process is gone (killed, crashed) is ignored and removed: the pid must still run and have started
when the record says, so a reused pid is not mistaken for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("flywheel.running")

# Where the registry writes a fresh development home's first admin key (owner only), for the commands beside it.
ADMIN_KEY_FILE = "admin.key"


@dataclass(frozen=True)
class RunningProcess:
    pid: int
    services: tuple[str, ...]
    url: str
    started: str  # the kernel's start time of the pid, so a reused pid is told apart


def _run_dir(home: Path) -> Path:
    return home / "run"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields are counted after its last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has exited, only its parent has not reaped it


def door_url(host: str, port: int) -> str:
    """The URL a client on this host uses for a door listening on `host`:`port`."""
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - listening everywhere: reach it on loopback
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def record(home: Path, services: list[str], url: str) -> Path:
    """Record this process's door under `home`; returns the record's path for `forget`."""
    directory = _run_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    path = directory / f"{pid}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"pid": pid, "services": services, "url": url, "started": _start_time(pid)}))
    partial.replace(path)  # readers never see half a record
    return path


def forget(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def running(home: Path) -> list[RunningProcess]:
    """The live processes recorded under `home`, oldest record first; stale records are removed."""
    found = []
    for path in sorted(_run_dir(home).glob("*.json"), key=lambda p: p.stat().st_mtime if p.exists() else 0):
        try:
            data = json.loads(path.read_text())
            process = RunningProcess(
                pid=int(data["pid"]),
                services=tuple(data["services"]),
                url=str(data["url"]),
                started=str(data["started"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written or removed, or not ours: never a reason to fail a caller
        if _start_time(process.pid) != process.started:
            log.info("removing the record of process %d, which no longer runs", process.pid)
            forget(path)
            continue
        found.append(process)
    return found


def door_of(home: Path, service: str) -> str | None:
    """The URL of a live process under `home` that runs `service`, if one is recorded."""
    for process in running(home):
        if service in process.services:
            return process.url
    return None


def client_key(home: Path) -> str | None:
    """The API key a command on this host presents: FLYWHEEL_API_KEY, else the admin key the registry
    wrote for a fresh development home (`home/admin.key`), only while the file is this user's alone."""
    configured = os.environ.get("FLYWHEEL_API_KEY")
    if configured:
        return configured
    return development_admin_key(home)


def development_admin_key(home: Path) -> str | None:
    """The admin key the registry wrote for a fresh development home (`home/admin.key`), only while the file
    is this user's alone; None elsewhere (a production home has no such file)."""
    path = home / ADMIN_KEY_FILE
    try:
        status = path.stat()
    except OSError:
        return None
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        log.warning("ignoring %s: it must belong to you and be readable by you alone (chmod 600)", path)
        return None
    return path.read_text().strip() or None
