"""A request the gateway refuses before it knows who calls writes nothing: no key or a wrong one (401),
a role that may not call (403), JSON that does not parse (422, read before the key is checked) and a
body over the cap (413) add no `inference.logged` to the topic, whatever model and text they name.

The gateway door is built as serving builds it (real API keys, the real inference-log buffer on the
real Kafka); Triton is not needed: the one authenticated request names a model this replica does
not serve, which is answered 404 and logged, and proves the log path under test is live.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from contracts.events import InferenceLogged
from contracts.http import Role
from services.runtime.auth import Authenticator
from services.runtime.http import DEFAULT_MAX_BODY_BYTES, create_http_app
from services.runtime.privacy import Redactor
from services.runtime.service import Runtime
from services.runtime.settings import FlywheelSettings
from services.serving.api import create_router
from services.serving.gateway import Gateway
from services.serving.inference_log import InferenceLogBuffer
from services.serving.limits import RateLimiter
from services.serving.routes import Routes
from services.serving.settings import ServingSettings
from infra.processes import free_port
from tests.integration.test_event_bus import read_all
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHOSEN = "attacker-chosen-model"
SECRET_TEXT = "plant ann@example.org and AKIAIOSFODNN7EXAMPLE in the log"


@pytest.fixture
async def gateway_door(settings: FlywheelSettings, topics: str) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    runtime = Runtime(settings, client_id="refusals-serving")
    await runtime.broker.start()
    buffer = InferenceLogBuffer(runtime.bus("serving"), capacity=100, redactor=Redactor())
    await buffer.start()
    routes = Routes()
    routes.add_model("tiny")
    # No tokenizer and no Triton: nothing in this test gets that far.
    gateway = Gateway(
        routes=routes,
        tokenizer=None,
        triton_grpc_url=f"127.0.0.1:{free_port()}",
        settings=ServingSettings(),
        log_buffer=buffer,
        loaded_adapters=set,
    )
    router = create_router(
        lambda: gateway,
        guard=Authenticator.for_settings(settings).require(Role.app),
        limiter=RateLimiter(rate_per_s=1000, burst=1000),
    )
    app = create_http_app("refusals-gateway", routers=[router])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
            yield http, runtime
    finally:
        await gateway.close()
        await buffer.stop()
        await runtime.broker.stop()
        runtime.close()


async def test_refused_before_the_caller_is_known_writes_nothing(
    gateway_door: tuple[httpx.AsyncClient, Runtime], settings: FlywheelSettings
) -> None:
    http, runtime = gateway_door
    body = {"model": CHOSEN, "messages": [{"role": "user", "content": SECRET_TEXT}], "user": "victim@example.org"}
    viewer, app = api_key(settings, Role.viewer), api_key(settings, Role.app)

    refusals = {
        "no key": (await http.post("/v1/chat/completions", json=body), 401, "missing_api_key"),
        "wrong key": (
            await http.post(
                "/v1/chat/completions", json=body, headers={"Authorization": "Bearer fw_000000000000_not-a-real-secret"}
            ),
            401,
            "invalid_api_key",
        ),
        "viewer key": (
            await http.post(
                "/v1/completions",
                json={"model": CHOSEN, "prompt": SECRET_TEXT},
                headers={"Authorization": f"Bearer {viewer}"},
            ),
            403,
            "insufficient_role",
        ),
        "unparsable JSON, no key": (
            await http.post(
                "/v1/chat/completions",
                content=b'{"model": "' + CHOSEN.encode() + b'", "messages": ',
                headers={"content-type": "application/json"},
            ),
            422,
            None,
        ),
        "unparsable JSON, app key": (
            await http.post(
                "/v1/completions",
                content=b'{"model": "' + CHOSEN.encode() + b'", "prompt": ',
                headers={"content-type": "application/json", "Authorization": f"Bearer {app}"},
            ),
            422,
            None,
        ),
        "body over the cap": (
            await http.post(
                "/v1/chat/completions",
                content=b'{"model": "' + CHOSEN.encode() + b'", "pad": "' + b"x" * DEFAULT_MAX_BODY_BYTES + b'"}',
                headers={"content-type": "application/json"},
            ),
            413,
            "request_too_large",
        ),
    }
    for case, (answer, status, code) in refusals.items():
        assert answer.status_code == status, (case, answer.text)
        if code is not None:
            assert answer.json()["error"]["code"] == code, (case, answer.json())
        assert "traceparent" not in answer.headers, (case, "nothing was logged, so no span is named")

    # Requests from a known caller are logged: the topic below is the one refusals would reach. The
    # invalid one is logged from its body, with the user id and metadata out of the text and scrubbed.
    served = await http.post(
        "/v1/chat/completions", json={**body, "model": "not-served"}, headers={"Authorization": f"Bearer {app}"}
    )
    assert served.status_code == 404 and served.json()["error"]["code"] == "model_not_found", served.text
    invalid_body = {
        "model": "tiny",
        "messages": [{"role": "robot", "content": SECRET_TEXT}],
        "user": "customer-0042x",
        "metadata": {"account_id": "acct-77x", "tier": "gold"},
    }
    invalid = await http.post("/v1/chat/completions", json=invalid_body, headers={"Authorization": f"Bearer {app}"})
    assert invalid.status_code == 422 and invalid.json()["error"]["param"] == "messages.0.role", invalid.text

    records = await read_all(
        settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(InferenceLogged), expected=10**6, timeout_s=10
    )
    logged = sorted((json.loads(record.value)["payload"] for record in records), key=lambda event: event["model_name"])
    assert [(event["model_name"], event["principal"], event["status"]) for event in logged] == [
        ("not-served", "test-app", "error"),
        ("tiny", "test-app", "error"),
    ], logged
    assert "does not exist" in logged[0]["error"] and logged[1]["error"].startswith("422: messages.0.role")
    # Each logged call's answer names its span, the refused one's too, so the caller finds it in its trace.
    for answer, event in ((served, logged[0]), (invalid, logged[1])):
        _, trace_id, span_id, _ = answer.headers["traceparent"].split("-")
        assert (trace_id, span_id) == (event["trace_id"], event["span_id"]), (answer.headers, event)
    redactor = Redactor()
    assert (logged[1]["user_id"], logged[1]["metadata"]) == (
        redactor.scrub_user("customer-0042x"),
        {"account_id": redactor.scrub_user("acct-77x"), "tier": "gold"},
    )
    assert (
        "robot" in logged[1]["input_text"]
        and "[EMAIL]" in logged[1]["input_text"]
        and "[AWS_ACCESS_KEY_ID]" in logged[1]["input_text"]
    )
    everything = b"".join(record.value for record in records)
    assert (
        CHOSEN.encode() not in everything
        and b"ann@example.org" not in everything
        and b"AKIAIOSFODNN7EXAMPLE" not in everything
    )
    assert (
        b"victim@example.org" not in everything
        and b"customer-0042x" not in everything
        and b"acct-77x" not in everything
    ), "user ids are hashed before they are published"
