"""Helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contracts.http import Role
    from services.runtime.settings import FlywheelSettings


async def eventually(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 60.0, what: str = "condition", interval_s: float = 0.05) -> None:
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


def api_key(settings: FlywheelSettings, role: Role) -> str:
    """A new API key of `role` in the registry database every door of `settings` checks keys against."""
    from services.runtime.auth import ApiKey, KeyStore, create_database_engine, registry_database_url

    engine = create_database_engine(registry_database_url(settings))
    try:
        ApiKey.metadata.create_all(engine, tables=[ApiKey.__table__])  # type: ignore[attr-defined]
        return KeyStore(engine).create(principal=f"test-{role.value}", role=role, created_by="test")[0]
    finally:
        engine.dispose()
