"""The runtime's registry client (services/runtime/registry_client.py) against the real registry: built by
services.registry.app.create_app under build_process on real Kafka and served over HTTP by uvicorn, as
`flywheel run registry` serves it. Answers come back as the contract's models; a refusal and a registry
that does not answer are the one RegistryError, carrying the door's own message and code."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from infra.processes import free_port
from contracts.events import Stage
from contracts.http import AdapterVersionView, DatasetCreate, DatasetVersionView, LineageView, StageTransition
from services.registry.app import create_app
from services.registry.service import Registry
from services.registry.store import RegistryStore
from services.runtime.auth import registry_database_url
from services.runtime.doors import bearer_header
from services.runtime.registry_client import RegistryClient, RegistryError, RegistrySyncClient
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from tests.integration.registry_support import CHAT, jsonl, seed_production_and_approved_candidate
from tests.support import served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ADMIN = "fw_boot_registry-client-admin-secret-0123456789"
MODEL = "smol"


@dataclass(frozen=True)
class LiveRegistry:
    url: str


def seed(registry: Registry, tmp_path: Path) -> None:
    """smol v1 in production, v2 its declared canary (20 %), both trained on support:v1."""
    seed_production_and_approved_candidate(registry, tmp_path, MODEL)
    registry.adapters.transition("alice", model_name=MODEL, version=2, to_stage=Stage.production, canary_percent=20)


@pytest.fixture
async def live(settings: FlywheelSettings, topics: str, tmp_path: Path) -> AsyncIterator[LiveRegistry]:
    settings = settings.model_copy(update={"bootstrap_admin_key": ADMIN})
    app, runtime = build_process(settings, [create_app], title="flywheel-registry")
    store: RegistryStore | None = None
    try:
        async with served(app) as url:
            # Seeded through a second handle on the same database, off the event loop: the served registry's
            # outbox relay holds its write transaction while it publishes through this loop.
            store = RegistryStore(registry_database_url(settings))
            await asyncio.to_thread(seed, Registry(store, runtime.artifacts), tmp_path)
            yield LiveRegistry(url)
    finally:
        if store is not None:
            store.close()


async def test_the_client_reads_and_writes_the_door_as_the_contracts_models(live: LiveRegistry) -> None:
    client = RegistryClient(live.url, ADMIN)

    page = await client.adapters(model_name=MODEL, stage=Stage.production)
    assert all(isinstance(item, AdapterVersionView) for item in page.items)
    assert sorted((item.version, item.stage, item.canary_percent) for item in page.items) == [
        (1, Stage.production, None),
        (2, Stage.production, 20.0),
    ]

    # The full production version's lineage, not the canary's beside it.
    lineage = await client.production_lineage(MODEL)
    assert isinstance(lineage, LineageView)
    assert (
        lineage.adapter.version == 1
        and lineage.dataset is not None
        and (lineage.dataset.name, lineage.dataset.version) == ("support", 1)
    )
    assert await client.production_lineage("no-such-model") is None

    # Read page by page (one row a page here), every record comes back in order.
    assert await client.dataset_rows("support", 1, page_size=1) == CHAT

    published = await client.publish_dataset(
        DatasetCreate(
            name="smol-feedback", split="train", jsonl=jsonl(CHAT[:1]).decode(), provenance="feedback", model_name=MODEL
        )
    )
    assert isinstance(published, DatasetVersionView)
    assert (published.name, published.version, published.row_count, published.provenance, published.created_by) == (
        "smol-feedback",
        1,
        1,
        "feedback",
        "bootstrap-admin",
    )
    assert await client.dataset_rows("smol-feedback", 1) == CHAT[:1]

    archived = await client.transition(
        MODEL, 2, StageTransition(to_stage=Stage.archived, reason="canary rolled back by the test")
    )
    assert (archived.version, archived.stage, archived.canary_percent) == (2, Stage.archived, None)
    assert [item.version for item in (await client.adapters(model_name=MODEL, stage=Stage.archived)).items] == [2]


async def test_a_refusal_carries_the_doors_message_and_code_and_an_unreachable_registry_is_the_same_error(
    live: LiveRegistry,
) -> None:
    # What the door itself answers, read without the client, is what the error carries.
    async with httpx.AsyncClient(base_url=live.url, headers=bearer_header(ADMIN)) as raw:
        answer = await raw.post(f"/registry/v1/adapters/{MODEL}/versions/99/transitions", json={"to_stage": "archived"})
    door_error = answer.json()["error"]
    with pytest.raises(RegistryError) as missing:
        await RegistryClient(live.url, ADMIN).transition(MODEL, 99, StageTransition(to_stage=Stage.archived))
    assert answer.status_code == 404 and door_error["code"]
    assert (missing.value.status, missing.value.code) == (404, door_error["code"]) and missing.value.refused
    assert door_error["message"] in str(missing.value)

    with pytest.raises(RegistryError) as anonymous:
        await RegistryClient(live.url, None).adapters()
    assert anonymous.value.status == 401 and anonymous.value.code == "missing_api_key"

    # A port nothing listens on: no answer at all, so no status, and the message says where it looked.
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError) as unreachable:
        await RegistryClient(nowhere, ADMIN, timeout_s=5).adapters()
    assert unreachable.value.status is None and not unreachable.value.refused and nowhere in str(unreachable.value)
    # Nothing was changed by the refused move.
    assert {item.version for item in (await RegistryClient(live.url, ADMIN).adapters(model_name=MODEL)).items} == {1, 2}


async def test_the_commands_sync_client_sees_what_the_async_one_sees(live: LiveRegistry) -> None:
    # A command has no event loop; here the server shares this test's loop, so the call runs in a thread.
    synced = await asyncio.to_thread(RegistrySyncClient(live.url, ADMIN).adapters, model_name=MODEL, limit=500)
    awaited = await RegistryClient(live.url, ADMIN).adapters(model_name=MODEL, limit=500)
    assert synced == awaited and len(synced.items) == 2
    assert json.loads(synced.model_dump_json())["items"][0]["model_name"] == MODEL

    with pytest.raises(RegistryError) as wrong_key:
        await asyncio.to_thread(RegistrySyncClient(live.url, "fw_000000000000_not-a-real-secret").adapters)
    assert wrong_key.value.status == 401 and wrong_key.value.refused


async def test_ops_models_prints_the_adapters_the_door_lists(live: LiveRegistry, tmp_path: Path) -> None:
    # The command as a user runs it, finding the registry at FLYWHEEL_HTTP_HOST:PORT with FLYWHEEL_API_KEY.
    address = urlsplit(live.url)
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(tmp_path / "client-home"),
        "FLYWHEEL_HTTP_HOST": str(address.hostname),
        "FLYWHEEL_HTTP_PORT": str(address.port),
        "FLYWHEEL_API_KEY": ADMIN,
        "COLUMNS": "250",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "flywheel"),
        "ops",
        "models",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(command.communicate(), timeout=120)
    assert command.returncode == 0, stderr.decode()[-2000:]
    rows = [line for line in stdout.decode().splitlines() if f" {MODEL} " in line]
    assert len(rows) == 2 and all("production" in row and "support" in row for row in rows), stdout.decode()
    assert any("20.0" in row for row in rows), "the canary's share is printed"

    env["FLYWHEEL_API_KEY"] = "fw_000000000000_not-a-real-secret"
    refused = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "flywheel"),
        "ops",
        "models",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(refused.communicate(), timeout=120)
    assert refused.returncode != 0 and "registry refused GET /registry/v1/adapters (401)" in " ".join(
        stderr.decode().split()
    ), stderr.decode()
