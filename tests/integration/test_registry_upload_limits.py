"""Oversize uploads are refused at the door with 413 before their body is read whole, and write nothing
(not even an audit row: a flood of oversize bodies costs the caller, not the platform)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from contracts.http import Role
from services.registry.api import MAX_BODY_BYTES, create_router, dataset_body_limit
from services.registry.service import Registry
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.auth import Authenticator, KeyStore
from services.runtime.http import create_http_app
from tests.integration.registry_support import CHAT, jsonl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MAX_DATASET = 1000
CHUNK = 16 * 1024


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    store = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    store.migrate()
    yield Registry(store, ArtifactStore(tmp_path / "artifacts"), max_dataset_bytes=MAX_DATASET)
    store.close()


@pytest.fixture
async def door(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    keys = KeyStore(registry.store.engine)
    key, _ = keys.create(principal="olga", role=Role.operator, created_by="test")
    app = create_http_app("registry-limits", routers=[create_router(registry, Authenticator(keys))])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://registry", headers={"Authorization": f"Bearer {key}"}
    ) as client:
        yield client


def upload(size: int) -> bytes:
    return json.dumps({"name": "big", "split": "train", "jsonl": "x" * size}).encode()


def refusals(registry: Registry) -> list[tuple[str, str]]:
    return [
        (entry.actor, (entry.detail or "").split(":")[0])
        for entry in registry.changes.entries().items
        if entry.outcome == "refused"
    ]


async def test_a_declared_oversize_upload_is_refused_by_its_content_length(
    door: httpx.AsyncClient, registry: Registry
) -> None:
    body = upload(dataset_body_limit(MAX_DATASET))
    response = await door.post("/registry/v1/datasets", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert (
        response.json()["error"]["code"] == "request_too_large"
        and f"{len(body)} bytes" in response.json()["error"]["message"]
    )
    assert registry.datasets.list_datasets().items == [] and refusals(registry) == []


async def test_a_streamed_oversize_upload_is_refused_before_it_is_read_whole(
    door: httpx.AsyncClient, registry: Registry
) -> None:
    body = upload(4 * dataset_body_limit(MAX_DATASET))
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the door must count
        for start in range(0, len(body), CHUNK):
            sent.append(start)
            yield body[start : start + CHUNK]

    response = await door.post("/registry/v1/datasets", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert len(sent) * CHUNK <= dataset_body_limit(MAX_DATASET) + 2 * CHUNK < len(body)
    assert registry.datasets.list_datasets().items == [] and refusals(registry) == []


async def test_bodies_under_the_cap_pass_and_the_dataset_limit_still_holds(
    door: httpx.AsyncClient, registry: Registry
) -> None:
    small = await door.post(
        "/registry/v1/datasets", json={"name": "support", "split": "train", "jsonl": jsonl(CHAT[:1]).decode()}
    )
    assert small.status_code == 201, small.text
    # Within the body cap but over the dataset limit once decoded: the service's own, exact 413.
    over = await door.post(
        "/registry/v1/datasets", json={"name": "support", "split": "train", "jsonl": jsonl(CHAT * 10).decode()}
    )
    assert over.status_code == 413 and over.json()["error"]["code"] == "dataset_too_large"
    prompt = await door.post("/registry/v1/prompts", json={"name": "p", "template": "x" * MAX_BODY_BYTES})
    assert prompt.status_code == 413 and prompt.json()["error"]["code"] == "request_too_large"
    assert [d.version for d in registry.datasets.list_datasets().items] == [1]
