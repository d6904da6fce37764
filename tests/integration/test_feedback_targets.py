"""Feedback on a span, a trace and a session through the feedback door, on the real broker, stored by the
real sink in embedded ClickHouse and joined by the trace and session views (migration 0009); requests
naming no target, several, or a malformed id refused with 422 and nothing published; and the monitor's
retraining, which learns from inference corrections only, leaving a span's correction alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from contracts.events import FeedbackReceived, FeedbackReviewed, InferenceLogged, SpanKind, SpanLogged
from contracts.http import Role
from contracts.topics import topic_for
from services.monitor.store import MonitorStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.settings import FlywheelSettings
from tests.integration.test_event_bus import read_all
from tests.integration.test_feedback_http import feedback_door
from tests.integration.test_sink_clickhouse import clickhouse, counts, eventually, running_sink  # noqa: F401
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TURN_1 = "4bf92f3577b34da6a3ce929d0e0e4736"
TURN_2 = "0af7651916cd43dd8448eb211c80319c"
ROOT_1, LLM_1, ROOT_2 = "1000000000000001", "1000000000000002", "2000000000000001"
SESSION = "conv-3"
TARGETS = "give inference_id (an inference), trace_id with span_id (a span), trace_id alone (a trace) or session_id (a session)"


def turns() -> list[SpanLogged]:
    """Two turns of one conversation; the first's LLM span went through the gateway as chatcmpl-t1."""
    app = {"session_id": SESSION, "service_name": "rag-app"}
    turn_2 = T0 + timedelta(seconds=60)
    return [
        SpanLogged(
            trace_id=TURN_1,
            span_id=ROOT_1,
            name="turn",
            kind=SpanKind.chain,
            started_at=T0,
            ended_at=T0 + timedelta(milliseconds=900),
            **app,
        ),
        SpanLogged(
            trace_id=TURN_1,
            span_id=LLM_1,
            parent_span_id=ROOT_1,
            name="chat smollm2",
            kind=SpanKind.llm,
            started_at=T0 + timedelta(milliseconds=100),
            ended_at=T0 + timedelta(milliseconds=800),
            inference_id="chatcmpl-t1",
            **app,
        ),
        SpanLogged(
            trace_id=TURN_2,
            span_id=ROOT_2,
            name="turn",
            kind=SpanKind.chain,
            started_at=turn_2,
            ended_at=turn_2 + timedelta(milliseconds=500),
            **app,
        ),
    ]


