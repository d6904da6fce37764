"""The runtime's SQLite helper on real files: numbered migrations applied once each and atomically, a file
from newer code refused with what to do, one connection shared safely by threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from services.runtime.sqlite import Migration, MigrationError, SqliteDatabase

pytestmark = pytest.mark.unit

# Deliberately not idempotent (no IF NOT EXISTS, a plain INSERT): running either twice would fail or duplicate.
CREATE = Migration(1, "create_item", "CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL);")
SEED = Migration(2, "seed_item", "INSERT INTO item (name) VALUES ('first');")
ADD_COLUMN = Migration(3, "item_colour", "ALTER TABLE item ADD COLUMN colour TEXT;")


def test_a_new_file_gets_its_folder_wal_a_busy_timeout_and_every_migration_in_order(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.db"
    db = SqliteDatabase(path, [CREATE, SEED], busy_timeout_s=7)
    try:
        assert db.applied_migrations() == [(1, "create_item"), (2, "seed_item")]
        assert db.rows("SELECT name FROM item") == [("first",)]
        assert db.row("PRAGMA journal_mode") == ("wal",)
        assert db.row("PRAGMA busy_timeout") == (7000,)
    finally:
        db.close()


def test_reopening_applies_only_the_migrations_the_file_has_not_seen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteDatabase(path, [CREATE, SEED]).close()
    db = SqliteDatabase(path, [CREATE, SEED, ADD_COLUMN])
    try:
        assert db.applied_migrations() == [(1, "create_item"), (2, "seed_item"), (3, "item_colour")]
        assert db.rows("SELECT name, colour FROM item") == [("first", None)]  # seeded once, not twice
    finally:
        db.close()
    SqliteDatabase(path, [CREATE, SEED, ADD_COLUMN]).close()  # nothing left to apply: opens as it is


def test_a_failing_migration_leaves_nothing_behind_and_says_which_one_failed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    broken = Migration(2, "half_done", "CREATE TABLE extra (x INTEGER);\nINSERT INTO no_such_table VALUES (1);")
    with pytest.raises(
        MigrationError, match=r"migration 2 \(half_done\) failed and was rolled back: no such table: no_such_table"
    ):
        SqliteDatabase(path, [CREATE, broken])
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT version FROM schema_migrations").fetchall() == [(1,)]
        assert (
            raw.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchall() == []
        )  # its first statement was undone too
    finally:
        raw.close()
    fixed = Migration(2, "half_done", "CREATE TABLE extra (x INTEGER);")
    db = SqliteDatabase(path, [CREATE, fixed])
    try:
        assert db.applied_migrations() == [(1, "create_item"), (2, "half_done")]
    finally:
        db.close()


def test_a_file_written_by_newer_code_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteDatabase(path, [CREATE, SEED, ADD_COLUMN]).close()
    with pytest.raises(MigrationError) as refused:
        SqliteDatabase(path, [CREATE, SEED])
    message = str(refused.value)
    assert str(path) in message and "schema version 3 (item_colour)" in message and "up to 2" in message
    assert "written by a newer release" in message and "FLYWHEEL_HOME" in message
    db = SqliteDatabase(path, [CREATE, SEED, ADD_COLUMN])
    try:
        assert db.rows("SELECT name FROM item") == [("first",)]
    finally:
        db.close()


@pytest.mark.parametrize(
    "migrations",
    [[SEED], [CREATE, ADD_COLUMN], [SEED, CREATE]],
    ids=["starts-at-2", "skips-2", "out-of-order"],
)
def test_migrations_out_of_sequence_are_a_programming_error(tmp_path: Path, migrations: list[Migration]) -> None:
    with pytest.raises(ValueError, match=r"numbered 1, 2, 3, \.\.\. in order"):
        SqliteDatabase(tmp_path / "state.db", migrations)
    assert not (tmp_path / "state.db").exists()


@pytest.mark.parametrize(("number", "name"), [(0, "zero"), (1, "Has Spaces"), (1, "")])
def test_a_migration_needs_a_positive_number_and_a_snake_case_name(number: int, name: str) -> None:
    with pytest.raises(ValueError):
        Migration(number, name, "SELECT 1")


def open_together(
    path: Path, migrations: list[Migration], count: int
) -> tuple[list[SqliteDatabase], list[BaseException]]:
    """`count` connections (standing for processes) opening `path` at the same moment, lined up by a barrier."""
    start = threading.Barrier(count)
    opened: list[SqliteDatabase] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        start.wait()
        try:
            opened.append(SqliteDatabase(path, migrations))
        except BaseException as error:  # noqa: BLE001 - reported by the caller's assertion
            errors.append(error)

    threads = [threading.Thread(target=open_it) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return opened, errors


def test_two_processes_opening_a_new_file_at_once_apply_each_migration_once(tmp_path: Path) -> None:
    # Repeated: which of the two wins the write lock, and when the other reads what is applied, varies by run.
    for attempt in range(10):
        opened, errors = open_together(tmp_path / f"race-{attempt}.db", [CREATE, SEED], 2)
        try:
            assert errors == []
            assert len(opened) == 2
            assert opened[0].rows("SELECT name FROM item") == [("first",)]
            assert opened[1].applied_migrations() == [(1, "create_item"), (2, "seed_item")]
        finally:
            for db in opened:
                db.close()


def test_a_transaction_commits_both_writes_or_neither(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "state.db", [CREATE])
    try:
        with db.transaction() as connection:
            connection.execute("INSERT INTO item (name) VALUES ('a')")
            connection.execute("INSERT INTO item (name) VALUES ('b')")
        with pytest.raises(sqlite3.IntegrityError), db.transaction() as connection:
            connection.execute("INSERT INTO item (name) VALUES ('c')")
            connection.execute("INSERT INTO item (name) VALUES (NULL)")
        assert db.rows("SELECT name FROM item ORDER BY id") == [("a",), ("b",)]
        assert db.execute("UPDATE item SET name = upper(name)") == 2
    finally:
        db.close()


def test_threads_share_the_one_connection(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "state.db", [CREATE])

    def writer(index: int) -> None:
        for row in range(50):
            with db.transaction() as connection:
                connection.execute("INSERT INTO item (name) VALUES (?)", (f"{index}-{row}",))
            db.row("SELECT count(*) FROM item")

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert db.row("SELECT count(*), count(DISTINCT name) FROM item") == (400, 400)
    finally:
        db.close()
