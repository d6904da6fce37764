"""A review queue filled from live gateway traffic: the unmodified `openai` client asks SmolLM2 on a real
Triton through the gateway, serving logs each call (with how sure the model was of its tokens) on the
real broker, the feedback service as built stores them in chDB, and a `least_confident` queue offers
them least sure first to two reviewers with their own keys; an app key may not claim."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from contracts.http import Role
from services.runtime.inference import Engine
from services.runtime.settings import FlywheelSettings
from services.serving.settings import ServingSettings
from services.serving.triton import TritonServing
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.fixtures.trainer_model import base_model_dir  # noqa: F401 - fixture
from tests.integration.test_review_queues import review_service
from tests.integration.test_serving_streaming import MODEL, engine, serve_gateway, triton  # noqa: F401 - fixtures
from tests.support import api_key, eventually

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.timeout(600)]

QUESTIONS = [
    "What is the capital of France?",
    "Invent a word and define it.",
    "Name a colour of the rainbow.",
    "Write a haiku about a lost key.",
]


async def test_live_calls_fill_a_queue_least_sure_first_and_two_reviewers_work_it(
    engine: Engine,  # noqa: F811
    triton: TritonServing,  # noqa: F811
    settings: FlywheelSettings,
    topics: str,
    chdb_target: ClickHouseTarget,
    tmp_path: Path,
) -> None:
    app, _, clickhouse = await review_service(settings, chdb_target)
    keys = {
        name: api_key(settings, role, name)
        for name, role in (("ops", Role.operator), ("alice", Role.reviewer), ("bob", Role.reviewer), ("shop", Role.app))
    }
    async with (
        app.router.lifespan_context(app),
        serve_gateway(engine, triton, settings, tmp_path, ServingSettings(max_tokens_limit=64)) as (base_url, key, _),
    ):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            answered = [
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0
                )
                for question in QUESTIONS
            ]
        await eventually(
            lambda: clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] == len(QUESTIONS),
            timeout_s=90,
            what="the feedback service storing the gateway's calls",
        )
        logged = {
            row["inference_id"]: row["mean_token_logprob"]
            for row in clickhouse.query("SELECT inference_id, mean_token_logprob FROM inference_log")
        }
        assert set(logged) == {call.id for call in answered} and all(value < 0 for value in logged.values()), logged

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as door:

            async def call(who: str, method: str, path: str, body: dict | None = None) -> httpx.Response:
                return await door.request(method, path, json=body, headers={"Authorization": f"Bearer {keys[who]}"})

            queue = {
                "name": "live",
                "rule": {"model_name": MODEL, "select": "traffic", "order": "least_confident"},
                "rubric": "answer-quality",
                "reviewers_per_item": 2,
            }
            assert (await call("ops", "POST", "/feedback/v1/review/queues", queue)).status_code == 201
            filled = (await call("ops", "POST", "/feedback/v1/review/queues/live/fill")).json()
            assert (filled["considered"], filled["added"]) == (4, 4), filled
            assert (await call("shop", "POST", "/feedback/v1/review/queues/live/claim")).status_code == 403

            offered: dict[str, list[str]] = {}
            for reviewer in ("alice", "bob"):
                offered[reviewer] = []
                while (
                    claimed := await call(reviewer, "POST", "/feedback/v1/review/queues/live/claim")
                ).status_code == 200:
                    item = claimed.json()
                    assert item["mean_token_logprob"] == pytest.approx(logged[item["inference_id"]], abs=1e-6)
                    offered[reviewer].append(item["inference_id"])
                    scores = {"correct": "up", "helpful": "4", "tone": "friendly"}
                    submitted = await call(
                        reviewer, "POST", f"/feedback/v1/review/items/{item['item_id']}/submit", {"scores": scores}
                    )
                    assert submitted.status_code == 200, submitted.text
                assert claimed.status_code == 204, claimed.text
            least_sure_first = sorted(logged, key=logged.__getitem__)
            assert offered == {"alice": least_sure_first, "bob": least_sure_first}
            view = (await call("ops", "GET", "/feedback/v1/review/queues/live")).json()
            assert view["counts"]["done"] == 4, view["counts"]
            correct = next(row for row in view["agreement"] if row["dimension"] == "correct")
            assert correct["items"] == 4
