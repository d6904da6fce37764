"""A prompt A/B split declared in the registry reaches serving over the real Kafka: no serving setting,
no app change. The registry and serving run as `flywheel up` composes them (one process, real Triton)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from contracts.events import InferenceLogged
from services.registry.app import create_app as create_registry
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from tests.integration.test_event_bus import read_all
from tests.integration.test_serving_app import serving_on
from tests.fixtures.triton import tritonserver_pids
from tests.serving_support import smollm2_tokenizer, tiny_model

pytestmark = pytest.mark.integration

ADMIN = "fw_boot_split-admin-secret-0123456789"
USERS = [f"user-{index}" for index in range(40)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    tiny_model(len(smollm2_tokenizer(directory))).save_pretrained(str(directory))
    return directory


async def ask_all(http: httpx.AsyncClient) -> list[str]:
    """One chat with prompt_ref per user; the inference ids, in order."""
    ids = []
    for user in USERS:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
            "user": user,
            "prompt_ref": {"name": "greet"},
        }
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


async def test_a_registry_declared_prompt_split_is_served_sticky_per_user(
    settings: FlywheelSettings, topics: str, model_dir: Path
) -> None:
    # 120+ requests from one key: a fast machine outruns the default 10 requests/s, which this test is not about.
    serving = serving_on(model_dir, rate_limit_rps=1000, rate_limit_burst=1000)
    settings = settings.model_copy(update={"bootstrap_admin_key": ADMIN})
    app, runtime = build_process(settings, [create_registry, serving], title="registry+serving")
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://flywheel",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=120,
        ) as http,
    ):
        assert (
            await http.post("/registry/v1/prompts", json={"name": "greet", "template": "You are version one."})
        ).status_code == 201
        # The production label moves only with an approval by another principal: an approver records it, the admin moves it.
        approver = {
            "Authorization": f"Bearer {(await http.post('/registry/v1/keys', json={'principal': 'pat', 'role': 'approver'})).json()['key']}"
        }
        assert (
            await http.post("/registry/v1/prompts/greet/versions/1/approvals", json={}, headers=approver)
        ).status_code == 201
        assert (await http.put("/registry/v1/prompts/greet/labels/production", json={"version": 1})).status_code == 200
        assert (
            await http.post("/registry/v1/prompts", json={"name": "greet", "template": "You are version two."})
        ).status_code == 201
        refused = await http.put(
            "/registry/v1/prompts/greet/labels/production", json={"version": 1, "traffic_percent": 30}
        )
        assert refused.status_code == 422 and (refused.json()["error"]["code"], refused.json()["error"]["param"]) == (
            "invalid_split",
            "traffic_percent",
        )
        declared = await http.put(
            "/registry/v1/prompts/greet/labels/candidate", json={"version": 2, "traffic_percent": 30}
        )
        assert declared.status_code == 200 and declared.json()["label_traffic"] == {"candidate": 30.0}
        assert (await http.get("/registry/v1/prompts/greet", params={"label": "candidate"})).json()[
            "label_traffic"
        ] == {"candidate": 30.0}

        # Serving follows prompt.published from Kafka: wait until it renders the prompt at all.
        probe = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
            "prompt_ref": {"name": "greet", "label": "candidate"},
        }
        for _ in range(150):
            if (await http.post("/v1/chat/completions", json=probe)).status_code == 200:
                break
            await asyncio.sleep(0.2)
        split = await ask_all(http) + await ask_all(http)

        ended = await http.put("/registry/v1/prompts/greet/labels/candidate", json={"version": 2, "traffic_percent": 0})
        assert ended.status_code == 200 and ended.json()["label_traffic"] == {}
        await asyncio.sleep(3)  # the re-published prompt.published travels through Kafka
        after = await ask_all(http)
    assert tritonserver_pids(settings.home) == []

    records = await read_all(
        settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(InferenceLogged), expected=10**6, timeout_s=5
    )
    events = {
        payload["inference_id"]: payload for payload in (json.loads(record.value)["payload"] for record in records)
    }
    versions: dict[str, set[int]] = {}
    for inference_id in split:
        event = events[inference_id]
        versions.setdefault(event["user_id"], set()).add(event["prompt_version"])
        assert (event["route"] == "ab") == (event["prompt_version"] == 2) and event["prompt_name"] == "greet"
        assert f"You are version {'two' if event['prompt_version'] == 2 else 'one'}." in event["input_text"]
    assert all(len(seen) == 1 for seen in versions.values()), "a user saw both prompt versions"
    candidates = [user for user, seen in versions.items() if seen == {2}]
    assert 0 < len(candidates) < len(USERS), f"{len(candidates)} of {len(USERS)} users on the candidate"
    assert {events[inference_id]["prompt_version"] for inference_id in after} == {1}, "the split outlived its end"
