"""Migration files: naming, ordering, statement splitting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.runtime.clickhouse import load_migrations
from services.runtime.clickhouse.store import split_statements
from services.runtime.errors import ConfigurationError

pytestmark = pytest.mark.unit


def test_shipped_migrations_are_numbered_without_gaps() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert [m.name for m in migrations][:4] == [
        "0001_inference_log",
        "0002_feedback",
        "0003_evaluation_result",
        "0004_alert",
    ]


CREATE_TABLE = re.compile(r"^\s*CREATE\s+TABLE\b", re.IGNORECASE)


def _without_comments(statement: str) -> str:
    return "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))


def created_tables(statements: tuple[str, ...]) -> list[str]:
    """The CREATE TABLE statements among `statements`: views, indexes and ALTERs create no table."""
    return [code for code in map(_without_comments, statements) if CREATE_TABLE.match(code)]


@pytest.mark.parametrize("migration", load_migrations(), ids=lambda m: m.name)
def test_every_table_deduplicates(migration) -> None:
    for statement in created_tables(migration.statements):
        assert "ReplacingMergeTree(" in statement, statement
        assert "non_replicated_deduplication_window" in statement, statement


def test_the_deduplication_rule_looks_only_at_created_tables() -> None:
    statements = split_statements(
        "-- a view and an index only\nCREATE VIEW IF NOT EXISTS v AS SELECT 1 AS x;\n"
        "ALTER TABLE t ADD INDEX i x TYPE minmax;\n"
        "-- the table\nCREATE TABLE IF NOT EXISTS t (x UInt8) ENGINE = MergeTree ORDER BY x;\n"
    )
    assert [statement.split("(")[0].strip() for statement in created_tables(statements)] == [
        "CREATE TABLE IF NOT EXISTS t"
    ]


def test_order_is_numeric_not_by_file_listing(tmp_path: Path) -> None:
    for name in ("0010_ten.up.sql", "0002_two.up.sql", "0001_one.up.sql"):
        (tmp_path / name).write_text("SELECT 1;\n")
    assert [m.name for m in load_migrations(tmp_path)] == ["0001_one", "0002_two", "0010_ten"]


@pytest.mark.parametrize("name", ["1_short.up.sql", "0001_x.sql", "0001_x.down.sql", "0001-x.up.sql"])
def test_stray_files_are_errors_not_skipped(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("SELECT 1;\n")
    with pytest.raises(ConfigurationError, match="NNNN_name.up.sql"):
        load_migrations(tmp_path)


def test_duplicate_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.up.sql").write_text("SELECT 1;\n")
    (tmp_path / "0001_b.up.sql").write_text("SELECT 2;\n")
    with pytest.raises(ConfigurationError, match="used twice"):
        load_migrations(tmp_path)


def test_empty_migration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.up.sql").write_text("-- only a comment\n")
    with pytest.raises(ConfigurationError, match="no statement"):
        load_migrations(tmp_path)


def test_statements_split_at_line_end_semicolons_only() -> None:
    sql = "-- why\nCREATE TABLE a (s String DEFAULT 'x;y');\n\nALTER TABLE a ADD COLUMN b UInt8;  \n-- trailing\n"
    assert split_statements(sql) == (
        "-- why\nCREATE TABLE a (s String DEFAULT 'x;y')",
        "ALTER TABLE a ADD COLUMN b UInt8",
    )
