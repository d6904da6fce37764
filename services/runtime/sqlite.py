"""A service's own small SQLite database: one file, one shared connection, numbered migrations.

Services keep event-carried state, job state and processed event ids in SQLite files under
FLYWHEEL_HOME. Each opens its file through `SqliteDatabase` with the migrations it owns, declared in
order: `Migration(1, "jobs_and_outbox", "CREATE TABLE ...")`, `Migration(2, ...)`. Opening the file
applies the ones it has not seen, each in its own transaction together with its row in
`schema_migrations`, so a migration is applied once or not at all, even with two processes opening
the same file at once. A file written by newer code (a migration this code does not know) is refused
with a message saying so, rather than read with a schema the code does not understand.

The connection is shared by the event loop's threads (handlers run their queries through
asyncio.to_thread) and worker threads, so every statement runs under one lock; WAL lets readers
in other processes (a CLI beside a live service) read while it writes, and the busy timeout lets two
writers wait for each other instead of failing at once.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_S = 30.0
_MIGRATION_NAME = re.compile(r"[a-z][a-z0-9_]*")


class MigrationError(RuntimeError):
    """The file's schema cannot be brought to the one this code expects; the message says what to do."""


@dataclass(frozen=True)
class Migration:
    """One numbered, named step of a database's schema: SQL statements applied together, once."""

    number: int
    name: str
    sql: str

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError(f"migration numbers start at 1, not {self.number}")
        if not _MIGRATION_NAME.fullmatch(self.name):
            raise ValueError(f"migration name {self.name!r} must be lower_snake_case")


def _check_order(migrations: Sequence[Migration]) -> None:
    numbers = [migration.number for migration in migrations]
    if numbers != list(range(1, len(migrations) + 1)):
        raise ValueError(f"migrations must be numbered 1, 2, 3, ... in order; got {numbers}")


class SqliteDatabase:
    """A SQLite file opened once per process, its migrations applied, its statements run under one lock."""

    def __init__(self, path: Path, migrations: Sequence[Migration], *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        _check_order(migrations)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: statements autocommit unless a transaction is opened explicitly (transaction()),
        # so the module never opens one behind the caller's back.
        self._db = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._use_wal(busy_timeout_s)
            self._migrate(migrations)
        except BaseException:
            self._db.close()
            raise

    def _use_wal(self, busy_timeout_s: float) -> None:
        """Switch the file to WAL. Switching needs the file to itself for a moment, and SQLite answers
        "database is locked" at once instead of waiting out the busy timeout when another connection is
        opening it too (two processes starting beside each other on a new file): retry until the timeout."""
        deadline = time.monotonic() + busy_timeout_s
        pause = 0.005
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(2 * pause, 0.1)

    # ------------------------------------------------------------------------------ statements

    def rows(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row `sql` returns."""
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    def row(self, sql: str, parameters: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row `sql` returns, or None."""
        with self._lock:
            found: tuple[Any, ...] | None = self._db.execute(sql, parameters).fetchone()
            return found

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""
        with self._lock:
            return self._db.execute(sql, parameters).rowcount

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one write transaction: committed when the block ends, rolled back if it raises.

        IMMEDIATE takes the write lock at the start, so a read-then-write inside the block sees no other writer.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------ migrations

    def applied_migrations(self) -> list[tuple[int, str]]:
        """(number, name) of every migration this file has had, in order."""
        return [
            (number, name) for number, name in self.rows("SELECT version, name FROM schema_migrations ORDER BY version")
        ]

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        applied = self._applied()
        self._refuse_newer(applied, migrations)
        for migration in migrations:
            if migration.number in applied:
                continue
            # executescript runs several statements but commits any open transaction first, so the
            # transaction is opened inside the script; it stays open for the bookkeeping below.
            # Another process opening the same file may apply it between our read above and our write lock:
            # then our repeat is undone, whether it succeeded (the check below) or failed on what that
            # process created (the check in the handler).
            try:
                self._db.executescript(f"BEGIN IMMEDIATE;\n{migration.sql}")
                current = self._applied()
                self._refuse_newer(current, migrations)
                if migration.number in current:
                    self._db.execute("ROLLBACK")
                    continue
                self._db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.number, migration.name, datetime.now(UTC).isoformat()),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if migration.number in self._applied():
                    continue
                raise MigrationError(
                    f"{self.path}: migration {migration.number} ({migration.name}) failed and was rolled back: {error}"
                ) from error
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _applied(self) -> dict[int, str]:
        return dict(self._db.execute("SELECT version, name FROM schema_migrations").fetchall())

    def _refuse_newer(self, applied: dict[int, str], migrations: Sequence[Migration]) -> None:
        unknown = sorted(number for number in applied if number > len(migrations))
        if unknown:
            newest = unknown[-1]
            raise MigrationError(
                f"{self.path} is at schema version {newest} ({applied[newest]}), newer than this Flywheel knows "
                f"(up to {len(migrations)}): it was written by a newer release; run that release, or point FLYWHEEL_HOME elsewhere"
            )
