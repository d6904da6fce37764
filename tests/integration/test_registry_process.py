"""The registry as a running service on the real Kafka broker: its door, its handlers and its outbox.

A redelivered training.completed makes one adapter version; every committed change reaches its topic
once; lineage walks from the production adapter back to the dataset rows; a promotion to production
uses an approval another principal recorded; calls refused by a rule are audited, refusals of the caller
(no key, too low a role, a body that does not parse) write nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from contracts.envelope import wrap
from contracts.events import DatasetRef, EvaluationCompleted, Hyperparameters, ModelTarget, TrainingCompleted
from contracts.topics import topic_for
from services.registry.app import create_app
from services.runtime.artifacts import ArtifactStore
from services.runtime.broker import EventBus, create_broker
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from tests.integration.registry_support import CHAT, jsonl
from tests.integration.test_event_bus import read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ADMIN = "fw_boot_test-admin-secret-0123456789"


async def eventually(check: Callable[[], object], timeout_s: float = 60.0) -> object:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await check()  # type: ignore[misc]
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.2)


@pytest.fixture
async def door(settings: FlywheelSettings, topics: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings.model_copy(update={"bootstrap_admin_key": ADMIN})
    app, _ = build_process(settings, [create_app], title="registry-test")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://registry", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as client:
            yield client


def adapter_dir(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"lora_A": torch.ones(2, 2)}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"r": 2}))
    return path


async def test_events_in_and_out_lineage_to_dataset_rows(
    door: httpx.AsyncClient, settings: FlywheelSettings, tmp_path: Path
) -> None:
    artifacts = ArtifactStore(settings.home / "artifacts")
    weights = artifacts.put_bytes(b'{"base": true}', kind="json")
    created = await door.post(
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
    assert created.status_code == 201, created.text
    dataset = await door.post(
        "/registry/v1/datasets", json={"name": "support", "split": "train", "jsonl": jsonl(CHAT).decode()}
    )
    assert dataset.status_code == 201 and dataset.json()["row_count"] == 2

    adapter = artifacts.put_directory(adapter_dir(tmp_path / "adapter"))
    completed = TrainingCompleted(
        job_id="job-1",
        model_name="smol",
        dataset=DatasetRef(name="support", version=1),
        hyperparameters=Hyperparameters(rank=2),
        artifact_uri=adapter.uri,
        artifact_sha256=adapter.sha256,
        metrics={"final_loss": 0.4},
    )
    envelope = wrap(completed, producer="trainer", correlation_id="corr-1")
    publisher = create_broker(settings, client_id="test-trainer")
    async with publisher:
        await publisher.start()
        bus = EventBus(publisher, producer="trainer", topic_prefix=settings.topic_prefix)
        for _ in range(2):  # a redelivery: the same envelope twice
            await bus.publish_envelope(envelope)
        await bus.publish(completed)  # the same job re-sent under a new event id

        async def one_adapter() -> list:
            return (await door.get("/registry/v1/adapters", params={"model_name": "smol"})).json()["items"]

        adapters = await eventually(one_adapter)
        verdict = EvaluationCompleted(
            evaluation_id="eval-1",
            candidate=ModelTarget(model_name="smol", adapter_version=1),
            golden=DatasetRef(name="support", version=1),
            passed=True,
            gate_policy="default@v1",
        )
        await bus.publish(verdict)

        async def evaluated() -> bool:
            return bool((await door.get("/registry/v1/adapters/smol/versions/1/lineage")).json()["evaluations"])

        await eventually(evaluated)
    assert [a["version"] for a in adapters] == [1]

    approver = (await door.post("/registry/v1/keys", json={"principal": "pat", "role": "approver"})).json()["key"]
    approval = await door.post(
        "/registry/v1/adapters/smol/versions/1/approvals",
        json={"comment": "gate passed"},
        headers={"Authorization": f"Bearer {approver}"},
    )
    assert approval.status_code == 201, approval.text
    for stage in ("staging", "production"):
        moved = await door.post(
            "/registry/v1/adapters/smol/versions/1/transitions", json={"to_stage": stage, "reason": "gate passed"}
        )
        assert moved.status_code == 200, moved.text
    assert (await door.get("/registry/v1/adapters/smol/versions/1")).json()["stage"] == "production"

    # Lineage: from the production adapter to the exact rows it was trained on.
    production = (await door.get("/registry/v1/adapters", params={"stage": "production"})).json()["items"][0]
    lineage = (await door.get(f"/registry/v1/adapters/smol/versions/{production['version']}/lineage")).json()
    source = lineage["dataset"]
    rows = (await door.get(f"/registry/v1/datasets/{source['name']}/versions/{source['version']}/rows")).json()
    assert (
        rows == CHAT
        and lineage["training_job_id"] == "job-1"
        and lineage["evaluations"][0]["evaluation_id"] == "eval-1"
    )

    bootstrap = settings.kafka_bootstrap or ""
    registered = await read_all(
        bootstrap, topic_for("adapter.registered", settings.topic_prefix), expected=2, timeout_s=10
    )
    assert len(registered) == 1 and json.loads(registered[0].value)["correlation_id"] == "corr-1"
    changes = await read_all(bootstrap, topic_for("stage.changed", settings.topic_prefix), expected=2)
    assert [json.loads(r.value)["payload"]["to_stage"] for r in changes] == ["staging", "production"]
    assert [json.loads(r.value)["payload"]["actor"] for r in changes] == ["bootstrap-admin", "bootstrap-admin"]
    assert [json.loads(r.value)["payload"]["approver"] for r in changes] == [None, "pat"]
    assert len(await read_all(bootstrap, topic_for("model.registered", settings.topic_prefix), expected=1)) == 1
    assert len(await read_all(bootstrap, topic_for("dataset.published", settings.topic_prefix), expected=1)) == 1


async def test_refused_calls_are_precise_change_nothing_and_only_rule_refusals_are_audited(
    door: httpx.AsyncClient,
) -> None:
    viewer = (await door.post("/registry/v1/keys", json={"principal": "vic", "role": "viewer"})).json()["key"]
    anonymous = await door.post(
        "/registry/v1/prompts", json={"name": "p", "template": "x"}, headers={"Authorization": ""}
    )
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    under = await door.post(
        "/registry/v1/prompts", json={"name": "p", "template": "x"}, headers={"Authorization": f"Bearer {viewer}"}
    )
    assert under.status_code == 403 and "needs operator" in under.json()["error"]["message"]
    malformed = await door.post("/registry/v1/prompts", json={"name": "p", "template": "x", "typo": 1})
    assert malformed.status_code == 422 and malformed.json()["error"]["param"] == "typo"
    bad_lines = await door.post(
        "/registry/v1/datasets",
        json={"name": "d", "split": "train", "jsonl": '{"instruction": "a", "output": "b"}\n{oops\n'},
    )
    assert bad_lines.status_code == 422 and "line 2: not JSON" in bad_lines.json()["error"]["message"]
    unknown = await door.post("/registry/v1/adapters/nope/versions/1/transitions", json={"to_stage": "staging"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert (await door.get("/registry/v1/prompts")).json()["items"] == []
    assert (await door.get("/registry/v1/datasets")).json()["items"] == []
    refusals = [
        (e["actor"], e["detail"].split(":")[0])
        for e in (await door.get("/registry/v1/audit")).json()["items"]
        if e["outcome"] == "refused"
    ]
    assert refusals == [("bootstrap-admin", "422 invalid_jsonl"), ("bootstrap-admin", "404 model_not_found")]
    by_actor = (await door.get("/registry/v1/audit", params={"actor": "vic"})).json()["items"]
    assert by_actor == []
