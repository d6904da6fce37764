"""A ClickHouse server over HTTP(S) through clickhouse-connect."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from services.runtime.clickhouse.store import (
    ClickHouseError,
    ClickHouseStore,
    ServerAddress,
    bind,
    check_identifier,
    quote_identifier,
)
from services.runtime.errors import ConfigurationError

if TYPE_CHECKING:
    import pyarrow
    from clickhouse_connect.driver.client import Client

_CONNECT_TIMEOUT_S = 5


class ServerStore(ClickHouseStore):
    def __init__(self, client: Client, address: ServerAddress, database: str, readonly: bool) -> None:
        self._client: Client | None = client
        self.address = address
        self.database = database
        self.readonly = readonly

    @classmethod
    def open(cls, address: ServerAddress, database: str, readonly: bool) -> ServerStore:
        """Connect to the server at `address` and use `database`, creating it unless `readonly`."""
        import clickhouse_connect
        from clickhouse_connect.driver.exceptions import Error

        # clickhouse-connect (and urllib3 under it, whose level it resets on import) log a failed
        # first request before raising; the raised error is reported here, once, as the one line a
        # user reads.
        quieted = {name: logging.getLogger(name).level for name in ("clickhouse_connect", "urllib3")}
        for name in quieted:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            client = clickhouse_connect.get_client(
                host=address.host,
                port=address.port,
                username=address.username,
                password=address.password,
                secure=address.secure,
                connect_timeout=_CONNECT_TIMEOUT_S,
                # Sent with every request: the server refuses writes, DDL and any later change of settings.
                settings={"readonly": 1} if readonly else None,
                # Timestamps keep their UTC zone, as chDB returns them.
                tz_mode="aware",
                autogenerate_session_id=False,
            )
        except Error as error:
            raise ConfigurationError(
                f"cannot reach ClickHouse at {address.redacted} (FLYWHEEL_CLICKHOUSE_URL): {_reason(error)}"
            ) from None
        finally:
            for name, level in quieted.items():
                logging.getLogger(name).setLevel(level)
        store = cls(client, address, database, readonly)
        try:
            if not readonly:
                store.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
            elif not store.query("SELECT 1 FROM system.databases WHERE name = {name:String}", {"name": database}):
                raise ConfigurationError(
                    f"database {database!r} does not exist on {address.redacted}: open it writable once to run the migrations"
                )
        except BaseException:
            store.close()
            raise
        client.database = database
        return store

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        from clickhouse_connect.driver.exceptions import Error

        try:
            self._live().command(sql, parameters=parameters)
        except Error as error:
            raise ClickHouseError(str(error)) from None

    def query_arrow(
        self, sql: str, parameters: dict[str, Any] | None = None, *, limits: Mapping[str, int | str] | None = None
    ) -> pyarrow.Table:
        from clickhouse_connect.driver.exceptions import Error

        bind(sql, parameters)  # refuses what cannot be bound, as the embedded backend does
        try:
            # Per-query settings travel as URL parameters of the same request as the client's readonly=1,
            # which the server checks against the user's profile before applying both: a query cannot lift them.
            return self._live().query_arrow(
                sql, parameters=parameters, settings=dict(limits) if limits else None, use_strings=True
            )
        except Error as error:
            raise ClickHouseError(str(error)) from None

    def insert_arrow(self, table: str, data: pyarrow.Table, dedup_token: str | None = None) -> None:
        from clickhouse_connect.driver.exceptions import Error

        # clickhouse-connect sends `INSERT INTO t (<arrow column names>) FORMAT Arrow`: columns bind by name.
        settings = {"insert_deduplication_token": dedup_token} if dedup_token is not None else None
        try:
            self._live().insert_arrow(check_identifier(table), data, settings=settings)
        except Error as error:
            raise ClickHouseError(str(error)) from None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _live(self) -> Client:
        if self._client is None:
            raise ClickHouseError(f"the ClickHouse store for {self.address.redacted} is closed")
        return self._client


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _reason(error: BaseException) -> str:
    """The root cause of a connection failure (e.g. `Connection refused`), not urllib3's retry story."""
    line = _first_line(error)
    cause = re.search(r"\[Errno -?\d+\] ([^\"')]+)", line)
    return cause.group(1).strip() if cause else line
