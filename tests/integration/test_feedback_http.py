"""The feedback door over ASGI, publishing to the real broker and reading back from embedded ClickHouse:
refusals, who may claim `source: reviewer`, and personal data scrubbed before it reaches the topic."""

from __future__ import annotations

import json

import httpx
import pytest

from contracts.events import FeedbackReceived, FeedbackReviewed, InferenceLogged
from contracts.http import Role
from contracts.topics import topic_for
from services.feedback.api import create_router
from services.feedback.store import FeedbackStore
from services.runtime.auth import Authenticator
from services.runtime.broker import EventBus, create_broker
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.http import create_http_app
from services.runtime.privacy import Redactor
from services.runtime.settings import FlywheelSettings
from tests.integration.test_event_bus import read_all
from tests.integration.test_sink_clickhouse import clickhouse, eventually, running_sink  # noqa: F401 - fixture
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def feedback_door(bus: EventBus, clickhouse: ClickHouseStore, settings: FlywheelSettings):
    return create_http_app(
        "test",
        routers=[
            create_router(
                bus, lambda: FeedbackStore(lambda: clickhouse), Authenticator.for_settings(settings), Redactor()
            )
        ],
    )


async def test_feedback_is_accepted_refused_precisely_and_read_back(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:  # noqa: F811
    async with running_sink(settings, clickhouse) as bus:
        app = feedback_door(bus, clickhouse, settings)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            unsigned = await client.post("/feedback/v1/feedback", json={"inference_id": "chatcmpl-42", "thumbs": "up"})
            assert unsigned.status_code == 401, unsigned.text
            client.headers["Authorization"] = f"Bearer {api_key(settings, Role.viewer)}"
            assert (
                await client.post("/feedback/v1/feedback", json={"inference_id": "chatcmpl-42", "thumbs": "up"})
            ).status_code == 403
            client.headers["Authorization"] = f"Bearer {api_key(settings, Role.reviewer)}"
            # The inference is not stored yet: the feedback is accepted and held, not refused.
            accepted = await client.post(
                "/feedback/v1/feedback",
                json={
                    "inference_id": "chatcmpl-42",
                    "thumbs": "down",
                    "rating": 2,
                    "comment": "wrong",
                    "source": "reviewer",
                },
            )
            assert accepted.status_code == 202, accepted.text
            feedback_id = accepted.json()["feedback_id"]

            refusals = {
                "rating out of range": (
                    {"inference_id": "chatcmpl-42", "rating": 7},
                    "rating: Input should be less than or equal to 5",
                    "rating",
                ),
                "oversize comment": (
                    {"inference_id": "chatcmpl-42", "comment": "x" * 8001},
                    "comment: String should have at most 8000 characters",
                    "comment",
                ),
                "malformed id": (
                    {"inference_id": "chat cmpl 42", "thumbs": "up"},
                    "inference_id 'chat cmpl 42' is malformed",
                    "inference_id",
                ),
                "unknown field": (
                    {"inference_id": "chatcmpl-42", "stars": 5},
                    "stars: Extra inputs are not permitted",
                    "stars",
                ),
                "empty": ({"inference_id": "chatcmpl-42"}, "empty feedback", "body"),
            }
            for case, (body, message, param) in refusals.items():
                refused = await client.post("/feedback/v1/feedback", json=body)
                assert refused.status_code == 422, case
                error = refused.json()["error"]
                assert error["message"].startswith(message), (case, error)
                assert error["param"] == param and error["type"] == "invalid_request_error", case

            async def listed() -> dict:
                return (await client.get("/feedback/v1/feedback", params={"inference_id": "chatcmpl-42"})).json()

            await eventually(
                lambda: clickhouse.query("SELECT count() AS n FROM feedback")[0]["n"] == 1, what="the feedback stored"
            )
            first = await listed()
            assert first["inference_stored"] is False
            assert [
                (item["feedback_id"], item["thumbs"], item["rating"], item["source"]) for item in first["items"]
            ] == [(feedback_id, "down", 2, "reviewer")]

            await bus.publish(InferenceLogged(inference_id="chatcmpl-42", model_name="smollm2"))
            await eventually(
                lambda: clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] == 1,
                what="the inference stored",
            )
            assert (await listed())["inference_stored"] is True
            bad = await client.get("/feedback/v1/feedback", params={"inference_id": "a b"})
            assert bad.status_code == 422 and bad.json()["error"]["param"] == "inference_id"


