"""Which ClickHouse backend a URL names, opened: its own module because the backends import the interface
(store.py), so the interface cannot import them without an import circle."""

from __future__ import annotations

from pathlib import Path

from services.runtime.clickhouse.store import (
    DEFAULT_DATABASE,
    ClickHouseStore,
    check_identifier,
    parse_server_url,
)


def open_clickhouse(
    url: str | None, home: Path, *, readonly: bool = False, database: str | None = None
) -> ClickHouseStore:
    """Open the store `url` names: None is embedded chDB under `home/clickhouse`, http(s):// a server."""
    # Imported here: a process opens one backend, and each drags in its own engine or client library.
    if url is None:
        from services.runtime.clickhouse.embedded import EmbeddedStore

        return EmbeddedStore.open(Path(home) / "clickhouse", check_identifier(database or DEFAULT_DATABASE), readonly)
    from services.runtime.clickhouse.server import ServerStore

    address = parse_server_url(url)
    return ServerStore.open(address, check_identifier(database or address.database or DEFAULT_DATABASE), readonly)
