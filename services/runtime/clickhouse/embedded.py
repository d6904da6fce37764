"""Embedded ClickHouse (chDB) with its data directory on disk.

chDB runs one engine per process, bound to one data directory: while any connection is open, chDB refuses
a connection to another path ("EmbeddedServer already initialized with path ..."). The registry below
turns that into a ConfigurationError naming both paths before chDB is asked. Connections to the same
path share the engine; each store keeps its own connection because the current database (`USE`) and
`readonly` are per-connection state.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.runtime.clickhouse.store import ClickHouseError, ClickHouseStore, bind, check_identifier, quote_identifier
from services.runtime.errors import ConfigurationError

if TYPE_CHECKING:
    import pyarrow
    from chdb.state.sqlitelike import Connection

_registry_lock = threading.Lock()
# chDB runs one statement at a time per engine, but a thread waiting for its turn inside chDB keeps
# the GIL, while an INSERT ... FROM Python(table) holding the engine needs the GIL to read its Arrow
# table: two threads querying at once deadlock (seen: the sink inserting while a reader polled).
# Taking turns here, where waiting releases the GIL, costs nothing chDB would not serialise anyway.
_engine_turn = threading.Lock()
_open_path: Path | None = None
_open_count = 0


def _acquire(path: Path) -> None:
    global _open_path, _open_count
    with _registry_lock:
        if _open_count and _open_path != path:
            raise ConfigurationError(
                f"embedded ClickHouse is already open at {_open_path} in this process and chDB allows one data "
                f"directory per process, so {path} cannot be opened too: close the other store first, "
                "or set FLYWHEEL_CLICKHOUSE_URL to a ClickHouse server"
            )
        _open_path = path
        _open_count += 1


def _release() -> None:
    global _open_path, _open_count
    with _registry_lock:
        _open_count -= 1
        if not _open_count:
            _open_path = None


class EmbeddedStore(ClickHouseStore):
    def __init__(self, connection: Connection, path: Path, database: str, readonly: bool) -> None:
        self._connection: Connection | None = connection
        self.path = path
        self.database = database
        self.readonly = readonly
        self._limited_connections: dict[tuple[tuple[str, str], ...], Connection] = {}

    @classmethod
    def open(cls, path: Path, database: str, readonly: bool) -> EmbeddedStore:
        """Open `database` in the chDB data directory `path`, creating both unless `readonly`."""
        path = path.resolve()
        if "?" in str(path):
            raise ConfigurationError(f"the embedded ClickHouse directory {path} must not contain '?'")
        if readonly and not path.is_dir():
            raise ConfigurationError(f"no embedded ClickHouse data at {path}: nothing has been written there yet")
        path.mkdir(parents=True, exist_ok=True)
        # Imported here: importing chdb starts an in-memory engine, which a server-backed process never needs.
        import chdb

        _acquire(path)
        connection = None
        try:
            # readonly=1 is a per-connection setting the engine enforces; it also forbids changing settings,
            # so `SET readonly = 0` or `SETTINGS readonly = 0` through this handle is refused too.
            connection = chdb.connect(f"{path}?readonly=1" if readonly else str(path))  # type: ignore[no-untyped-call]  # chdb ships no annotations here
            store = cls(connection, path, database, readonly)
            if not readonly:
                store.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
            elif not store.query("SELECT 1 FROM system.databases WHERE name = {name:String}", {"name": database}):
                raise ConfigurationError(
                    f"database {database!r} does not exist in {path}: open it writable once to run the migrations"
                )
            store.command(f"USE {quote_identifier(database)}")
        except BaseException:
            if connection is not None:
                connection.close()
            _release()
            raise
        return store

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        self._run(sql, "CSV", parameters)

    def query_arrow(
        self, sql: str, parameters: dict[str, Any] | None = None, *, limits: Mapping[str, int | str] | None = None
    ) -> pyarrow.Table:
        if not limits:
            return self._run(sql, "ArrowTable", parameters)
        # chDB (4.4) leaves a connection whose query failed while writing its result (a cap hit mid-stream)
        # answering the next query with a broken Arrow buffer; a failed query therefore retires its
        # connection, and a broken buffer is read again, once, on a fresh one.
        for attempt in (1, 2):
            connection = self._limited(limits)
            try:
                return self._run(sql, "ArrowTable", parameters, connection)
            except ClickHouseError:
                self._retire(connection)
                raise
            except (
                OSError,
                ValueError,
            ) as broken:  # pyarrow.ArrowInvalid is a ValueError; a truncated IPC file an OSError
                self._retire(connection)
                if attempt == 2:
                    raise ClickHouseError(
                        f"embedded ClickHouse returned an unreadable result twice: {broken}"
                    ) from None
        raise AssertionError("unreachable")

    def insert_arrow(self, table: str, data: pyarrow.Table, dedup_token: str | None = None) -> None:
        columns = ", ".join(quote_identifier(name) for name in data.column_names)
        settings = ""
        if dedup_token is not None:
            settings = f" SETTINGS insert_deduplication_token = '{_escape(dedup_token)}'"
        # Python() resolves `flywheel_batch` by name in the calling frames; naming the columns on both sides
        # binds them by name, so the Arrow column order cannot shift data between columns.
        flywheel_batch = data  # noqa: F841
        self._run(
            f"INSERT INTO {quote_identifier(table)} ({columns}) SELECT {columns} FROM Python(flywheel_batch){settings}",
            "CSV",
            None,
        )

    def close(self) -> None:
        connection, self._connection = self._connection, None
        limited, self._limited_connections = self._limited_connections, {}
        for extra in limited.values():
            extra.close()
            _release()
        if connection is not None:
            connection.close()
            _release()

    def _limited(self, limits: Mapping[str, int | str]) -> Connection:
        """A connection of its own for these limits: on a readonly=1 connection no query may change a setting
        (not even a SETTINGS clause the guard writes), so the limits are the connection's from its start,
        beside readonly, where no query can lift them."""
        key = tuple(sorted((check_identifier(name), _limit_value(name, value)) for name, value in limits.items()))
        connection = self._limited_connections.get(key)
        if connection is None:
            if self._connection is None:
                raise ClickHouseError(f"the embedded ClickHouse store at {self.path} is closed")
            import chdb

            options = ([("readonly", "1")] if self.readonly else []) + list(key)
            _acquire(self.path)
            try:
                connection = chdb.connect(f"{self.path}?" + "&".join(f"{name}={value}" for name, value in options))  # type: ignore[no-untyped-call]  # as above
                with _engine_turn:
                    connection.query(f"USE {quote_identifier(self.database)}", "CSV")
            except BaseException:
                if connection is not None:
                    connection.close()
                _release()
                raise
            self._limited_connections[key] = connection
        return connection

    def _retire(self, connection: Connection) -> None:
        for key, held in list(self._limited_connections.items()):
            if held is connection:
                del self._limited_connections[key]
                connection.close()
                _release()

    def _run(self, sql: str, fmt: str, parameters: dict[str, Any] | None, connection: Connection | None = None) -> Any:
        if self._connection is None:
            raise ClickHouseError(f"the embedded ClickHouse store at {self.path} is closed")
        # clickhouse-connect's binder renders values exactly as the server backend sends them.
        final_sql, bound = bind(sql, parameters)
        params = {name.removeprefix("param_"): value for name, value in bound.items()}
        try:
            with _engine_turn:
                return (connection or self._connection).query(
                    final_sql if isinstance(final_sql, str) else final_sql.decode(), fmt, params=params
                )
        except RuntimeError as error:
            raise ClickHouseError(str(error)) from None


def _limit_value(name: str, value: int | str) -> str:
    """A limit's value as it goes into chDB's connection string, where `&`, `=` or `?` would start another option."""
    text = str(int(value)) if isinstance(value, bool | int) else str(value)
    if not re.fullmatch(r"[A-Za-z0-9_.]+", text):
        raise ClickHouseError(f"limit {name}={value!r} is not a number or a plain word")
    return text


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
