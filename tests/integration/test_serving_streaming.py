"""Token-by-token streaming through the whole path: the real SmolLM2 on a real Triton, the gateway on
uvicorn, the unchanged `openai` client, and inference.logged on the real Kafka."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from contracts.events import InferenceLogged
from services.runtime.auth import ApiKey, Authenticator, KeyStore, Role, create_database_engine
from services.runtime.http import create_http_app
from services.runtime.inference import Engine
from services.runtime.service import Runtime
from services.runtime.settings import FlywheelSettings
from services.serving.api import create_router
from services.serving.gateway import DISCONNECTED, Gateway
from services.serving.inference_log import InferenceLogBuffer
from services.serving.limits import RateLimiter
from services.serving.routes import Routes
from services.serving.settings import ServingSettings
from services.serving.triton import TritonServing
from tests.fixtures.trainer_model import base_model_dir  # noqa: F401 - fixture
from tests.integration.test_event_bus import read_all
from tests.integration.test_serving_gateway import uvicorn_server
from tests.support import eventually

pytestmark = pytest.mark.integration

MODEL = "smollm2"


@pytest.fixture(scope="module")
def engine(base_model_dir: Path) -> Engine:  # noqa: F811 - the fixture imported above
    return Engine.from_pretrained(base_model_dir, model_name=MODEL)


@pytest.fixture(scope="module")
def triton(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServing]:
    serving = TritonServing(engine, workdir=tmp_path_factory.mktemp("triton"), max_batch_size=8)
    try:
        serving.start()
        yield serving
    finally:
        serving.stop()


@pytest.fixture
async def served(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> AsyncIterator[tuple[str, str, Runtime]]:
    """The gateway on uvicorn: its base URL, an app key, and the runtime whose bus it logs to."""
    assert triton.ports is not None
    runtime = Runtime(settings, client_id="serving-stream-test")
    await runtime.broker.start()
    database = create_database_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    ApiKey.metadata.create_all(database, tables=[ApiKey.__table__])  # type: ignore[attr-defined]
    keys = KeyStore(database)
    key = keys.create(principal="app-1", role=Role.app, created_by="test")[0]
    table = Routes()
    table.add_model(MODEL)
    buffer = InferenceLogBuffer(runtime.bus("serving"), capacity=100)
    await buffer.start()
    gateway = Gateway(
        routes=table,
        tokenizer=engine.tokenizer,
        triton_grpc_url=triton.ports.grpc_url,
        settings=ServingSettings(max_tokens_limit=256),
        log_buffer=buffer,
        loaded_adapters=lambda: set(engine.adapters),
    )
    router = create_router(
        lambda: gateway, guard=Authenticator(keys).require(Role.app), limiter=RateLimiter(rate_per_s=1000, burst=1000)
    )
    try:
        async with uvicorn_server(create_http_app("serving-stream-test", routers=[router])) as base_url:
            yield base_url, key, runtime
    finally:
        await gateway.close()
        await buffer.stop()
        await runtime.broker.stop()
        runtime.close()


async def logged(runtime: Runtime, settings: FlywheelSettings, expected: int) -> dict[str, dict]:
    records = await read_all(
        settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(InferenceLogged), expected=expected
    )
    return {payload["inference_id"]: payload for payload in (json.loads(record.value)["payload"] for record in records)}


async def test_the_openai_client_receives_tokens_as_they_are_decoded(
    served, triton: TritonServing, settings: FlywheelSettings
) -> None:
    base_url, key, runtime = served
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        whole = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True
        )
        chunks, steps_at_chunk = [], []
        async for chunk in stream:
            chunks.append(chunk)
            steps_at_chunk.append(triton.batcher.steps)
        steps_at_end = triton.batcher.steps

    expected = whole.choices[0].message.content
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]
    assert len(pieces) > 1, f"the answer came in {len(pieces)} piece(s)"
    assert "".join(pieces) == expected and whole.usage.completion_tokens > 1
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    first = next(index for index, chunk in enumerate(chunks) if chunk.choices[0].delta.content)
    # Decode steps ran after the first piece reached the client: it was sent while the answer was still being generated.
    assert steps_at_chunk[first] < steps_at_end, (steps_at_chunk, steps_at_end)
    assert len({chunk.id for chunk in chunks}) == 1

    events = await logged(runtime, settings, expected=2)
    event = events[chunks[0].id]
    assert (event["status"], event["output_text"], event["completion_tokens"]) == (
        "ok",
        expected,
        whole.usage.completion_tokens,
    )
    assert event["finish_reason"] == whole.choices[0].finish_reason and event["latency_total_ms"] > 0


async def test_a_client_leaving_mid_stream_frees_its_slot_and_is_logged(
    served, triton: TritonServing, settings: FlywheelSettings
) -> None:
    base_url, key, runtime = served
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 500, separated by commas."}],
        "max_tokens": 256,
        "temperature": 0,
        "stream": True,
    }
    cancelled_before, steps_before = triton.batcher.cancelled, triton.batcher.steps
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        async with http.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            first = json.loads(
                (await anext(line async for line in lines if line.startswith("data: "))).removeprefix("data: ")
            )
        # Leaving the block closed the connection with the answer far from done.

    await eventually(
        lambda: triton.batcher.cancelled == cancelled_before + 1,
        timeout_s=60,
        what="the abandoned request to be cancelled",
    )
    await eventually(lambda: triton.batcher.decoding == 0, timeout_s=30, what="the batch to empty")
    assert triton.batcher.steps - steps_before < 256, "the abandoned request decoded to max_tokens"
    event = (await logged(runtime, settings, expected=1))[first["id"]]
    assert (event["status"], event["error"]) == ("error", DISCONNECTED)
    assert event["output_text"].startswith(first["choices"][0]["delta"]["content"])
