"""The feedback door over ASGI, publishing to the real broker and reading back from embedded ClickHouse."""

from __future__ import annotations

import httpx
import pytest

from contracts.events import InferenceLogged
from contracts.http import Role
from services.feedback.api import create_router
from services.feedback.store import FeedbackStore
from services.runtime.auth import Authenticator
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.http import create_http_app
from services.runtime.settings import FlywheelSettings
from tests.integration.test_sink_clickhouse import clickhouse, eventually, running_sink  # noqa: F401 - fixture
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


async def test_feedback_is_accepted_refused_precisely_and_read_back(settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore) -> None:  # noqa: F811
    async with running_sink(settings, clickhouse) as bus:
        app = create_http_app("test", routers=[create_router(bus, lambda: FeedbackStore(lambda: clickhouse), Authenticator.for_settings(settings))])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            unsigned = await client.post("/feedback/v1/feedback", json={"inference_id": "chatcmpl-42", "thumbs": "up"})
            assert unsigned.status_code == 401, unsigned.text
            client.headers["Authorization"] = f"Bearer {api_key(settings, Role.viewer)}"
            assert (await client.post("/feedback/v1/feedback", json={"inference_id": "chatcmpl-42", "thumbs": "up"})).status_code == 403
            client.headers["Authorization"] = f"Bearer {api_key(settings, Role.app)}"
            # The inference is not stored yet: the feedback is accepted and held, not refused.
            accepted = await client.post("/feedback/v1/feedback", json={"inference_id": "chatcmpl-42", "thumbs": "down", "rating": 2, "comment": "wrong", "source": "reviewer"})
            assert accepted.status_code == 202, accepted.text
            feedback_id = accepted.json()["feedback_id"]

            refusals = {
                "rating out of range": ({"inference_id": "chatcmpl-42", "rating": 7}, "rating: Input should be less than or equal to 5", "rating"),
                "oversize comment": ({"inference_id": "chatcmpl-42", "comment": "x" * 8001}, "comment: String should have at most 8000 characters", "comment"),
                "malformed id": ({"inference_id": "chat cmpl 42", "thumbs": "up"}, "inference_id 'chat cmpl 42' is malformed", "inference_id"),
                "unknown field": ({"inference_id": "chatcmpl-42", "stars": 5}, "stars: Extra inputs are not permitted", "stars"),
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

            await eventually(lambda: clickhouse.query("SELECT count() AS n FROM feedback")[0]["n"] == 1, what="the feedback stored")
            first = await listed()
            assert first["inference_stored"] is False
            assert [(item["feedback_id"], item["thumbs"], item["rating"], item["source"]) for item in first["items"]] == [(feedback_id, "down", 2, "reviewer")]

            await bus.publish(InferenceLogged(inference_id="chatcmpl-42", model_name="smollm2"))
            await eventually(lambda: clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] == 1, what="the inference stored")
            assert (await listed())["inference_stored"] is True
            bad = await client.get("/feedback/v1/feedback", params={"inference_id": "a b"})
            assert bad.status_code == 422 and bad.json()["error"]["param"] == "inference_id"
