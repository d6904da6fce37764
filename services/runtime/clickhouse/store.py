"""The one interface both ClickHouse backends implement, the server URL's parsing, and the migrations they share.

Choosing a backend is services/runtime/clickhouse/factory.py: the backends import this module, so it imports neither."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from services.runtime.errors import ConfigurationError

if TYPE_CHECKING:
    import pyarrow

DEFAULT_DATABASE = "flywheel"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.up\.sql$")
# Statements end with `;` at the end of a line, so a `;` inside a string literal or comment does not split.
_STATEMENT_END = re.compile(r";[ \t]*(?:\n|$)")
_ERROR_CODE = re.compile(r"(?:Code: |error code )(\d+)")
_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")
_URL_SHAPE = "http(s)://user:password@host:8123/database"

SCHEMA_MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version
"""


def bind(sql: str, parameters: dict[str, Any] | None) -> tuple[str | bytes, dict[str, str]]:
    """clickhouse-connect's binding of `parameters` into `sql`, exactly as the server backend sends it;
    values it cannot bind (a `%` the client-side formatting trips on, a value of no ClickHouse type)
    are the caller's error, raised as a ClickHouseError instead of a bare ValueError."""
    from datetime import UTC

    from clickhouse_connect.driver.binding import bind_query

    try:
        return bind_query(sql, parameters, UTC)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ClickHouseError(f"query parameters cannot be bound: {type(error).__name__}: {error}") from None


class ClickHouseError(Exception):
    """The engine refused or failed a statement; `code` is ClickHouse's error code (164 = READONLY)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        code = _ERROR_CODE.search(message)
        names = _ERROR_NAME.findall(message)
        self.code: int | None = int(code.group(1)) if code else None
        self.name: str | None = names[-1] if names else None


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


@dataclass(frozen=True)
class ServerAddress:
    """A parsed `FLYWHEEL_CLICKHOUSE_URL`; `redacted` is safe to print."""

    secure: bool
    host: str
    port: int
    username: str
    password: str
    database: str | None

    @property
    def redacted(self) -> str:
        scheme = "https" if self.secure else "http"
        secret = ":***" if self.password else ""
        return f"{scheme}://{self.username}{secret}@{self.host}:{self.port}/{self.database or ''}"


class ClickHouseStore(ABC):
    """Columnar access to one ClickHouse database, embedded (chDB) or a server; the SQL is the same."""

    database: str
    readonly: bool

    @abstractmethod
    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        """Run a statement that returns nothing (DDL, ALTER ...); `{name:Type}` placeholders bind server-side."""

    @abstractmethod
    def query_arrow(
        self, sql: str, parameters: dict[str, Any] | None = None, *, limits: Mapping[str, int | str] | None = None
    ) -> pyarrow.Table:
        """Run a SELECT and return its result as an Arrow table; `limits` are settings (max_result_rows, ...)
        the engine enforces for this query, applied by the backend, never spliced into `sql`."""

    @abstractmethod
    def insert_arrow(self, table: str, data: pyarrow.Table, dedup_token: str | None = None) -> None:
        """Insert an Arrow table by column name; a repeated `dedup_token` makes a redelivered batch a no-op."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; idempotent."""

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a SELECT and return its rows as dicts."""
        rows: list[dict[str, Any]] = self.query_arrow(sql, parameters).to_pylist()
        return rows

    def migrate(self) -> list[str]:
        """Apply the migrations not applied yet, in order, and return their names."""
        import pyarrow as pa

        self.command(SCHEMA_MIGRATIONS_DDL)
        applied = {row["version"] for row in self.query("SELECT version FROM schema_migrations FINAL")}
        done = []
        for migration in load_migrations():
            if migration.version in applied:
                continue
            for statement in migration.statements:
                self.command(statement)
            record = pa.table(
                {"version": pa.array([migration.version], pa.uint32()), "name": pa.array([migration.name], pa.string())}
            )
            self.insert_arrow("schema_migrations", record, dedup_token=f"migration-{migration.version}")
            done.append(migration.name)
        return done

    def __enter__(self) -> ClickHouseStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def parse_server_url(url: str) -> ServerAddress:
    """Parse `http(s)://user:password@host:port/database`, or raise ConfigurationError saying what is wrong."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise ConfigurationError(
            f"FLYWHEEL_CLICKHOUSE_URL cannot be parsed ({error}): write it as {_URL_SHAPE}, or unset it for embedded chDB"
        ) from None
    if parts.scheme not in ("http", "https"):
        shown = f"{parts.scheme}://{parts.hostname or ''}" if parts.scheme else "a URL without a scheme"
        raise ConfigurationError(
            f"FLYWHEEL_CLICKHOUSE_URL must use http or https (the HTTP interface), got {shown}: write it as {_URL_SHAPE}"
        )
    if not parts.hostname:
        raise ConfigurationError(f"FLYWHEEL_CLICKHOUSE_URL has no host: write it as {_URL_SHAPE}")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"FLYWHEEL_CLICKHOUSE_URL takes no query string or fragment: write it as {_URL_SHAPE}")
    path = parts.path.strip("/")
    if "/" in path:
        raise ConfigurationError(f"FLYWHEEL_CLICKHOUSE_URL path must be one database name, got {path!r}")
    secure = parts.scheme == "https"
    return ServerAddress(
        secure=secure,
        host=parts.hostname,
        port=port or (8443 if secure else 8123),
        username=unquote(parts.username) if parts.username else "default",
        password=unquote(parts.password) if parts.password else "",
        database=check_identifier(unquote(path)) if path else None,
    )


def check_identifier(name: str) -> str:
    """Return `name` if it is a plain ClickHouse identifier; names are quoted into SQL, so nothing else passes."""
    if not _IDENTIFIER.match(name):
        raise ConfigurationError(
            f"{name!r} is not a valid ClickHouse database or table name: use letters, digits and _ only"
        )
    return name


def quote_identifier(name: str) -> str:
    """Backquote a checked identifier for SQL text."""
    return f"`{check_identifier(name)}`"


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Read `NNNN_name.up.sql` files in version order; a stray or duplicate file is an error, not skipped."""
    migrations: dict[int, Migration] = {}
    for path in directory.iterdir():
        if path.is_dir() or path.name.startswith("."):
            continue
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise ConfigurationError(f"{path}: migration files are named NNNN_name.up.sql")
        version = int(match.group(1))
        if version in migrations:
            raise ConfigurationError(f"{path}: migration version {version} is used twice")
        statements = split_statements(path.read_text(encoding="utf-8"))
        if not statements:
            raise ConfigurationError(f"{path}: migration has no statement")
        migrations[version] = Migration(version, path.name.removesuffix(".up.sql"), statements)
    return [migrations[version] for version in sorted(migrations)]


def split_statements(sql: str) -> tuple[str, ...]:
    """Split a migration file into statements, dropping comment-only pieces."""
    pieces = (piece.strip() for piece in _STATEMENT_END.split(sql))
    return tuple(piece for piece in pieces if _strip_comments(piece))


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--")).strip()
