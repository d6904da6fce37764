"""A process whose FLYWHEEL_ARTIFACT_ROOT points outside FLYWHEEL_HOME keeps every artifact there: the
registry, built by its factory on the real broker, reads the base model's weights from that store,
writes an uploaded dataset into it, and nothing lands in the home's default store.
(Serving loading its adapters from such a store: tests/integration/test_serving_replicas.py.)"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from services.registry.app import create_app
from services.runtime.artifacts import ArtifactStore, default_artifact_root
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from tests.integration.registry_support import CHAT, jsonl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ADMIN = "fw_boot_test-admin-secret-0123456789"


async def test_the_registry_reads_and_writes_the_configured_store_only(
    settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    settings = settings.model_copy(update={"bootstrap_admin_key": ADMIN, "artifact_root": str(elsewhere)})
    weights = ArtifactStore(elsewhere).put_bytes(b'{"base": true}', kind="json")
    app, runtime = build_process(settings, [create_app], title="registry-test")
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://registry",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as door,
    ):
        model = await door.post(
            "/registry/v1/models",
            json={
                "name": "smol",
                "source": "test",
                "architecture": "LlamaForCausalLM",
                "parameter_count": 135,
                "artifact_uri": weights.uri,
                "artifact_sha256": weights.sha256,
            },
        )
        assert model.status_code == 201, model.text
        dataset = await door.post(
            "/registry/v1/datasets", json={"name": "support", "split": "train", "jsonl": jsonl(CHAT).decode()}
        )
        assert dataset.status_code == 201, dataset.text
        rows = await door.get("/registry/v1/datasets/support/versions/1/rows")
    assert rows.json() == CHAT
    stored = dataset.json()["artifact_uri"]
    assert stored.startswith(elsewhere.as_uri() + "/") and runtime.artifacts.exists(stored)
    assert Path(stored.removeprefix("file://")).is_file()
    assert not default_artifact_root(settings.home).exists(), "something was written to the default store"
