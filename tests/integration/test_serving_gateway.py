"""The OpenAI-compatible gateway over a real Triton, logging every inference to the real Kafka."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from contracts.events import Stage
from services.runtime.http import create_http_app
from services.runtime.service import Runtime
from services.runtime.settings import FlywheelSettings
from services.serving.api import create_router
from services.serving.engine import Engine
from services.serving.gateway import Gateway
from services.serving.inference_log import InferenceLogBuffer
from services.serving.routes import Routes
from services.serving.settings import ServingSettings
from services.serving.triton import TritonServing
from tests.integration.test_event_bus import read_all
from tests.serving_support import make_adapter, smollm2_tokenizer, tiny_engine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    tokenizer = smollm2_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    engine = tiny_engine(tokenizer)
    adapters = tmp_path_factory.mktemp("adapters")
    for version in (1, 2):
        engine.load_adapter(f"tiny:v{version}", make_adapter(len(tokenizer), adapters / f"v{version}", seed=version))
    return engine


@pytest.fixture(scope="module")
def triton(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServing]:
    serving = TritonServing(engine, workdir=tmp_path_factory.mktemp("triton"), max_batch_size=8, max_queue_delay_us=2_000)
    try:
        serving.start()
        yield serving
    finally:
        serving.stop()


def routes() -> Routes:
    table = Routes()
    table.add_model("tiny")
    for version in (1, 2, 3):
        table.add_version("tiny", version, f"file:///adapters/v{version}", "0" * 64)
    table.set_stage("tiny", 1, Stage.production)
    table.set_stage("tiny", 2, Stage.staging)
    return table


@pytest.fixture
async def runtime(settings: FlywheelSettings, topics: str) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings, client_id="serving-test")
    await runtime.broker.start()
    try:
        yield runtime
    finally:
        await runtime.broker.stop()
        runtime.close()


async def gateway_client(engine: Engine, grpc_url: str, runtime: Runtime) -> tuple[httpx.AsyncClient, Gateway, InferenceLogBuffer]:
    buffer = InferenceLogBuffer(runtime.bus("serving"), capacity=100)
    await buffer.start()
    gateway = Gateway(
        routes=routes(), tokenizer=engine.tokenizer, triton_grpc_url=grpc_url,
        settings=ServingSettings(max_prompt_tokens=200, max_tokens_limit=16, default_max_tokens=4), log_buffer=buffer,
        loaded_adapters=lambda: set(engine.adapters),
    )
    app = create_http_app("serving-test", routers=[create_router(lambda: gateway)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway"), gateway, buffer


@pytest.fixture
async def client(engine: Engine, triton: TritonServing, runtime: Runtime) -> AsyncIterator[tuple[httpx.AsyncClient, InferenceLogBuffer]]:
    assert triton.ports is not None
    http, gateway, buffer = await gateway_client(engine, triton.ports.grpc_url, runtime)
    try:
        yield http, buffer
    finally:
        await http.aclose()
        await gateway.close()
        await buffer.stop()


async def test_chat_completion_non_stream_and_stream(client, runtime: Runtime, settings: FlywheelSettings) -> None:
    http, buffer = client
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    done = response.json()
    assert done["object"] == "chat.completion" and done["model"] == "tiny:v1"
    assert done["usage"]["completion_tokens"] == 5 and done["choices"][0]["finish_reason"] == "length"

    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in streamed.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == done["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[0]["id"] != done["id"]

    await buffer.stop()
    records = await read_all(settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(_inference_logged()), expected=2)
    payloads = [json.loads(record.value)["payload"] for record in records]
    assert {payload["inference_id"] for payload in payloads} == {done["id"], chunks[0]["id"]}
    logged = next(payload for payload in payloads if payload["inference_id"] == done["id"])
    assert logged["adapter_version"] == 1 and logged["route"] == "production" and logged["status"] == "ok"
    assert logged["completion_tokens"] == 5 and logged["output_text"] == done["choices"][0]["message"]["content"]
    assert logged["latency_total_ms"] >= logged["latency_compute_ms"] > 0


def _inference_logged():
    from contracts.events import InferenceLogged

    return InferenceLogged


async def test_completions_and_model_selection(client) -> None:
    http, _ = client
    models = (await http.get("/v1/models")).json()
    assert {"tiny", "tiny@production", "tiny@staging", "tiny:v2"} <= {card["id"] for card in models["data"]}
    texts = {}
    for reference, resolved in (("tiny", "tiny:v1"), ("tiny@staging", "tiny:v2"), ("tiny:v2", "tiny:v2")):
        response = await http.post("/v1/completions", json={"model": reference, "prompt": "Once upon", "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == resolved and response.json()["object"] == "text_completion"
        texts[reference] = response.json()["choices"][0]["text"]
    assert texts["tiny@staging"] == texts["tiny:v2"] != texts["tiny"]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model_not_found", "model"),
        ({"model": "tiny:v9", "prompt": "x"}, 404, "model_not_found", "model"),
        ({"model": "tiny:v3", "prompt": "x"}, 404, "model_not_loaded", "model"),
        ({"model": "tiny", "prompt": "word " * 300}, 400, "context_length_exceeded", "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 17}, 400, "invalid_value", "max_tokens"),
        ({"model": "tiny", "prompt": "x", "temperature": 5}, 422, None, "temperature"),
        ({"model": "tiny", "prompt": "x", "bogus": 1}, 422, None, "bogus"),
    ],
)
async def test_errors_are_openai_error_objects(client, body: dict, status: int, code: str | None, param: str) -> None:
    http, _ = client
    response = await http.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


async def test_triton_down_is_503_and_logged_as_an_error(engine: Engine, runtime: Runtime, settings: FlywheelSettings) -> None:
    from services.serving.triton import free_port

    http, gateway, buffer = await gateway_client(engine, f"127.0.0.1:{free_port()}", runtime)
    try:
        response = await http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    finally:
        await http.aclose()
        await gateway.close()
        await buffer.stop()
    assert response.status_code == 503 and response.json()["error"]["code"] == "triton_unavailable"
    records = await read_all(settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(_inference_logged()), expected=1)
    logged = json.loads(records[0].value)["payload"]
    assert logged["status"] == "error" and logged["finish_reason"] == "error" and "unavailable" in logged["error"]
