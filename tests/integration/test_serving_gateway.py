"""The OpenAI-compatible gateway over a real Triton, logging every inference to the real Kafka.

Callers authenticate with real API keys (the registry's key table in a SQLite file); the openai
client talks to a real uvicorn server.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from infra.processes import free_port
from contracts.events import InferenceLogged, PromptPublished, Stage
from services.runtime.auth import ApiKey, Authenticator, KeyStore, Role, create_database_engine
from services.runtime.http import create_http_app
from services.runtime.service import Runtime
from services.runtime.settings import FlywheelSettings
from services.serving.api import create_router
from services.runtime.inference import Engine
from services.runtime.privacy import Redactor
from services.serving.gateway import Gateway
from services.serving.inference_log import InferenceLogBuffer
from services.serving.limits import RateLimiter
from services.serving.prompt_routes import PromptRoutes
from services.serving.routes import Routes
from services.serving.settings import ServingSettings
from services.serving.triton import TritonServing
from tests.integration.test_event_bus import read_all
from tests.support import served

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(tiny_engine_shared: Engine) -> Engine:
    return tiny_engine_shared


@pytest.fixture
def triton(tiny_triton: TritonServing) -> TritonServing:
    return tiny_triton


def routes(canary_percent: float | None = None) -> Routes:
    table = Routes()
    table.add_model("tiny")
    for version in (1, 2, 3):
        table.add_version("tiny", version, f"file:///adapters/v{version}", "0" * 64)
    table.set_stage("tiny", 1, Stage.production)
    table.set_stage("tiny", 2, Stage.production if canary_percent else Stage.staging, canary_percent)
    return table


def prompts() -> PromptRoutes:
    table = PromptRoutes()
    table.publish(
        PromptPublished(
            prompt_name="support",
            version=1,
            template="You answer questions about {{ product }}.",
            variables=["product"],
            labels=["production"],
        )
    )
    return table


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """API keys in a registry key table of its own: an app's, a viewer's."""
    engine = create_database_engine(f"sqlite:///{tmp_path_factory.mktemp('registry') / 'registry.db'}")
    ApiKey.metadata.create_all(engine, tables=[ApiKey.__table__])  # type: ignore[attr-defined]
    store = KeyStore(engine)
    return {
        "store": store,
        **{
            role.value: store.create(principal=f"{role.value}-1", role=role, created_by="test")[0]
            for role in (Role.app, Role.viewer)
        },
    }  # type: ignore[dict-item]


@pytest.fixture
async def runtime(settings: FlywheelSettings, topics: str) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings, client_id="serving-test")
    await runtime.broker.start()
    try:
        yield runtime
    finally:
        await runtime.broker.stop()
        runtime.close()


async def gateway_app(
    engine: Engine,
    grpc_url: str,
    runtime: Runtime,
    keys: dict,
    *,
    table: Routes | None = None,
    limiter: RateLimiter | None = None,
    serving: ServingSettings | None = None,
):
    buffer = InferenceLogBuffer(runtime.bus("serving"), capacity=100)
    await buffer.start()
    gateway = Gateway(
        routes=table or routes(),
        tokenizer=engine.tokenizer,
        triton_grpc_url=grpc_url,
        settings=serving or ServingSettings(max_prompt_tokens=200, max_tokens_limit=16, default_max_tokens=4),
        log_buffer=buffer,
        loaded_adapters=lambda: set(engine.adapters),
        prompts=prompts(),
    )
    guard = Authenticator(keys["store"]).require(Role.app)
    router = create_router(lambda: gateway, guard=guard, limiter=limiter or RateLimiter(rate_per_s=1000, burst=1000))
    return create_http_app("serving-test", routers=[router]), gateway, buffer


async def gateway_client(
    engine: Engine, grpc_url: str, runtime: Runtime, keys: dict, **options
) -> tuple[httpx.AsyncClient, Gateway, InferenceLogBuffer]:
    app, gateway, buffer = await gateway_app(engine, grpc_url, runtime, keys, **options)
    headers = {"Authorization": f"Bearer {keys['app']}"}
    return (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=headers),
        gateway,
        buffer,
    )


@pytest.fixture
async def client(
    engine: Engine, triton: TritonServing, runtime: Runtime, keys: dict
) -> AsyncIterator[tuple[httpx.AsyncClient, InferenceLogBuffer]]:
    assert triton.ports is not None
    http, gateway, buffer = await gateway_client(engine, triton.ports.grpc_url, runtime, keys)
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

    # `no-cache`: the stream is generated, not the response cache's replay of the answer above.
    async with http.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}, headers={"Cache-Control": "no-cache"}
    ) as streamed:
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in streamed.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert (
        "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
        == done["choices"][0]["message"]["content"]
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[0]["id"] != done["id"]

    await buffer.stop()
    records = await read_all(
        settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(InferenceLogged), expected=2
    )
    payloads = [json.loads(record.value)["payload"] for record in records]
    assert {payload["inference_id"] for payload in payloads} == {done["id"], chunks[0]["id"]}
    logged = next(payload for payload in payloads if payload["inference_id"] == done["id"])
    assert (
        logged["adapter_version"] == 1
        and logged["route"] == "production"
        and logged["status"] == "ok"
        and logged["principal"] == "app-1"
    )
    assert logged["completion_tokens"] == 5 and logged["output_text"] == done["choices"][0]["message"]["content"]
    assert logged["latency_total_ms"] >= logged["latency_compute_ms"] > 0


async def test_completions_and_model_selection(client) -> None:
    http, _ = client
    models = (await http.get("/v1/models")).json()
    assert {"tiny", "tiny@production", "tiny@staging", "tiny:v2"} <= {card["id"] for card in models["data"]}
    texts = {}
    for reference, resolved in (("tiny", "tiny:v1"), ("tiny@staging", "tiny:v2"), ("tiny:v2", "tiny:v2")):
        response = await http.post(
            "/v1/completions", json={"model": reference, "prompt": "Once upon", "max_tokens": 4, "temperature": 0}
        )
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


BAD_INPUTS = [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404),
    ("/v1/completions", {"model": "tiny:v9", "prompt": "x"}, 404),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}], "stream": True}, 404),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 300}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 17}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": -1}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 5}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 422),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 422),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
]


async def test_every_bad_input_is_an_openai_error_and_an_errored_inference(
    client, runtime: Runtime, settings: FlywheelSettings
) -> None:
    http, buffer = client
    for path, body, status in BAD_INPUTS:
        response = await http.post(path, json=body)
        assert response.status_code == status, (body, response.text)
        assert response.headers["content-type"].startswith("application/json"), "an error must not start a stream"
        error = response.json()["error"]
        assert error["message"] and error["type"] and "Traceback" not in error["message"]
    malformed = await http.post(
        "/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 422 and malformed.json()["error"]["message"]
    await buffer.stop()
    # A body that is not JSON is refused before the key is read (the caller is not known): nothing is logged for it.
    events = await logged_events(runtime, settings, expected=len(BAD_INPUTS) + 1, timeout_s=5)
    assert len(events) == len(BAD_INPUTS)
    assert all(event["status"] == "error" and event["finish_reason"] == "error" and event["error"] for event in events)
    assert sorted(event["model_name"] for event in events) == sorted(body["model"] for _, body, _ in BAD_INPUTS)


async def logged_events(
    runtime: Runtime, settings: FlywheelSettings, expected: int, timeout_s: float = 30.0
) -> list[dict]:
    records = await read_all(
        settings.resolved_kafka_bootstrap(),
        runtime.bus("serving").topic(InferenceLogged),
        expected=expected,
        timeout_s=timeout_s,
    )
    return [json.loads(record.value)["payload"] for record in records]


async def test_triton_down_is_503_logged_and_recovers_when_triton_is_back(
    engine: Engine, runtime: Runtime, settings: FlywheelSettings, keys: dict, tmp_path: Path
) -> None:
    from services.serving.triton import TritonPorts

    ports = TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())
    http, gateway, buffer = await gateway_client(engine, ports.grpc_url, runtime, keys)
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    try:
        down = await http.post("/v1/completions", json=body)
        with TritonServing(engine, workdir=tmp_path / "triton", ports=ports):
            back = await http.post("/v1/completions", json=body)
    finally:
        await http.aclose()
        await gateway.close()
        await buffer.stop()
    assert down.status_code == 503 and down.json()["error"]["code"] == "triton_unavailable"
    assert back.status_code == 200, back.text
    logged = next(event for event in await logged_events(runtime, settings, expected=2) if event["status"] == "error")
    assert logged["finish_reason"] == "error" and "unavailable" in logged["error"]


async def test_canary_takes_its_share_sticky_per_user_and_is_logged(
    engine: Engine, triton: TritonServing, runtime: Runtime, settings: FlywheelSettings, keys: dict
) -> None:
    assert triton.ports is not None
    http, gateway, buffer = await gateway_client(
        engine, triton.ports.grpc_url, runtime, keys, table=routes(canary_percent=30)
    )
    served: dict[str, set[str]] = {}
    try:
        for _round in range(2):
            for user in range(20):
                response = await http.post(
                    "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1, "user": f"user-{user}"}
                )
                assert response.status_code == 200, response.text
                served.setdefault(f"user-{user}", set()).add(response.json()["model"])
    finally:
        await http.aclose()
        await gateway.close()
        await buffer.stop()
    assert all(len(models) == 1 for models in served.values()), "a user saw both versions"
    canary_users = {user for user, models in served.items() if models == {"tiny:v2"}}
    assert 0 < len(canary_users) < 20
    events = await logged_events(runtime, settings, expected=40)
    # User ids leave the gateway hashed (the default user policy): the same user, the same token.
    assert {event["user_id"] for event in events if event["route"] == "canary"} == {
        Redactor().scrub_user(user) for user in canary_users
    }
    assert {event["adapter_version"] for event in events if event["route"] == "production"} == {1}


async def test_prompt_ref_renders_server_side(client, runtime: Runtime, settings: FlywheelSettings) -> None:
    http, buffer = client
    reference = {"name": "support", "variables": {"product": "kettles"}}
    response = await http.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "prompt_ref": reference,
        },
    )
    assert response.status_code == 200, response.text
    missing = await http.post(
        "/v1/completions", json={"model": "tiny", "prompt": "", "prompt_ref": {"name": "support"}}
    )
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "missing_variable" and "product" in missing.json()["error"]["message"]
    unknown = await http.post("/v1/completions", json={"model": "tiny", "prompt": "", "prompt_ref": {"name": "nope"}})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "prompt_ref"
    await buffer.stop()
    events = {event["inference_id"]: event for event in await logged_events(runtime, settings, expected=3)}
    served = events[response.json()["id"]]
    assert (served["prompt_name"], served["prompt_version"]) == ("support", 1)
    assert "You answer questions about kettles." in served["input_text"]


async def test_refusals_are_openai_errors_and_only_a_known_callers_are_logged(
    engine: Engine, triton: TritonServing, runtime: Runtime, settings: FlywheelSettings, keys: dict
) -> None:
    assert triton.ports is not None
    http, gateway, buffer = await gateway_client(engine, triton.ports.grpc_url, runtime, keys)
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1}
    try:
        no_key = await http.post("/v1/completions", json=body, headers={"Authorization": ""})
        viewer = await http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {keys['viewer']}"})
        malformed = await http.post(
            "/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"Content-Type": "application/json"}
        )
        invalid = await http.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
        )
    finally:
        await http.aclose()
        await gateway.close()
        await buffer.stop()
    assert (no_key.status_code, no_key.json()["error"]["code"]) == (401, "missing_api_key")
    assert (viewer.status_code, viewer.json()["error"]["type"]) == (403, "permission_error")
    assert (
        malformed.status_code == 422
        and invalid.status_code == 422
        and invalid.json()["error"]["param"] == "messages.0.role"
    )
    # No key (401), a viewer's key (403) and JSON that does not parse (422 before the key is checked)
    # write nothing; only the authenticated app's invalid request is logged, as its errored inference.
    records = await read_all(
        settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(InferenceLogged), expected=10**6, timeout_s=5
    )
    events = [json.loads(record.value)["payload"] for record in records]
    assert [event["error"].split(":")[0] for event in events] == ["422"]
    assert (events[0]["status"], events[0]["finish_reason"], events[0]["principal"], events[0]["endpoint"]) == (
        "error",
        "error",
        "app-1",
        "chat.completions",
    )


async def test_rate_limit_is_429_with_retry_after(
    engine: Engine, triton: TritonServing, runtime: Runtime, settings: FlywheelSettings, keys: dict
) -> None:
    assert triton.ports is not None
    http, gateway, buffer = await gateway_client(
        engine, triton.ports.grpc_url, runtime, keys, limiter=RateLimiter(rate_per_s=0.25, burst=2)
    )
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1}
    try:
        answers = [await http.post("/v1/completions", json=body) for _ in range(3)]
    finally:
        await http.aclose()
        await gateway.close()
        await buffer.stop()
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    error = answers[2].json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded") and "app-1" in error["message"]
    assert 1 <= int(answers[2].headers["Retry-After"]) <= 4
    events = await logged_events(runtime, settings, expected=3)
    assert [event["status"] for event in events].count("error") == 1


@contextlib.asynccontextmanager
async def uvicorn_server(app) -> AsyncIterator[str]:
    """The gateway's app served; yields the base URL an OpenAI client takes."""
    async with served(app, lifespan="off") as url:
        yield f"{url}/v1"


