"""Helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import uvicorn

from infra.processes import free_port

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from contracts.http import Role
    from services.runtime.settings import FlywheelSettings


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 60.0,
    what: str = "condition",
    interval_s: float = 0.05,
) -> None:
    """Wait until `condition()` holds (awaited when it is a coroutine function), or fail naming `what` after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s

    async def holds() -> bool:
        # A coroutine is truthy: returned unawaited, it would pass every check at once.
        outcome = condition()
        return bool(await outcome) if inspect.isawaitable(outcome) else bool(outcome)

    while not await holds():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


@asynccontextmanager
async def served(
    app: ASGIApp, *, port: int | None = None, lifespan: Literal["on", "off"] = "on", start_timeout_s: float = 60
) -> AsyncIterator[str]:
    """`app` served by uvicorn on `port` (a free one if None), its lifespan run as a process runs it when
    `lifespan` is on; yields its base URL, and stops the server on the way out even when the test fails."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan=lifespan))
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or serving.done(), start_timeout_s, what=f"uvicorn listening on {port}")
        assert not serving.done(), f"uvicorn did not start: {serving.exception()}"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=60)


def api_key(settings: FlywheelSettings, role: Role, principal: str | None = None) -> str:
    """A new API key of `role` in the registry database of `settings`. The store is offered to the doors
    of this process as the registry built here would offer it, so an app built in the test without the
    registry checks keys against it (services never open the registry's database themselves)."""
    from services.runtime.auth import ApiKey, KeyStore, LocalKeys, create_database_engine, registry_database_url

    database_url = registry_database_url(settings)
    store = _key_stores.get(database_url)
    if store is None:
        engine = create_database_engine(database_url)
        ApiKey.metadata.create_all(engine, tables=[ApiKey.__table__])  # type: ignore[attr-defined]
        store = _key_stores[database_url] = KeyStore(engine)
        LocalKeys.register(database_url, store)
    return store.create(principal=principal or f"test-{role.value}", role=role, created_by="test")[0]


_key_stores: dict[str, Any] = {}
