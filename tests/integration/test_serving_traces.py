"""The gateway takes part in its callers' traces: W3C trace context in, span.logged out, on the real gateway,
a real Triton, the real Kafka and the real sink in embedded ClickHouse.

A caller's `traceparent` makes the gateway's server span a child of the caller's span, with the Triton
call under it and the batcher's queue wait and compute under that; a call without one, or with a
malformed one, is served all the same and opens a trace of its own. inference.logged names the same
trace, span and session, so inferences and spans join in ClickHouse.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from datetime import datetime

import httpx
import pytest

from contracts.events import InferenceLogged, SpanLogged
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.inference import Engine
from services.runtime.service import Runtime
from services.runtime.settings import FlywheelSettings
from services.serving.gateway import Gateway
from services.serving.inference_log import InferenceLogBuffer
from services.serving.triton import STREAM_MODEL_NAME, TritonServing
from tests.integration.test_event_bus import read_all
from tests.integration.test_serving_gateway import gateway_client, keys, runtime  # noqa: F401 - fixtures
from tests.integration.test_sink_clickhouse import clickhouse, running_sink  # noqa: F401 - fixture
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
TRACESTATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture
async def client(
    tiny_engine_shared: Engine,
    tiny_triton: TritonServing,
    runtime: Runtime,
    keys: dict,  # noqa: F811
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway, InferenceLogBuffer]]:
    assert tiny_triton.ports is not None
    http, gateway, buffer = await gateway_client(tiny_engine_shared, tiny_triton.ports.grpc_url, runtime, keys)
    try:
        yield http, gateway, buffer
    finally:
        await http.aclose()
        await gateway.close()
        await buffer.stop()


def parts(traceparent: str) -> tuple[str, str, str, str]:
    version, trace_id, span_id, flags = traceparent.split("-")
    return version, trace_id, span_id, flags


def tree(spans: list[SpanLogged], server_span: str) -> tuple[SpanLogged, SpanLogged, SpanLogged, SpanLogged]:
    """The server span, its Triton call, and the queue and compute spans under that; checks the nesting."""
    server = next(span for span in spans if span.span_id == server_span)
    [triton] = [span for span in spans if span.parent_span_id == server_span]
    steps = {span.name: span for span in spans if span.parent_span_id == triton.span_id}
    assert set(steps) == {"queue", "compute"} and len(spans) == 4, [span.name for span in spans]
    return server, triton, steps["queue"], steps["compute"]


def in_order(*instants: datetime) -> bool:
    return all(earlier <= later for earlier, later in itertools.pairwise(instants))


@pytest.mark.usefixtures("own_embedded_clickhouse")
async def test_gateway_calls_nest_in_the_callers_trace_and_join_their_inferences(
    client,
    runtime: Runtime,  # noqa: F811
    settings: FlywheelSettings,
    clickhouse: ClickHouseStore,  # noqa: F811
) -> None:
    http, _, buffer = client
    in_trace = await http.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE, "x-flywheel-session-id": "conv-7"},
    )
    assert in_trace.status_code == 200, in_trace.text
    version, trace_id, server_span, flags = parts(in_trace.headers["traceparent"])
    assert (version, trace_id, flags) == ("00", CALLER_TRACE, "01") and server_span != CALLER_SPAN
    assert in_trace.headers["tracestate"] == TRACESTATE

    # A fresh generation (not the response cache's replay of the call above), so Triton's spans are there.
    async with http.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"Cache-Control": "no-cache"}
    ) as streamed:
        assert streamed.status_code == 200
        fresh_parent = streamed.headers["traceparent"]
        lines = [line async for line in streamed.aiter_lines() if line.startswith("data: {")]
    stream_id = json.loads(lines[0].removeprefix("data: "))["id"]
    assert parts(fresh_parent)[1] != CALLER_TRACE and "tracestate" not in streamed.headers

    malformed = await http.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "Once upon", "max_tokens": 3},
        headers={"traceparent": f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01"},
    )
    assert malformed.status_code == 200, "a malformed traceparent must never fail the request"
    assert parts(malformed.headers["traceparent"])[1] not in (CALLER_TRACE, CALLER_TRACE.upper())

    # An error still names the gateway's span, so the caller's trace can show where it failed.
    missing = await http.post(
        "/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"traceparent": TRACEPARENT}
    )
    assert missing.status_code == 404 and parts(missing.headers["traceparent"])[1] == CALLER_TRACE

    # A session id that is not one is refused, precisely, and logged as a refusal in the caller's trace.
    bad_session = await http.post(
        "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT, "x-flywheel-session-id": "no spaces"}
    )
    assert bad_session.status_code == 422
    assert bad_session.json()["error"]["message"].startswith(
        "header.x-flywheel-session-id: String should match pattern"
    )

    await buffer.stop()
    bootstrap = settings.resolved_kafka_bootstrap()
    inference_records = await read_all(bootstrap, runtime.bus("serving").topic(InferenceLogged), expected=5)
    span_records = await read_all(bootstrap, runtime.bus("serving").topic(SpanLogged), expected=14)
    inferences = [InferenceLogged.model_validate(json.loads(r.value)["payload"]) for r in inference_records]
    spans = [SpanLogged.model_validate(json.loads(r.value)["payload"]) for r in span_records]
    assert len(inferences) == 5 and len(spans) == 14, ([i.model_name for i in inferences], [s.name for s in spans])
    assert all(record.key.decode() == json.loads(record.value)["payload"]["trace_id"] for record in span_records)

    # The call in the caller's trace: server span under the caller's span, Triton under it, queue and compute under that.
    chat = next(i for i in inferences if i.span_id == server_span)
    assert (chat.trace_id, chat.session_id, chat.inference_id) == (CALLER_TRACE, "conv-7", in_trace.json()["id"])
    server, triton, queue, compute = tree([s for s in spans if s.inference_id == chat.inference_id], server_span)
    assert server.trace_id == triton.trace_id == queue.trace_id == compute.trace_id == CALLER_TRACE
    assert server.parent_span_id == CALLER_SPAN
    assert (server.name, server.kind.value, server.service_name) == ("chat tiny", "llm", "flywheel-gateway")
    assert (server.model_name, server.adapter_version, server.status.value) == ("tiny", 1, "ok")
    assert (server.prompt_tokens, server.completion_tokens) == (chat.prompt_tokens, chat.completion_tokens) != (0, 0)
    assert server.session_id == "conv-7" and server.attributes["w3c.tracestate"] == TRACESTATE
    assert server.output_text == chat.output_text and server.input_text == chat.input_text
    assert triton.name == f"triton {STREAM_MODEL_NAME}"
    assert in_order(server.started_at, triton.started_at, queue.started_at, queue.ended_at)
    assert in_order(queue.ended_at, compute.started_at, compute.ended_at, triton.ended_at, server.ended_at)
    assert compute.ended_at > compute.started_at

    # The streamed call without traceparent opened a trace of its own, with the whole tree.
    streamed_call = next(i for i in inferences if i.inference_id == stream_id)
    _, fresh_trace, fresh_span, _ = parts(fresh_parent)
    assert (streamed_call.trace_id, streamed_call.span_id) == (fresh_trace, fresh_span)
    root, *_ = tree([s for s in spans if s.trace_id == fresh_trace], fresh_span)
    assert root.parent_span_id is None and root.session_id is None

    # The malformed traceparent: a new trace, the whole tree, no trace of the caller's ids.
    _, new_trace, new_span, _ = parts(malformed.headers["traceparent"])
    root, *_ = tree([s for s in spans if s.trace_id == new_trace], new_span)
    assert root.parent_span_id is None and root.name == "text_completion tiny"

    # The refusals: one errored server span each in the caller's trace, and their inferences name it.
    errors = [s for s in spans if s.status.value == "error"]
    assert len(errors) == 2 and all(s.parent_span_id == CALLER_SPAN and s.trace_id == CALLER_TRACE for s in errors)
    assert {s.span_id for s in errors} == {i.span_id for i in inferences if i.status.value == "error"}
    assert next(s for s in errors if s.span_id == parts(missing.headers["traceparent"])[2]).model_name == "nope"

    # The sink stores them all and the views join them: the caller's trace has the gateway's three calls.
    async with running_sink(settings, clickhouse):

        def stored() -> bool:
            rows = clickhouse.query("SELECT count() AS n FROM span FINAL")
            logged = clickhouse.query("SELECT count() AS n FROM inference_log FINAL")
            return int(rows[0]["n"]) == 14 and int(logged[0]["n"]) == 5

        await eventually(stored, timeout_s=60, what="the gateway's spans and inferences stored")
    [summary] = clickhouse.query(
        f"SELECT span_count, llm_span_count, root_spans, prompt_tokens, error_spans, session_id FROM trace_summary WHERE trace_id = '{CALLER_TRACE}'"
    )
    assert (summary["span_count"], summary["llm_span_count"], summary["root_spans"]) == (6, 3, 0)
    assert (summary["prompt_tokens"], summary["error_spans"], summary["session_id"]) == (
        chat.prompt_tokens,
        2,
        "conv-7",
    )
    joined = clickhouse.query(
        "SELECT count() AS n FROM inference_log AS i FINAL INNER JOIN (SELECT * FROM span FINAL) AS s "
        "ON i.trace_id = s.trace_id AND i.span_id = s.span_id"
    )
    assert int(joined[0]["n"]) == 5
