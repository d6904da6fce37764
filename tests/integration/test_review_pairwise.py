"""Pairwise review on real components: the feedback service as `flywheel run feedback` builds it (its sink on
the real broker, embedded ClickHouse, its door) and the registry's real door for the rubric. A `pairs` rule
puts two adapter versions' answers to one prompt side by side; two reviewers pick; agreement on the choice
matches the hand-computed value; a disagreement is adjudicated; the feedback stored in ClickHouse names the
chosen and the rejected answer, and the preference dataset builds exactly the decided pairs from it."""

from __future__ import annotations

from fractions import Fraction

import httpx
import pytest

from contracts.events import InferenceLogged
from contracts.http import Role
from services.monitor.preference_datasets import build_pairs, feedback_query
from services.runtime.settings import FlywheelSettings
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.test_review_queues import MODEL, review_service
from tests.support import api_key, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WARRANTY = "How long is the warranty on the hub?"
RETURNS = "Can I return an opened router?"
LIGHT = "What does the blue light mean?"
# (inference id, prompt, adapter version, route, answer): production's v1 against the canary's v2.
CALLS = [
    ("warranty-v1", WARRANTY, 1, "production", "Two years."),
    ("warranty-v2", WARRANTY, 2, "canary", "The warranty on the hub is two years from purchase."),
    ("returns-v1", RETURNS, 1, "production", "No."),
    ("returns-v2", RETURNS, 2, "canary", "Yes, opened routers can be returned within 30 days."),
    ("light-v1", LIGHT, 1, "production", "Pairing."),
    ("light-v2", LIGHT, 2, "canary", "The hub is pairing."),
    # One answer: nothing to choose between.
    ("order-v1", "Where is my order 1234?", 1, "production", "It ships tomorrow."),
    # Two answers with the same text: nothing to choose between either.
    ("canada-v1", "Do you ship to Canada?", 1, "production", "Yes."),
    ("canada-v2", "Do you ship to Canada?", 2, "canary", "Yes."),
]
# Who picks which answer (a tie names none): both prefer v2 on the warranty, disagree on returns, tie on the light.
PICKS = {
    "alice": {WARRANTY: "warranty-v2", RETURNS: "returns-v2", LIGHT: None},
    "bob": {WARRANTY: "warranty-v2", RETURNS: "returns-v1", LIGHT: None},
}