async def test_the_openai_client_works_unchanged(
    engine: Engine, triton: TritonServing, runtime: Runtime, settings: FlywheelSettings, keys: dict
) -> None:
    assert triton.ports is not None
    app, gateway, buffer = await gateway_app(engine, triton.ports.grpc_url, runtime, keys)
    try:
        async with uvicorn_server(app) as base_url:
            client = openai.AsyncOpenAI(base_url=base_url, api_key=keys["app"], max_retries=0)
            messages = [{"role": "user", "content": "Hi"}]
            done = await client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=4, temperature=0, user="u1"
            )
            stream = await client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=4,
                temperature=0,
                stream=True,
                extra_headers={"Cache-Control": "no-cache"},
            )
            chunks = [chunk async for chunk in stream]
            text = await client.completions.create(
                model="tiny@staging", prompt="Once upon", max_tokens=3, temperature=0
            )
            models = await client.models.list()
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="nope", messages=messages)
            await client.close()
            async with openai.AsyncOpenAI(base_url=base_url, api_key="fw_wrong_key", max_retries=0) as wrong:
                with pytest.raises(openai.AuthenticationError):
                    await wrong.models.list()
    finally:
        await gateway.close()
        await buffer.stop()
    assert done.model == "tiny:v1" and done.usage.completion_tokens == 4 and done.choices[0].message.content
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == done.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert text.model == "tiny:v2" and text.choices[0].text
    assert "tiny@staging" in {model.id for model in models.data}
    ids = {event["inference_id"] for event in await logged_events(runtime, settings, expected=4)}
    assert {done.id, chunks[0].id, text.id} <= ids
