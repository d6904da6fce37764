"""services/serving/app.py as `flywheel run serving` builds it: real Triton, real Kafka, real API keys."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path

import httpx
import pytest

from contracts.events import InferenceLogged, PromptPublished
from services.runtime.auth import Role
from services.runtime.service import ServiceFactory, build_process
from services.runtime.settings import FlywheelSettings
from services.serving.app import create_app
from services.serving.inference_log import InferenceLogBuffer
from services.serving.settings import ServingSettings
from tests.integration.test_event_bus import read_all
from tests.fixtures.triton import tritonserver_pids
from tests.serving_support import smollm2_tokenizer, tiny_model
from tests.support import api_key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    tiny_model(len(smollm2_tokenizer(directory))).save_pretrained(str(directory))
    return directory


@pytest.fixture
def app_key(settings: FlywheelSettings) -> str:
    return api_key(settings, Role.app)


def serving_on(model_dir: Path, **settings: object) -> ServiceFactory:
    """Serving's factory with its settings handed in, as `flywheel run serving` hands what it read: the tiny model as `tiny`."""
    return partial(create_app, settings=ServingSettings(model_dir=model_dir, base_model="tiny", **settings))


async def test_serving_process_serves_logs_and_follows_prompt_events(
    settings: FlywheelSettings, topics: str, model_dir: Path, app_key: str
) -> None:
    app, runtime = build_process(settings, [serving_on(model_dir)], title="serving")
    headers = {"Authorization": f"Bearer {app_key}"}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "prompt_ref": {"name": "greeting", "variables": {"shop": "Kettles Ltd"}},
    }
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://serving", headers=headers, timeout=60
        ) as http,
    ):
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["running"] == {"serving.engine_dtype": "float32"}, ready.text  # the default
        assert "tiny" in {card["id"] for card in (await http.get("/v1/models")).json()["data"]}
        assert (
            await http.post("/v1/chat/completions", json=body)
        ).status_code == 404  # the prompt is not published yet

        await runtime.bus("registry").publish(
            PromptPublished(
                prompt_name="greeting",
                version=1,
                template="You work for {{ shop }}.",
                variables=["shop"],
                labels=["production"],
            )
        )
        for _ in range(100):
            served = await http.post("/v1/chat/completions", json=body)
            if served.status_code != 404:
                break
            await asyncio.sleep(0.2)
        assert served.status_code == 200, served.text
    assert tritonserver_pids(settings.home) == [], "tritonserver outlived the process"
    records = await read_all(
        settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(InferenceLogged), expected=10**6, timeout_s=5
    )
    events = {
        json.loads(record.value)["payload"]["inference_id"]: json.loads(record.value)["payload"] for record in records
    }
    logged = events[served.json()["id"]]
    assert (logged["prompt_name"], logged["principal"], logged["status"]) == ("greeting", "test-app", "ok")
    assert "You work for Kettles Ltd." in logged["input_text"]


async def test_triton_is_stopped_when_start_fails_after_it(
    settings: FlywheelSettings, topics: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_start(self: InferenceLogBuffer) -> None:
        raise RuntimeError("inference log cannot start")

    monkeypatch.setattr(InferenceLogBuffer, "start", broken_start)
    app, _ = build_process(settings, [serving_on(model_dir)], title="serving")
    with pytest.raises(RuntimeError, match="inference log cannot start"):
        async with app.router.lifespan_context(app):
            pass
    assert tritonserver_pids(settings.home) == [], "tritonserver outlived a failed start"