async def test_feedback_on_a_span_a_trace_and_a_session_is_stored_and_joined(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:  # noqa: F811
    accepted = {
        # name: (body, key); the app's end users rate a span, a trace, the session and the gateway's answer.
        "span": ({"trace_id": TURN_1, "span_id": LLM_1, "thumbs": "down", "rating": 2, "tags": ["wrong-fact"]}, "app"),
        "trace": ({"trace_id": TURN_1, "thumbs": "up"}, "app"),
        "session": ({"session_id": SESSION, "thumbs": "down", "rating": 1, "comment": "went in circles"}, "app"),
        "inference": ({"inference_id": "chatcmpl-t1", "thumbs": "down"}, "app"),
        # A reviewer corrects the second turn's root span, and the first turn's answer itself.
        "reviewed span": (
            {"trace_id": TURN_2, "span_id": ROOT_2, "correction": "Order 17 shipped on May 2.", "source": "reviewer"},
            "reviewer",
        ),
        "reviewed inference": (
            {"inference_id": "chatcmpl-t1", "correction": "Order 17 ships on May 2.", "source": "reviewer"},
            "reviewer",
        ),
    }
    refusals = {
        "two targets": (
            {"inference_id": "chatcmpl-t1", "trace_id": TURN_1, "thumbs": "up"},
            "body: Value error, feedback names 2 targets, an inference (inference_id) and a trace (trace_id); "
            f"give exactly one: {TARGETS.removeprefix('give ')}",
            None,
        ),
        "span and session": (
            {"trace_id": TURN_1, "span_id": LLM_1, "session_id": SESSION, "thumbs": "up"},
            "body: Value error, feedback names 2 targets, a span (trace_id and span_id) and a session (session_id)",
            None,
        ),
        "no target": ({"thumbs": "up"}, f"body: Value error, feedback names no target: {TARGETS}", None),
        "span without its trace": (
            {"span_id": LLM_1, "thumbs": "up"},
            f"body: Value error, span_id {LLM_1} needs its trace_id: a span is named by trace_id and span_id together",
            None,
        ),
        "uppercase trace id": (
            {"trace_id": TURN_1.upper(), "thumbs": "up"},
            "trace_id: String should match pattern '^[0-9a-f]{32}$'",
            "trace_id",
        ),
        "short span id": (
            {"trace_id": TURN_1, "span_id": "1000", "thumbs": "up"},
            "span_id: String should match pattern '^[0-9a-f]{16}$'",
            "span_id",
        ),
        "all-zero span id": (
            {"trace_id": TURN_1, "span_id": "0" * 16, "thumbs": "up"},
            "span_id: Value error, an all-zero trace or span id is invalid (W3C trace context)",
            "span_id",
        ),
        "session id with a space": (
            {"session_id": "conv 3", "thumbs": "up"},
            "session_id: String should match pattern",
            "session_id",
        ),
    }
    async with running_sink(settings, clickhouse) as bus:
        for span in turns():
            await bus.publish(span)
        await bus.publish(
            InferenceLogged(
                inference_id="chatcmpl-t1",
                model_name="smollm2",
                input_text="When does order 17 ship?",
                output_text="Tomorrow.",
                trace_id=TURN_1,
                span_id=LLM_1,
                session_id=SESSION,
            )
        )
        keys = {"app": api_key(settings, Role.app), "reviewer": api_key(settings, Role.reviewer)}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=feedback_door(bus, clickhouse, settings)), base_url="http://test"
        ) as client:
            answers = {
                name: await client.post(
                    "/feedback/v1/feedback", json=body, headers={"Authorization": f"Bearer {keys[role]}"}
                )
                for name, (body, role) in accepted.items()
            }
            for case, (body, message, param) in refusals.items():
                refused = await client.post(
                    "/feedback/v1/feedback", json=body, headers={"Authorization": f"Bearer {keys['app']}"}
                )
                assert refused.status_code == 422, (case, refused.text)
                error = refused.json()["error"]
                assert error["message"].startswith(message), (case, error["message"])
                assert (error["param"], error["type"]) == (param, "invalid_request_error"), (case, error)
        assert {name: answer.status_code for name, answer in answers.items()} == dict.fromkeys(accepted, 202)
        await eventually(lambda: counts(clickhouse, "feedback")[0] == 6, what="the six feedbacks stored")
        await eventually(lambda: counts(clickhouse, "span")[0] == 3, what="the three spans stored")
        await eventually(lambda: counts(clickhouse, "inference_log")[0] == 1, what="the inference stored")
        feedback_ids = {name: answer.json()["feedback_id"] for name, answer in answers.items()}
        # Read back through the door's GET, target by target: exactly the feedback given on each.
        viewer = {"Authorization": f"Bearer {api_key(settings, Role.viewer)}"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=feedback_door(bus, clickhouse, settings)), base_url="http://test"
        ) as client:
            read = {}
            for name, query in {
                "span": {"trace_id": TURN_1, "span_id": LLM_1},
                "trace": {"trace_id": TURN_1},
                "session": {"session_id": SESSION},
                "inference": {"inference_id": "chatcmpl-t1"},
                "reviewed span": {"trace_id": TURN_2, "span_id": ROOT_2},
                "unknown trace": {"trace_id": "f" * 32},
            }.items():
                answer = await client.get("/feedback/v1/feedback", params=query, headers=viewer)
                assert answer.status_code == 200, (name, answer.text)
                body = answer.json()
                read[name] = (body["target"], body["stored"], sorted(item["feedback_id"] for item in body["items"]))
                assert {key: body[key] for key in query} == query
            for query, param, message in [
                ({}, "query", "feedback names no target: give inference_id"),
                ({"trace_id": TURN_1, "session_id": SESSION}, "query", "feedback names 2 targets"),
                ({"span_id": LLM_1}, "query", f"span_id {LLM_1} needs its trace_id"),
                ({"trace_id": "0" * 32}, "trace_id", "trace_id '" + "0" * 32 + "': Value error, an all-zero"),
                ({"session_id": "conv 3"}, "session_id", "session_id 'conv 3': String should match pattern"),
            ]:
                refused = await client.get("/feedback/v1/feedback", params=query, headers=viewer)
                assert refused.status_code == 422, (query, refused.text)
                assert refused.json()["error"]["param"] == param, refused.text
                assert refused.json()["error"]["message"].startswith(message), refused.text
        assert read == {
            "span": ("span", True, [feedback_ids["span"]]),
            "trace": ("trace", True, [feedback_ids["trace"]]),
            "session": ("session", True, [feedback_ids["session"]]),
            "inference": (
                "inference",
                True,
                sorted([feedback_ids["inference"], feedback_ids["reviewed inference"]]),
            ),
            "reviewed span": ("span", True, [feedback_ids["reviewed span"]]),
            "unknown trace": ("trace", False, []),
        }

    # Published once each, keyed by their target's id (a span's by its trace), the refused never.
    bootstrap = settings.resolved_kafka_bootstrap()
    received = await read_all(bootstrap, topic_for(FeedbackReceived, topics), expected=10**6, timeout_s=5)
    reviewed = await read_all(bootstrap, topic_for(FeedbackReviewed, topics), expected=10**6, timeout_s=5)
    assert sorted((json.loads(r.value)["payload"]["feedback_id"], r.key.decode()) for r in received) == sorted(
        [
            (feedback_ids["span"], TURN_1),
            (feedback_ids["trace"], TURN_1),
            (feedback_ids["session"], SESSION),
            (feedback_ids["inference"], "chatcmpl-t1"),
        ]
    )
    assert sorted((json.loads(r.value)["payload"]["feedback_id"], r.key.decode()) for r in reviewed) == sorted(
        [(feedback_ids["reviewed span"], TURN_2), (feedback_ids["reviewed inference"], "chatcmpl-t1")]
    )

    stored = {
        row.pop("feedback_id"): row
        for row in clickhouse.query(
            "SELECT feedback_id, inference_id, trace_id, span_id, session_id, thumbs, rating, source FROM feedback FINAL"
        )
    }
    assert {name: stored[feedback_ids[name]] for name in accepted} == {
        "span": {"inference_id": "", "trace_id": TURN_1, "span_id": LLM_1, "session_id": None,
                 "thumbs": "down", "rating": 2, "source": "end_user"},
        "trace": {"inference_id": "", "trace_id": TURN_1, "span_id": None, "session_id": None,
                  "thumbs": "up", "rating": None, "source": "end_user"},
        "session": {"inference_id": "", "trace_id": None, "span_id": None, "session_id": SESSION,
                    "thumbs": "down", "rating": 1, "source": "end_user"},
        "inference": {"inference_id": "chatcmpl-t1", "trace_id": None, "span_id": None, "session_id": None,
                      "thumbs": "down", "rating": None, "source": "end_user"},
        "reviewed span": {"inference_id": "", "trace_id": TURN_2, "span_id": ROOT_2, "session_id": None,
                          "thumbs": None, "rating": None, "source": "reviewer"},
        "reviewed inference": {"inference_id": "chatcmpl-t1", "trace_id": None, "span_id": None, "session_id": None,
                               "thumbs": None, "rating": None, "source": "reviewer"},
    }  # fmt: skip

    # Turn 1: its span's, its own, and the two on the inference its LLM span names; turn 2: the correction.
    assert clickhouse.query(
        "SELECT trace_id, feedback_count, thumbs_up, thumbs_down, mean_rating FROM trace_summary ORDER BY started_at"
    ) == [
        {"trace_id": TURN_1, "feedback_count": 4, "thumbs_up": 1, "thumbs_down": 2, "mean_rating": 2.0},
        {"trace_id": TURN_2, "feedback_count": 1, "thumbs_up": 0, "thumbs_down": 0, "mean_rating": None},
    ]
    # Everything given within the session (5 on its traces, 1 on it), and what was given on the session itself.
    assert clickhouse.query(
        "SELECT session_id, traces, feedback_count, thumbs_down, session_feedback, session_thumbs_up, "
        "session_thumbs_down, session_mean_rating FROM session_summary"
    ) == [
        {
            "session_id": SESSION,
            "traces": 2,
            "feedback_count": 6,
            "thumbs_down": 3,
            "session_feedback": 1,
            "session_thumbs_up": 0,
            "session_thumbs_down": 1,
            "session_mean_rating": 1.0,
        }
    ]
    # The inference views are about inference feedback only: nothing here waits for an inference.
    assert clickhouse.query("SELECT count() AS waiting FROM feedback_awaiting_inference") == [{"waiting": 0}]
    assert clickhouse.query("SELECT feedback_id FROM feedback_with_inference ORDER BY feedback_id") == [
        {"feedback_id": feedback_id}
        for feedback_id in sorted([feedback_ids["inference"], feedback_ids["reviewed inference"]])
    ]
    # Retraining learns from reviewers' corrections of an answer to a prompt: the span's has neither.
    monitor = MonitorStore(lambda: clickhouse, lambda: clickhouse)
    assert [row["correction"] for row in monitor.corrections("smollm2")] == ["Order 17 ships on May 2."]
