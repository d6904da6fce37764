"""A PostgreSQL cluster under `<home>/infra/postgres/`, on loopback, for the registry in development and CI.

PostgreSQL refuses to run as root, so when we are root the cluster belongs to, and runs as, the `postgres`
system user (or a `flywheel` system user created for it). The cluster survives `down`; `state.json` holds the
URL of the running one.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from infra.processes import (
    LOOPBACK,
    InfraStatus,
    is_our_process,
    pick_port,
    port_is_free,
    read_state,
    write_state,
)
from services.runtime.errors import InfrastructureError

DEFAULT_PORT = 5432
DATABASE = "flywheel"
SUPERUSER = "flywheel"
SERVER_USERS = ("postgres", "flywheel")
CLUSTER_CONFIG = Path(__file__).with_name("postgres") / "postgresql.conf"


class LocalPostgres:
    """The local PostgreSQL cluster of one FLYWHEEL_HOME: create, start, stop, report."""

    def __init__(self, home: Path, port: int | None = None) -> None:
        self.dir = home.resolve() / "infra" / "postgres"
        self.state_file = self.dir / "state.json"
        self.data_dir = self.dir / "data"
        self.log_file = self.dir / "postgres.log"
        self.password_file = self.dir / "password"
        self.port = port

    def status(self) -> InfraStatus:
        """Whether the recorded cluster runs, and where."""
        state = read_state(self.state_file)
        if state is None:
            return InfraStatus("postgres", False, data_dir=self.data_dir, log_file=self.log_file)
        from sqlalchemy.engine import make_url  # imported here: every `flywheel` command imports this module

        running = self._is_ours(state["pid"])
        return InfraStatus(
            "postgres",
            running,
            pid=state["pid"],
            address=make_url(state["url"]).render_as_string(hide_password=True),
            data_dir=self.data_dir,
            log_file=self.log_file,
            started_at=state["started_at"],
            note=None if running else f"stale state: pid {state['pid']} is not running",
        )

    def start(self, timeout: float = 60.0) -> str:
        """Start the cluster (creating it on first use), or reuse the running one; its SQLAlchemy URL."""
        state = read_state(self.state_file)
        if state is not None:
            if self._is_ours(state["pid"]):
                if self.port is not None and state["port"] != self.port:
                    raise InfrastructureError(
                        f"PostgreSQL already runs on port {state['port']}: `flywheel infra down --postgres` first to move it to {self.port}"
                    )
                return state["url"]
            self.state_file.unlink()
        bindir = postgres_bindir()
        user = server_user()
        if not (self.data_dir / "PG_VERSION").exists():
            self._create_cluster(bindir, user)
        port = self._choose_port()
        self._pg_ctl(bindir, user, "start", "-w", "-t", str(int(timeout)), "-l", str(self.log_file), "-o", f"-p {port}")
        pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        password = self.password_file.read_text().strip()
        url = f"postgresql+psycopg://{SUPERUSER}:{password}@{LOOPBACK}:{port}/{DATABASE}"
        write_state(
            self.state_file,
            {
                "pid": pid,
                "url": url,
                "port": port,
                "data_dir": str(self.data_dir),
                "log_file": str(self.log_file),
                "server_user": user.pw_name if user else None,
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        try:
            _ensure_database(port, password)
        except BaseException:
            self.stop()
            raise
        return url

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the recorded cluster (fast shutdown: open sessions are rolled back) and forget it; whether one ran."""
        state = read_state(self.state_file)
        if state is None:
            return False
        running = self._is_ours(state["pid"])
        if running:
            self._pg_ctl(postgres_bindir(), server_user(), "stop", "-w", "-t", str(int(timeout)), "-m", "fast")
        self.state_file.unlink(missing_ok=True)
        return running

    def _is_ours(self, pid: int) -> bool:
        # The postmaster's command line carries `-D <data dir>`: a recycled pid will not.
        return is_our_process(pid, "postgres", str(self.data_dir))

    def _choose_port(self) -> int:
        if self.port is None:
            return pick_port(DEFAULT_PORT)
        if not port_is_free(self.port):
            raise InfrastructureError(
                f"port {self.port} is in use: choose another with --postgres-port or stop what listens there"
            )
        return self.port

    def _create_cluster(self, bindir: Path, user: pwd.struct_passwd | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.log_file.touch()
        password = secrets.token_urlsafe(24)
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        # initdb reads the superuser's password from a file the server user can read; it is removed right after.
        pwfile = self.dir / "initdb.pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if user is not None:
            for path in (self.data_dir, self.log_file, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
            self._check_reachable(user)
        try:
            _run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    f"--username={SUPERUSER}",
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                user,
                "initdb",
            )
        finally:
            pwfile.unlink()
        with (self.data_dir / "postgresql.conf").open("a") as config:
            config.write(CLUSTER_CONFIG.read_text())

    def _check_reachable(self, user: pwd.struct_passwd) -> None:
        result = subprocess.run(["test", "-w", str(self.data_dir)], check=False, **_as_user(user))
        if result.returncode != 0:
            raise InfrastructureError(
                f"the `{user.pw_name}` user cannot reach {self.data_dir} (a parent directory is private, like /root "
                "or pytest's temp dir): set FLYWHEEL_HOME under a directory every user may enter"
            )

    def _pg_ctl(self, bindir: Path, user: pwd.struct_passwd | None, action: str, *args: str) -> None:
        _run(
            [str(bindir / "pg_ctl"), action, "-D", str(self.data_dir), *args],
            user,
            f"pg_ctl {action}",
            log_file=self.log_file,
        )


def postgres_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres; installs PostgreSQL with apt-get when root and it is missing."""
    found = _find_bindir()
    if found is None:
        _install_postgres()
        found = _find_bindir()
    if found is None:
        raise InfrastructureError(
            "PostgreSQL server binaries (initdb, pg_ctl) not found even after installing: check `apt-get install postgresql`"
        )
    return found


def server_user() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in SERVER_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    _run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "flywheel",
        ],
        None,
        "useradd flywheel",
    )
    return pwd.getpwnam("flywheel")


def _find_bindir() -> Path | None:
    candidates = []
    if pg_config := shutil.which("pg_config"):
        # pg_config may come from libpq-dev alone, without a server beside it: keep it only if initdb is there.
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        versions, key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0, reverse=True
    )
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    return next((path for path in candidates if (path / "initdb").exists() and (path / "pg_ctl").exists()), None)


def _install_postgres() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise InfrastructureError(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install them (sudo apt-get install -y postgresql)"
        )
    print("installing PostgreSQL with apt-get (once)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip().splitlines()
            raise InfrastructureError(
                f"`{' '.join(command)}` failed (exit {result.returncode}):\n" + "\n".join(output[-10:])
            )


def _as_user(user: pwd.struct_passwd | None) -> dict:
    if user is None:
        return {}
    # extra_groups=[] drops root's supplementary groups along with root itself.
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": "/"}


def _run(command: list[str], user: pwd.struct_passwd | None, what: str, log_file: Path | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False, **_as_user(user))
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        hint = f" (see {log_file})" if log_file else ""
        raise InfrastructureError(f"{what} failed (exit {result.returncode}){hint}: {output}")


def _ensure_database(port: int, password: str) -> None:
    import psycopg  # imported here: every `flywheel` command imports this module

    with psycopg.connect(
        host=LOOPBACK, port=port, user=SUPERUSER, password=password, dbname="postgres", autocommit=True
    ) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
            conn.execute(f"CREATE DATABASE {DATABASE}")
