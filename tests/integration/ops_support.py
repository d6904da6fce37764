"""Shared pieces of the `flywheel ops` dataset tests: a real registry (services.registry.app.create_app under
build_process on real Kafka, served by uvicorn) with a bootstrap admin key, and the command run as a user
runs it, in a process of its own beside the store a seed subprocess wrote (chDB lets one process own a
data directory)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infra.processes import free_port
from services.registry.app import create_app
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from tests.conftest import REPO
from tests.support import served

ADMIN = "fw_boot_ops-dataset-admin-secret-0123456789"
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


@pytest.fixture
async def registry_url(settings: FlywheelSettings, topics: str) -> AsyncIterator[str]:
    settings = settings.model_copy(update={"bootstrap_admin_key": ADMIN})
    app, _ = build_process(settings, [create_app], title="flywheel-registry")
    async with served(app) as url:
        yield url


def ops_env(home: Path) -> dict[str, str]:
    """The caller's environment: FLYWHEEL_HOME at `home`, the admin's key, and a port no monitor answers on
    (so the command reads the store itself)."""
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")},
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_HTTP_PORT": str(free_port()),
        "FLYWHEEL_API_KEY": ADMIN,
        "PYTHONDONTWRITEBYTECODE": "1",
    }


async def run_ops(home: Path, *arguments: str) -> tuple[int, str, str]:
    """`flywheel ops ARGUMENTS` under `home`: exit code, stdout, and stderr with its whitespace folded."""
    # The registry is served on this test's event loop: the command runs beside it, not blocking it.
    command = await asyncio.create_subprocess_exec(
        FLYWHEEL,
        "ops",
        *arguments,
        cwd=REPO,
        env=ops_env(home),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(command.communicate(), timeout=180)
    assert command.returncode is not None
    return command.returncode, stdout.decode(), " ".join(stderr.decode().split())
