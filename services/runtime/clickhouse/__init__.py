"""ClickHouse storage: one interface, two backends (embedded chDB, a server over HTTP), shared migrations."""

from services.runtime.clickhouse.factory import open_clickhouse
from services.runtime.clickhouse.store import (
    DEFAULT_DATABASE,
    ClickHouseError,
    ClickHouseStore,
    Migration,
    ServerAddress,
    load_migrations,
    parse_server_url,
)

__all__ = [
    "DEFAULT_DATABASE",
    "ClickHouseError",
    "ClickHouseStore",
    "Migration",
    "ServerAddress",
    "load_migrations",
    "open_clickhouse",
    "parse_server_url",
]