async def test_a_pairs_rule_puts_two_versions_side_by_side_and_the_decided_choices_become_preference_pairs(
    settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget
) -> None:
    app, runtime, clickhouse = await review_service(settings, chdb_target)
    keys = {
        name: api_key(settings, role, name)
        for name, role in (
            ("ops", Role.operator),
            ("alice", Role.reviewer),
            ("bob", Role.reviewer),
            ("carol", Role.reviewer),
        )
    }
    async with app.router.lifespan_context(app):
        bus = runtime.bus("test")
        for inference_id, prompt, version, route, answer in CALLS:
            await bus.publish(
                InferenceLogged(
                    inference_id=inference_id,
                    model_name=MODEL,
                    adapter_version=version,
                    route=route,
                    input_text=prompt,
                    output_text=answer,
                )
            )
        await eventually(
            lambda: clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] == len(CALLS),
            what="the sink storing the calls",
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:

            async def call(key: str, method: str, path: str, body: dict | None = None) -> httpx.Response:
                return await client.request(method, path, json=body, headers={"Authorization": f"Bearer {keys[key]}"})

            for name, select in (("versus", "pairs"), ("singles", "traffic")):
                queue = {
                    "name": name,
                    "rule": {"select": select, "model_name": MODEL, "order": "newest"},
                    "rubric": "answer-quality",
                    "reviewers_per_item": 2,
                }
                defined = await call("ops", "POST", "/feedback/v1/review/queues", queue)
                assert defined.status_code == 201, defined.text
            filled = (await call("ops", "POST", "/feedback/v1/review/queues/versus/fill")).json()
            assert filled == {
                "queue": "versus",
                "considered": 3,
                "added": 3,
                "already_queued": 0,
                "duplicate_prompts": 0,
            }, filled

            # A single answer takes no choice.
            single = (await call("alice", "POST", "/feedback/v1/review/queues/singles/claim")).json()
            assert single["second_answer"] is None
            refused = await call(
                "alice", "POST", f"/feedback/v1/review/items/{single['item_id']}/submit", {"choice": "first"}
            )
            assert refused.status_code == 422 and refused.json()["error"]["param"] == "choice", refused.text
            await call("alice", "POST", f"/feedback/v1/review/items/{single['item_id']}/skip", {"reason": "later"})

            answers = {inference_id: answer for inference_id, _, _, _, answer in CALLS}
            items: dict[str, dict] = {}
            for reviewer, picks in PICKS.items():
                for k in range(3):
                    item = (await call(reviewer, "POST", "/feedback/v1/review/queues/versus/claim")).json()
                    shown = {item["inference_id"], item["second_inference_id"]}
                    prompt = item["messages"][-1]["content"]
                    assert shown == {f"{prompt_id(prompt)}-v1", f"{prompt_id(prompt)}-v2"}, item
                    assert (item["answer"], item["second_answer"]) == (
                        answers[item["inference_id"]],
                        answers[item["second_inference_id"]],
                    )
                    items[prompt] = item
                    path = f"/feedback/v1/review/items/{item['item_id']}/submit"
                    if reviewer == "alice" and k == 0:
                        scores_only = await call(reviewer, "POST", path, {"scores": {"correct": "up"}})
                        assert scores_only.status_code == 422, scores_only.text
                        assert scores_only.json()["error"]["param"] == "choice", scores_only.text
                        both = await call(reviewer, "POST", path, {"choice": "first", "scores": {"correct": "up"}})
                        assert both.status_code == 422 and both.json()["error"]["param"] == "scores", both.text
                    accepted = await call(reviewer, "POST", path, {"choice": choice(item, picks[prompt])})
                    assert accepted.status_code == 200, accepted.text
            # Every prompt's two answers were handed out once, in one order for both reviewers.
            assert set(items) == {WARRANTY, RETURNS, LIGHT}

            view = (await call("ops", "GET", "/feedback/v1/review/queues/versus")).json()
            assert view["counts"] == {
                "open": 0,
                "claimed": 0,
                "adjudication": 1,
                "done": 2,
                "gone": 0,
                "skips": 0,
            }
            # Three items, two reviewers, nominal: one unit (returns) disagrees. Whichever way the returns
            # answers are shown, one of its two values is the warranty's pair of equal values, so n = 6 with
            # counts 3, 1 and 2 (tie): alpha = 1 - 5 * 2 / (2 * (3*1 + 3*2 + 1*2)) = 6/11, and Cohen's kappa is
            # (2/3 - 1/3) / (1 - 1/3) = 1/2.
            (measured,) = view["agreement"]
            assert (measured["dimension"], measured["level"], measured["items"]) == ("choice", "nominal", 3)
            assert measured["alpha"] == pytest.approx(float(Fraction(6, 11)))
            assert measured["kappa"] == pytest.approx(0.5)

            adjudication = (await call("carol", "POST", "/feedback/v1/review/queues/versus/claim")).json()
            assert adjudication["stage"] == "adjudication"
            assert adjudication["item_id"] == items[RETURNS]["item_id"]
            assert sorted(review["reviewer"] for review in adjudication["reviews"]) == ["alice", "bob"]
            assert {review["choice"] for review in adjudication["reviews"]} == {"first", "second"}
            settled = await call(
                "carol",
                "POST",
                f"/feedback/v1/review/items/{adjudication['item_id']}/submit",
                {"choice": choice(adjudication, "returns-v2")},
            )
            assert settled.json()["stage"] == "done", settled.text

        def stored() -> list[dict]:
            return clickhouse.query(
                "SELECT feedback_id, actor, inference_id, preferred_over, tied_with, tags, thumbs, scores "
                "FROM feedback FINAL WHERE queue = 'versus' ORDER BY actor, inference_id"
            )

        await eventually(lambda: len(stored()) == 7, what="the seven choices stored as feedback")
        rows = stored()
        assert [
            (row["actor"], row["inference_id"], row["preferred_over"], row["tied_with"], list(row["tags"]))
            for row in rows
        ] == sorted(
            [
                ("alice", "warranty-v2", "warranty-v1", None, []),
                ("alice", "returns-v2", "returns-v1", None, []),
                ("alice", items[LIGHT]["inference_id"], None, items[LIGHT]["second_inference_id"], []),
                ("bob", "warranty-v2", "warranty-v1", None, []),
                ("bob", "returns-v1", "returns-v2", None, []),
                ("bob", items[LIGHT]["inference_id"], None, items[LIGHT]["second_inference_id"], []),
                ("carol", "returns-v2", "returns-v1", None, ["adjudication"]),
            ],
            key=lambda row: (row[0], row[1]),
        )
        assert all(row["thumbs"] is None and not row["scores"] for row in rows)
        ids = {(row["actor"], row["inference_id"]): row["feedback_id"] for row in rows}

        built = build_pairs(MODEL, clickhouse.query(*feedback_query(MODEL)))
        assert built.contradicted == 0
        records = sorted(
            (pair.record(MODEL) for pair in built.pairs), key=lambda record: record["prompt"][0]["content"]
        )
        assert records == [
            pairwise(
                RETURNS,
                items[RETURNS]["item_id"],
                ("returns-v2", 2, [ids["carol", "returns-v2"]]),
                ("returns-v1", 1),
                answers,
            ),
            pairwise(
                WARRANTY,
                items[WARRANTY]["item_id"],
                ("warranty-v2", 2, sorted([ids["alice", "warranty-v2"], ids["bob", "warranty-v2"]])),
                ("warranty-v1", 1),
                answers,
            ),
        ]


def prompt_id(prompt: str) -> str:
    return {WARRANTY: "warranty", RETURNS: "returns", LIGHT: "light"}[prompt]


def choice(item: dict, picked: str | None) -> str:
    """The choice that picks `picked` as `item` shows it (None: a tie)."""
    if picked is None:
        return "tie"
    return "first" if item["inference_id"] == picked else "second"


def pairwise(
    prompt: str, item_id: str, chosen: tuple[str, int, list[str]], rejected: tuple[str, int], answers: dict
) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": answers[chosen[0]],
        "rejected": answers[rejected[0]],
        "provenance": {
            "kind": "pairwise",
            "model_name": MODEL,
            "item_id": item_id,
            "chosen": {
                "inference_id": chosen[0],
                "adapter_version": chosen[1],
                "prompt_version": None,
                "feedback_ids": chosen[2],
            },
            "rejected": {
                "inference_id": rejected[0],
                "adapter_version": rejected[1],
                "prompt_version": None,
                "feedback_ids": [],
            },
        },
    }