async def test_only_a_reviewer_key_may_send_reviewer_corrections(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:  # noqa: F811
    correction = {
        "inference_id": "chatcmpl-7",
        "thumbs": "down",
        "correction": "The warranty is 2 years.",
        "source": "reviewer",
    }
    async with running_sink(settings, clickhouse) as bus:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=feedback_door(bus, clickhouse, settings)), base_url="http://test"
        ) as client:
            as_app = {"Authorization": f"Bearer {api_key(settings, Role.app)}"}
            claimed = await client.post("/feedback/v1/feedback", json=correction, headers=as_app)
            end_user = await client.post(
                "/feedback/v1/feedback", json={**correction, "source": "end_user"}, headers=as_app
            )
            reviewed = await client.post(
                "/feedback/v1/feedback",
                json=correction,
                headers={"Authorization": f"Bearer {api_key(settings, Role.reviewer)}"},
            )
            by_admin = await client.post(
                "/feedback/v1/feedback",
                json=correction,
                headers={"Authorization": f"Bearer {api_key(settings, Role.admin)}"},
            )
            operator = await client.post(
                "/feedback/v1/feedback",
                json={**correction, "source": "end_user"},
                headers={"Authorization": f"Bearer {api_key(settings, Role.operator)}"},
            )
            await eventually(
                lambda: clickhouse.query("SELECT count() AS n FROM feedback")[0]["n"] == 3,
                what="the three accepted feedbacks stored",
            )

    assert claimed.status_code == 403, claimed.text
    error = claimed.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("reviewer_role_required", "source", "permission_error")
    assert error["message"].startswith(
        "source reviewer needs a key whose role grants reviewer (reviewer or admin); test-app may not review"
    )
    assert (
        operator.status_code == 403 and "sending feedback needs app or reviewer" in operator.json()["error"]["message"]
    )
    assert [answer.status_code for answer in (end_user, reviewed, by_admin)] == [202, 202, 202]
    stored = clickhouse.query("SELECT feedback_id, source FROM feedback ORDER BY source")
    assert sorted(row["source"] for row in stored) == ["end_user", "reviewer", "reviewer"]
    assert {row["feedback_id"] for row in stored if row["source"] == "reviewer"} == {
        reviewed.json()["feedback_id"],
        by_admin.json()["feedback_id"],
    }
    # The refused one was never published: the topics hold the three accepted, nothing else, and the
    # reviewers' travel on feedback.reviewed, which apps cannot write.
    bootstrap = settings.resolved_kafka_bootstrap()
    received = await read_all(
        bootstrap, topic_for(FeedbackReceived, settings.topic_prefix), expected=10**6, timeout_s=5
    )
    reviewed_records = await read_all(
        bootstrap, topic_for(FeedbackReviewed, settings.topic_prefix), expected=10**6, timeout_s=5
    )
    assert [json.loads(record.value)["payload"]["source"] for record in received] == ["end_user"]
    assert sorted(json.loads(record.value)["payload"]["feedback_id"] for record in reviewed_records) == sorted(
        answer.json()["feedback_id"] for answer in (reviewed, by_admin)
    )


async def test_the_door_scrubs_feedback_before_it_is_published(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:  # noqa: F811
    planted = {
        "email": "ann.lee@example.org",
        "card": "4242 4242 4242 4242",
        "key": "sk-proj-Qw3rTy7uIo9pAs1dFg5hJk2lZx8cVb4n",
        "actor": "ann.lee@example.org",
    }
    body = {
        "inference_id": "chatcmpl-9",
        "thumbs": "down",
        "comment": f"mail me at {planted['email']}, card {planted['card']}",
        "correction": f"Use the key {planted['key']} instead",
        "tags": [planted["email"]],
        "actor": planted["actor"],
    }
    async with running_sink(settings, clickhouse) as bus:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=feedback_door(bus, clickhouse, settings)), base_url="http://test"
        ) as client:
            accepted = await client.post(
                "/feedback/v1/feedback", json=body, headers={"Authorization": f"Bearer {api_key(settings, Role.app)}"}
            )
            assert accepted.status_code == 202, accepted.text
            await eventually(
                lambda: clickhouse.query("SELECT count() AS n FROM feedback")[0]["n"] == 1, what="the feedback stored"
            )
    records = await read_all(
        settings.resolved_kafka_bootstrap(), topic_for(FeedbackReceived, settings.topic_prefix), expected=1
    )
    on_topic = records[0].value.decode()
    stored = json.dumps(clickhouse.query("SELECT comment, correction, tags, actor FROM feedback"))
    for kind, value in planted.items():
        assert value not in on_topic, f"{kind} reached the topic: {on_topic}"
        assert value not in stored, f"{kind} was stored: {stored}"
    payload = json.loads(on_topic)["payload"]
    assert (
        payload["comment"] == "mail me at [EMAIL], card [CARD]"
        and payload["correction"] == "Use the key [OPENAI_KEY] instead"
    )
    assert payload["tags"] == ["[EMAIL]"] and payload["actor"].startswith("[USER:")


async def test_kafka_not_taking_the_feedback_is_a_retryable_503_that_stores_nothing(settings: FlywheelSettings) -> None:
    # A broker never connected fails every publish at once, as Kafka down does after the wait.
    bus = EventBus(create_broker(settings, client_id="feedback-door"), producer="feedback", topic_prefix="unused")
    never_read = FeedbackStore(lambda: pytest.fail("a refused POST must not read ClickHouse"))
    app = create_http_app(
        "test", routers=[create_router(bus, lambda: never_read, Authenticator.for_settings(settings), Redactor())]
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        answer = await client.post(
            "/feedback/v1/feedback",
            json={"inference_id": "chatcmpl-42", "thumbs": "down"},
            headers={"Authorization": f"Bearer {api_key(settings, Role.app)}"},
        )
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["code"] == "broker_unavailable"
    assert answer.json()["error"]["message"].startswith(
        "Kafka did not take the feedback within 10 s (IncorrectState); nothing was stored, retry later"
    )
