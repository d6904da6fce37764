"""Issue 16's first must-show, end to end: a RAG app traced as users trace one, calling Flywheel's own gateway.

The app uses the unmodified OpenTelemetry SDK with its OTLP exporters (two turns of the conversation over
gRPC, one over HTTP, as two processes of one app might) and an `openai` client instrumented by OpenInference.
Each turn is a chain with a retrieval, a tool call and two LLM calls through the gateway, whose spans nest
under OpenInference's client spans because the client writes `traceparent` on each request. The gateway
(serving's create_app on a real Triton with the tiny model) and the feedback service (sink and OTLP doors)
run in one process as `flywheel up` runs them: one broker, one ClickHouse home. What ClickHouse holds is
checked against what the SDK ended: every span once, the trees and the session exactly, and feedback on the
session and on one span stored and joined by the trace and session views and `flywheel ops trace`.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from openinference.instrumentation import using_session
from openinference.instrumentation.openai import OpenAIInstrumentor
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from infra.processes import free_port
from contracts.http import Role
from services.feedback.app import create_app as feedback_app
from services.feedback.settings import FeedbackSettings
from services.monitor.cli import span_tree
from services.monitor.traces import MAX_TREE_SPANS, spans_query, trace_feedback_query
from services.runtime.privacy import PrivacySettings
from services.runtime.service import Runtime, build_process
from services.runtime.settings import FlywheelSettings
from services.serving.trace_context import SESSION_HEADER
from services.serving.triton import STREAM_MODEL_NAME
from tests.integration.test_serving_app import model_dir, serving_on  # noqa: F401 - fixture
from tests.support import api_key, eventually, served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

SESSION = "support-chat-42"
QUESTIONS = ("Is my X200 still under warranty?", "Where is order 1182?", "Can I return it instead?")
PASSAGES = ("The X200 has a two-year warranty.", "Orders ship within two days.", "Returns are free for 30 days.")
# The gateway's own spans of one call, under its server span: the Triton call, and the batcher's steps.
TRITON_CALL = f"triton {STREAM_MODEL_NAME}"
GATEWAY_CALL = ("chat tiny", [(TRITON_CALL, [("compute", []), ("queue", [])])])
# One turn as stored: the app's spans, with each of OpenInference's LLM spans holding the gateway's call.
TURN_SHAPE = (
    "answer",
    sorted(
        [("ChatCompletion", [GATEWAY_CALL]), ("ChatCompletion", [GATEWAY_CALL]), ("lookup_order", []), ("retrieve", [])]
    ),
)
APP_SPANS_PER_TURN, GATEWAY_SPANS_PER_TURN = 5, 8


def inject_trace_context(request: httpx2.Request) -> None:
    """The openai client's request hook: runs inside OpenInference's LLM span, so `traceparent` names that
    span and the gateway's spans become its children. (openai 3 sends through httpx2, which
    opentelemetry-instrumentation-httpx does not instrument; `extra_headers` built before the call would
    name the caller's span instead, making the gateway's call a sibling of its client span.)"""
    inject(request.headers)


@contextmanager
def traced_app(exporter: SpanExporter, gateway_url: str, key: str) -> Iterator[tuple[Tracer, openai.OpenAI, list]]:
    """One process of the app as users set it up: a tracer provider batching to an OTLP exporter, and an
    openai client pointed at the gateway, instrumented by OpenInference with that provider. Yields the
    tracer, the client, and the spans the SDK ended (what Flywheel must store), once the app shut down."""
    provider = TracerProvider(resource=Resource.create({"service.name": "rag-app"}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    ended = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(ended))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    client = openai.OpenAI(
        base_url=f"{gateway_url}/v1",
        api_key=key,
        max_retries=0,
        timeout=120,
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [inject_trace_context]}),
    )
    finished: list[ReadableSpan] = []
    try:
        yield provider.get_tracer("rag-app.pipeline"), client, finished
    finally:
        client.close()
        instrumentor.uninstrument()
        flushed = provider.force_flush(30_000)
        provider.shutdown()
        finished.extend(ended.get_finished_spans())
        assert flushed, "the exporter did not flush within 30 s"


def chat(client: openai.OpenAI, messages: list[dict[str, str]]) -> str:
    completion = client.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        extra_headers={SESSION_HEADER: SESSION},
    )
    return completion.choices[0].message.content or ""


def answer_turn(tracer: Tracer, client: openai.OpenAI, turn: int) -> None:
    """One turn of the RAG pipeline: retrieve a passage, let the model plan, call a tool, answer."""
    question = QUESTIONS[turn - 1]
    with (
        using_session(SESSION),
        tracer.start_as_current_span(
            "answer",
            attributes={"openinference.span.kind": "CHAIN", "session.id": SESSION, "input.value": question},
        ) as root,
    ):
        with tracer.start_as_current_span(
            "retrieve", attributes={"openinference.span.kind": "RETRIEVER", "input.value": question}
        ) as retrieval:
            passage = PASSAGES[turn - 1]
            retrieval.set_attribute("retrieval.documents.0.document.content", passage)
        plan = chat(client, [{"role": "system", "content": "Pick a tool."}, {"role": "user", "content": question}])
        with tracer.start_as_current_span(
            "lookup_order",
            attributes={"openinference.span.kind": "TOOL", "tool.name": "lookup_order", "input.value": plan},
        ) as tool:
            order = json.dumps({"order": 1180 + turn, "status": "shipped"})
            tool.set_attribute("output.value", order)
        answer = chat(
            client, [{"role": "system", "content": f"{passage} {order}"}, {"role": "user", "content": question}]
        )
        root.set_attribute("output.value", answer)


def run_app(exporter: SpanExporter, gateway_url: str, key: str, turns: range) -> list[ReadableSpan]:
    with traced_app(exporter, gateway_url, key) as (tracer, client, finished):
        for turn in turns:
            answer_turn(tracer, client, turn)
    return finished


def hex_id(value: int, digits: int) -> str:
    return format(value, f"0{digits}x")


def start(span: ReadableSpan) -> int:
    return span.start_time or 0


def sdk_tree(spans: list[ReadableSpan]) -> set[tuple[str, str, str | None, str]]:
    """(trace, span, parent, name) of each span, as the SDK knows them."""
    return {
        (
            hex_id(span.context.trace_id, 32),
            hex_id(span.context.span_id, 16),
            hex_id(span.parent.span_id, 16) if span.parent else None,
            span.name,
        )
        for span in spans
    }


def shape(rows: list[dict[str, Any]], span_id: str) -> tuple[str, list]:
    """The stored subtree under `span_id` as (name, sorted children), ids left out."""
    [span] = [row for row in rows if row["span_id"] == span_id]
    children = [shape(rows, row["span_id"]) for row in rows if row["parent_span_id"] == span_id]
    return span["name"], sorted(children)


@asynccontextmanager
async def flywheel_up(settings: FlywheelSettings, model_dir: Path) -> AsyncIterator[tuple[str, int, Runtime]]:  # noqa: F811
    """The gateway and the feedback service in one process on one broker, served on real ports; yields the
    HTTP URL, the OTLP/gRPC port, and the runtime (its ClickHouse is the sink's: chDB allows one process)."""
    feedback = FeedbackSettings(otlp_grpc_port=free_port(), batch_max_wait_ms=100)
    app, runtime = build_process(
        settings,
        [serving_on(model_dir), functools.partial(feedback_app, settings=feedback, privacy=PrivacySettings())],
        title="flywheel",
    )
    # Starting Triton on a busy 2-core machine takes longer than a door alone.
    async with served(app, start_timeout_s=180) as url:
        yield url, feedback.otlp_grpc_port, runtime


async def stored(runtime: Runtime, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return await asyncio.to_thread(runtime.clickhouse().query, sql, parameters)


@pytest.mark.usefixtures("own_embedded_clickhouse")
async def test_a_traced_rag_app_over_the_gateway_lands_whole_with_its_session_and_feedback(
    settings: FlywheelSettings,
    topics: str,
    model_dir: Path,  # noqa: F811
) -> None:
    key = api_key(settings, Role.app)
    async with flywheel_up(settings, model_dir) as (url, grpc_port, runtime):
        grpc_exporter = GrpcSpanExporter(
            endpoint=f"http://127.0.0.1:{grpc_port}", insecure=True, headers={"authorization": f"Bearer {key}"}
        )
        http_exporter = HttpSpanExporter(endpoint=f"{url}/v1/traces", headers={"Authorization": f"Bearer {key}"})
        # The app's calls block, as a plain app's do; off the event loop that serves the gateway and the doors.
        sent = await asyncio.to_thread(run_app, grpc_exporter, url, key, range(1, 3))
        sent += await asyncio.to_thread(run_app, http_exporter, url, key, range(3, 4))

        expected_spans = 3 * (APP_SPANS_PER_TURN + GATEWAY_SPANS_PER_TURN)
        assert len(sent) == 3 * APP_SPANS_PER_TURN, [span.name for span in sent]

        async def all_stored() -> bool:
            spans = (await stored(runtime, "SELECT count() AS n FROM span"))[0]["n"]
            inferences = (await stored(runtime, "SELECT count() AS n FROM inference_log"))[0]["n"]
            return spans >= expected_spans and inferences >= 6

        await eventually(all_stored, timeout_s=90, what=f"the sink storing {expected_spans} spans and 6 inferences")
        rows = await stored(
            runtime,
            "SELECT trace_id, span_id, parent_span_id, name, kind, service_name, session_id, inference_id, "
            "status, prompt_tokens, completion_tokens FROM span",
        )
        # Once each, read without FINAL: neither exporter nor the gateway's buffer left a second row.
        assert len(rows) == expected_spans
        assert len({(row["trace_id"], row["span_id"]) for row in rows}) == expected_spans

        # The app's spans are the SDK's exactly; the rest are the gateway's, in the app's traces.
        app_rows = [row for row in rows if row["service_name"] == "rag-app"]
        gateway_rows = [row for row in rows if row["service_name"] == "flywheel-gateway"]
        stored_tree = {(row["trace_id"], row["span_id"], row["parent_span_id"], row["name"]) for row in app_rows}
        assert stored_tree == sdk_tree(sent)
        assert len(gateway_rows) == 3 * GATEWAY_SPANS_PER_TURN
        traces = {span[0] for span in sdk_tree(sent)}
        assert len(traces) == 3 and {row["trace_id"] for row in gateway_rows} == traces
        assert [row["name"] for row in rows if row["status"] == "error"] == []

        # Each of OpenInference's LLM spans holds exactly one gateway call, the one that answered it, and
        # both recorded the same usage.
        llm_spans = [span for span in sent if span.name == "ChatCompletion"]
        assert len(llm_spans) == 6
        servers = {row["parent_span_id"]: row for row in gateway_rows if row["name"] == "chat tiny"}
        assert len(servers) == 6
        by_span_id = {row["span_id"]: row for row in app_rows}
        for span in llm_spans:
            client_span, server = (
                by_span_id[hex_id(span.context.span_id, 16)],
                servers[hex_id(span.context.span_id, 16)],
            )
            answered = json.loads(str(span.attributes["output.value"]))["id"]  # type: ignore[index]
            assert (server["trace_id"], server["inference_id"]) == (hex_id(span.context.trace_id, 32), answered)
            assert server["kind"] == "llm" and server["session_id"] == SESSION
            usage = (server["prompt_tokens"], server["completion_tokens"])
            assert (client_span["prompt_tokens"], client_span["completion_tokens"]) == usage and usage[0] > 0
        kinds = {row["name"]: row["kind"] for row in app_rows}
        assert kinds == {
            "answer": "chain",
            "retrieve": "retrieval",
            "lookup_order": "tool",
            "ChatCompletion": "llm",
        }
        # The session reached OpenInference's spans through using_session, the gateway's through its header.
        assert {row["session_id"] for row in rows if row["name"] in ("answer", "ChatCompletion", "chat tiny")} == {
            SESSION
        }

        # The trees, whole: the SDK's roots with everything stored under them, and nothing else.
        roots = [row for row in rows if row["parent_span_id"] is None]
        assert sorted(row["trace_id"] for row in roots) == sorted(traces)
        assert [shape(rows, root["span_id"]) for root in roots] == [TURN_SHAPE] * 3

        # The gateway's inferences name the server spans they were served under.
        inferences = await stored(runtime, "SELECT inference_id, trace_id, span_id, session_id FROM inference_log")
        assert sorted(tuple(row.values()) for row in inferences) == sorted(
            (server["inference_id"], server["trace_id"], server["span_id"], SESSION) for server in servers.values()
        )

        summaries = await stored(
            runtime,
            "SELECT trace_id, root_name, service_name, session_id, root_spans, span_count, llm_span_count, "
            "prompt_tokens, completion_tokens, error_spans FROM trace_summary ORDER BY started_at",
        )
        turns = [hex_id(span.context.trace_id, 32) for span in sorted(sent, key=start) if span.name == "answer"]
        assert [row.pop("trace_id") for row in summaries] == turns
        # Each call's usage counted once, though the client's span and the gateway's both report it.
        for summary, turn in zip(summaries, turns, strict=True):
            calls = [server for server in servers.values() if server["trace_id"] == turn]
            assert len(calls) == 2
            assert (summary.pop("prompt_tokens"), summary.pop("completion_tokens")) == (
                sum(call["prompt_tokens"] for call in calls),
                sum(call["completion_tokens"] for call in calls),
            )
        one_turn = {
            "root_name": "answer",
            "service_name": "rag-app",
            "session_id": SESSION,
            "root_spans": 1,
            "span_count": APP_SPANS_PER_TURN + GATEWAY_SPANS_PER_TURN,
            # Two model calls, each an LLM span of the client's (OpenInference's) with the gateway's under it.
            "llm_span_count": 2,
            "error_spans": 0,
        }
        assert summaries == [one_turn] * 3
        sessions = await stored(runtime, "SELECT session_id, traces, turns, services, span_count FROM session_summary")
        assert sessions == [
            {"session_id": SESSION, "traces": 3, "turns": 3, "services": ["rag-app"], "span_count": expected_spans}
        ]

        # Feedback through the feedback door with the app's key: on the session, and on turn 2's answer.
        rated_span = sorted((span for span in llm_spans if hex_id(span.context.trace_id, 32) == turns[1]), key=start)[1]
        rated = (turns[1], hex_id(rated_span.context.span_id, 16))
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            on_session = await http.post(
                "/feedback/v1/feedback",
                json={"session_id": SESSION, "thumbs": "down", "rating": 2, "comment": "never answered"},
            )
            on_span = await http.post(
                "/feedback/v1/feedback",
                json={"trace_id": rated[0], "span_id": rated[1], "thumbs": "down", "tags": ["off-topic"]},
            )
        assert (on_session.status_code, on_span.status_code) == (202, 202), (on_session.text, on_span.text)

        async def feedback_stored() -> bool:
            return (await stored(runtime, "SELECT count() AS n FROM feedback"))[0]["n"] >= 2

        await eventually(feedback_stored, timeout_s=60, what="the two feedbacks stored")
        given = await stored(
            runtime, "SELECT feedback_id, inference_id, trace_id, span_id, session_id, thumbs, rating FROM feedback"
        )
        assert sorted(given, key=lambda row: row["session_id"] or "") == [
            {
                "feedback_id": on_span.json()["feedback_id"],
                "inference_id": "",
                "trace_id": rated[0],
                "span_id": rated[1],
                "session_id": None,
                "thumbs": "down",
                "rating": None,
            },
            {
                "feedback_id": on_session.json()["feedback_id"],
                "inference_id": "",
                "trace_id": None,
                "span_id": None,
                "session_id": SESSION,
                "thumbs": "down",
                "rating": 2,
            },
        ]
        per_trace = await stored(runtime, "SELECT trace_id, feedback_count, thumbs_down FROM trace_summary")
        assert {row["trace_id"]: (row["feedback_count"], row["thumbs_down"]) for row in per_trace} == {
            trace: (1, 1) if trace == rated[0] else (0, 0) for trace in traces
        }
        [session] = await stored(
            runtime,
            "SELECT feedback_count, thumbs_down, session_feedback, session_thumbs_down, session_mean_rating "
            "FROM session_summary",
        )
        assert session == {
            "feedback_count": 2,
            "thumbs_down": 2,
            "session_feedback": 1,
            "session_thumbs_down": 1,
            "session_mean_rating": 2.0,
        }

        # `flywheel ops trace` of turn 2: the tree as stored, the feedback on the span it was given on.
        tree_rows = await stored(runtime, *spans_query(rated[0], limit=MAX_TREE_SPANS + 1))
        feedback = await stored(runtime, *trace_feedback_query(rated[0], tree_rows))
        lines = span_tree(rated[0], tree_rows, feedback)
        outline = [(len(line) - len(line.lstrip()), line.split()[0]) for line in lines[1:]]
        llm_call = [(2, "ChatCompletion"), (4, "chat"), (6, "triton"), (8, "queue"), (8, "compute")]
        assert outline == [(0, "answer"), (2, "retrieve"), *llm_call, (2, "lookup_order"), *llm_call]
        marked = [line for line in lines if "feedback" in line]
        assert len(marked) == 1 and f"span {rated[1]}" in marked[0] and marked[0].endswith("feedback 1 (1 down)")
