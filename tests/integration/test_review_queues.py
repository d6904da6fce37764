"""Review queues on real components: the feedback service as `flywheel run feedback` builds it (its sink on
the real broker, embedded ClickHouse, its door), the registry's real door for the rubric, MiniLM for the
answers' groundedness. A rule fills a queue from stored traffic; three reviewers (three keys) work it
through the door; agreement matches Krippendorff's alpha and Cohen's kappa computed by hand; their
reviews land in ClickHouse as feedback naming the queue, item, rubric version and scores."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import httpx
import pytest

from contracts.envelope import Envelope, wrap
from contracts.events import (
    FeedbackReceived,
    FeedbackReviewed,
    FeedbackSource,
    InferenceLogged,
    InferenceStatus,
    Thumbs,
)
from contracts.http import Role
from services.feedback.app import create_app
from services.feedback.settings import FeedbackSettings
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.privacy import PrivacySettings
from services.runtime.service import Runtime, Service, build_process
from services.runtime.settings import FlywheelSettings
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.review_support import store_calls
from tests.monitor_support import RegistryDoorFixture
from infra.processes import free_port
from tests.support import api_key, eventually, served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = "support-bot"
RUBRIC = {
    "name": "answer-quality",
    "instructions": "Judge the answer as the customer would.",
    "dimensions": [
        {"name": "correct", "description": "Is every fact in it right?", "scale": "thumbs"},
        {"name": "helpful", "description": "How far does it solve the problem?", "scale": "rating"},
        {"name": "tone", "description": "How does it sound?", "scale": "label", "labels": ["friendly", "curt", "rude"]},
    ],
}
# Five distinct prompts; the first is asked three times (two of its answers are duplicates of a queued prompt).
CALLS = [
    ("How long is the warranty on the hub?", "The warranty on the hub is two years."),
    ("How long is the warranty on the hub?", "Two years."),
    ("How long is the warranty on the hub?", "Bananas are yellow."),
    ("Can I return an opened router?", "Yes, opened routers can be returned within 30 days."),
    ("Where is my order 1234?", "I like turtles."),
    ("Do you ship to Canada?", "We ship to Canada in five to seven days."),
    ("What does the blue light mean?", "The blue light means the hub is pairing."),
]
# alice's and bob's judgement of `correct` on the first four items they share, in alice's order: Krippendorff's
# alpha (nominal) of these four units is 1 - (n-1) * D_o / D_e = 1 - 7 * 2 / (2 * 5 * 3) = 8/15; Cohen's
# kappa is (3/4 - 1/2) / (1 - 1/2) = 1/2 (alice: 3 up, 1 down; bob: 2 and 2; chance 3/4*1/2 + 1/4*1/2).
ALICE = ["up", "up", "down", "up"]
BOB = ["up", "up", "down", "down"]


def feedback_process(settings: FlywheelSettings, clickhouse: ClickHouseStore, door: RegistryDoorFixture):  # noqa: ANN201 - build_process's pair
    """The feedback service as `flywheel run feedback` builds it, on this test's ClickHouse and registry door."""

    def feedback(runtime: Runtime) -> Service:
        runtime.clickhouse = lambda: clickhouse
        clickhouse.migrate()
        sink = FeedbackSettings(
            batch_max_records=500,
            batch_max_wait_ms=100,
            batch_min_bytes=1,
            otlp_grpc_port=0,
            registry_url="http://registry",
        )
        return create_app(runtime, sink, PrivacySettings(), registry_transport=door.transport)

    return build_process(settings, [feedback], title="flywheel-feedback")


async def review_service(settings: FlywheelSettings, chdb_target: ClickHouseTarget):  # noqa: ANN201 - build_process's pair and the store
    """The feedback service as built, with the rubric published at its registry door, and its ClickHouse."""
    door = RegistryDoorFixture(settings.home / "registry")
    await published_rubric(door)
    clickhouse: ClickHouseStore = chdb_target.open()
    app, runtime = feedback_process(settings, clickhouse, door)
    return app, runtime, clickhouse


async def published_rubric(door: RegistryDoorFixture) -> None:
    async with door.client() as registry:
        published = await registry.post("/registry/v1/rubrics", json=RUBRIC)
        assert published.status_code == 201, published.text


async def test_a_rule_fills_a_queue_three_reviewers_work_it_and_agreement_matches_the_hand_computed_value(
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
            ("support-app", Role.app),
            ("watcher", Role.viewer),
        )
    }
    async with app.router.lifespan_context(app):
        bus = runtime.bus("test")
        for i, (question, answer) in enumerate(CALLS):
            await bus.publish(
                InferenceLogged(inference_id=f"call-{i}", model_name=MODEL, input_text=question, output_text=answer)
            )
        # Neither another model's answer nor a failed call is reviewed.
        await bus.publish(
            InferenceLogged(inference_id="other-model", model_name="other", input_text="Hi?", output_text="Hello.")
        )
        await bus.publish(
            InferenceLogged(
                inference_id="failed", model_name=MODEL, input_text="Hi?", status=InferenceStatus.error, error="boom"
            )
        )
        await eventually(
            lambda: clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] == len(CALLS) + 2,
            what="the sink storing the calls",
        )

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:

            async def call(key: str, method: str, path: str, body: dict | None = None) -> httpx.Response:
                return await client.request(method, path, json=body, headers={"Authorization": f"Bearer {keys[key]}"})

            queue = {
                "name": "support-review",
                "rule": {"select": "traffic", "model_name": MODEL, "share": 1.0, "order": "uncertainty"},
                "rubric": "answer-quality",
                "reviewers_per_item": 2,
                "lease_seconds": 120,
            }
            refused = await call("watcher", "POST", "/feedback/v1/review/queues", queue)
            assert refused.status_code == 403, refused.text
            unknown = await call("ops", "POST", "/feedback/v1/review/queues", {**queue, "rubric": "no-such-rubric"})
            assert unknown.status_code == 404, unknown.text
            assert unknown.json()["error"]["param"] == "rubric"
            defined = await call("ops", "POST", "/feedback/v1/review/queues", queue)
            assert defined.status_code == 201, defined.text
            assert defined.json()["version"] == 1
            assert defined.json()["rubric"]["version"] == 1

            filled = (await call("ops", "POST", "/feedback/v1/review/queues/support-review/fill")).json()
            assert filled == {
                "queue": "support-review",
                "considered": len(CALLS),
                "added": 5,
                "already_queued": 0,
                "duplicate_prompts": 2,
            }, filled
            again = (await call("ops", "POST", "/feedback/v1/review/queues/support-review/fill")).json()
            assert (again["added"], again["already_queued"]) == (0, 5)

            for outsider in ("support-app", "watcher", "ops"):
                denied = await call(outsider, "POST", "/feedback/v1/review/queues/support-review/claim")
                assert denied.status_code == 403, (outsider, denied.text)

            # alice: four reviews, least grounded answer first, then a skip.
            scores: dict[str, dict[str, str]] = {}
            seen: list[float] = []
            for k in range(4):
                item = (await call("alice", "POST", "/feedback/v1/review/queues/support-review/claim")).json()
                if k == 0:
                    held = (await call("alice", "POST", "/feedback/v1/review/queues/support-review/claim")).json()
                    assert held["item_id"] == item["item_id"], "a reviewer asking again gets the item they hold"
                    bad = await call(
                        "alice",
                        "POST",
                        f"/feedback/v1/review/items/{item['item_id']}/submit",
                        {"scores": {"correct": "maybe"}},
                    )
                    assert bad.status_code == 422 and bad.json()["error"]["param"] == "scores.correct", bad.text
                    not_theirs = await call(
                        "bob", "POST", f"/feedback/v1/review/items/{item['item_id']}/submit", {"scores": {}}
                    )
                    assert not_theirs.status_code == 409 and not_theirs.json()["error"]["code"] == "not_claimed", (
                        not_theirs.text
                    )
                    operator_submit = await call(
                        "ops", "POST", f"/feedback/v1/review/items/{item['item_id']}/submit", {"scores": {}}
                    )
                    assert operator_submit.status_code == 403, operator_submit.text
                assert item["stage"] == "review" and item["answer"] and item["messages"][-1]["role"] == "user"
                seen.append(item["groundedness"])
                scores[item["item_id"]] = {"correct": ALICE[k], "helpful": "4", "tone": "friendly"}
                done = await call(
                    "alice",
                    "POST",
                    f"/feedback/v1/review/items/{item['item_id']}/submit",
                    {"scores": scores[item["item_id"]]},
                )
                assert done.status_code == 200 and done.json()["stage"] == "waiting", done.text
            assert seen == sorted(seen), f"uncertainty first: groundedness should not fall, got {seen}"
            last = (await call("alice", "POST", "/feedback/v1/review/queues/support-review/claim")).json()
            skipped = await call(
                "alice",
                "POST",
                f"/feedback/v1/review/items/{last['item_id']}/skip",
                {"reason": "not about our products"},
            )
            assert skipped.status_code == 204, skipped.text
            nothing = await call("alice", "POST", "/feedback/v1/review/queues/support-review/claim")
            assert nothing.status_code == 204, nothing.text

            # bob: the same four, then the one alice skipped.
            order = list(scores)
            stages = {}
            for _ in range(5):
                item = (await call("bob", "POST", "/feedback/v1/review/queues/support-review/claim")).json()
                judged = (
                    {"correct": BOB[order.index(item["item_id"])], "helpful": "5", "tone": "friendly"}
                    if item["item_id"] in scores
                    else {"correct": "up", "helpful": "3", "tone": "curt"}
                )
                answer = await call(
                    "bob", "POST", f"/feedback/v1/review/items/{item['item_id']}/submit", {"scores": judged}
                )
                assert answer.status_code == 200, answer.text
                stages[item["item_id"]] = answer.json()["stage"]
            conflict = order[3]
            assert stages == {
                **{item_id: "done" for item_id in order[:3]},
                conflict: "adjudication",
                last["item_id"]: "waiting",
            }

            view = (await call("watcher", "GET", "/feedback/v1/review/queues/support-review")).json()
            correct = next(row for row in view["agreement"] if row["dimension"] == "correct")
            assert correct["items"] == 4
            assert correct["alpha"] == pytest.approx(float(Fraction(8, 15)))
            assert correct["kappa"] == pytest.approx(0.5)
            assert view["counts"] == {"open": 1, "claimed": 0, "adjudication": 1, "done": 3, "gone": 0, "skips": 1}

            # carol adjudicates the conflict first, seeing both reviews, then gives the last item its second review.
            item = (await call("carol", "POST", "/feedback/v1/review/queues/support-review/claim")).json()
            assert (item["item_id"], item["stage"]) == (conflict, "adjudication")
            assert sorted(review["reviewer"] for review in item["reviews"]) == ["alice", "bob"]
            settled = await call(
                "carol",
                "POST",
                f"/feedback/v1/review/items/{conflict}/submit",
                {"scores": {"correct": "down", "helpful": "2", "tone": "friendly"}, "correction": "Two years."},
            )
            assert settled.json()["stage"] == "done", settled.text
            item = (await call("carol", "POST", "/feedback/v1/review/queues/support-review/claim")).json()
            assert item["item_id"] == last["item_id"]
            final = await call(
                "carol",
                "POST",
                f"/feedback/v1/review/items/{item['item_id']}/submit",
                {"scores": {"correct": "up", "helpful": "3", "tone": "curt"}},
            )
            assert final.json()["stage"] == "done", final.text

            view = (await call("watcher", "GET", "/feedback/v1/review/queues/support-review")).json()
            assert view["counts"] == {"open": 0, "claimed": 0, "adjudication": 0, "done": 5, "gone": 0, "skips": 1}
            correct = next(row for row in view["agreement"] if row["dimension"] == "correct")
            # A fifth unit, bob and carol both up: 1 - 9 * 2 / (2 * 7 * 3) = 4/7; three reviewers, no kappa;
            # without carol it is alice and bob's 8/15 again; without alice or bob no unit has two values left that vary.
            assert correct["alpha"] == pytest.approx(float(Fraction(4, 7)))
            assert correct["kappa"] is None
            assert correct["alpha_without"] == {
                "alice": None,
                "bob": None,
                "carol": pytest.approx(float(Fraction(8, 15))),
            }

        def stored() -> list[dict]:
            return clickhouse.query(
                "SELECT actor, source, queue, item_id, rubric, scores, thumbs, rating, tags, correction "
                "FROM feedback FINAL WHERE queue = 'support-review' ORDER BY actor"
            )

        await eventually(lambda: len(stored()) == 11, what="the eleven reviews stored as feedback")
        rows = stored()
        assert {row["actor"] for row in rows} == {"alice", "bob", "carol"}
        assert {row["source"] for row in rows} == {"reviewer"}
        assert {row["rubric"] for row in rows} == {"answer-quality:v1"}
        adjudicated = [row for row in rows if "adjudication" in row["tags"]]
        assert len(adjudicated) == 1 and adjudicated[0]["correction"] == "Two years."
        assert dict(adjudicated[0]["scores"]) == {"correct": "down", "helpful": "2", "tone": "friendly"}
        # The first thumbs and rating dimensions are feedback's own thumbs and rating, which the monitor reads.
        assert (adjudicated[0]["thumbs"], adjudicated[0]["rating"]) == ("down", 2)


async def test_thumbs_down_and_low_groundedness_rules_take_only_what_they_name(
    settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget
) -> None:
    app, runtime, clickhouse = await review_service(settings, chdb_target)
    ops = api_key(settings, Role.operator, "ops")
    async with app.router.lifespan_context(app):
        bus = runtime.bus("test")
        for i, (question, answer) in enumerate(CALLS):
            route = "canary" if i % 2 else "production"
            await bus.publish(
                InferenceLogged(
                    inference_id=f"call-{i}", model_name=MODEL, route=route, input_text=question, output_text=answer
                )
            )
        # An end user's thumbs down on calls 4 and 5, and a reviewer's on call 6 (a reviewer's judgement is
        # already a review: it does not send the call to the queue).
        for inference_id in ("call-4", "call-5"):
            await bus.publish(FeedbackReceived(inference_id=inference_id, thumbs=Thumbs.down))
        await bus.publish(FeedbackReviewed(inference_id="call-6", thumbs=Thumbs.down, actor="alice"))
        await eventually(
            lambda: (
                clickhouse.query("SELECT count() AS n FROM feedback")[0]["n"] == 3
                and clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] == len(CALLS)
            ),
            what="the sink storing calls and feedback",
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://feedback",
            headers={"Authorization": f"Bearer {ops}"},
        ) as client:

            async def filled(name: str, rule: dict) -> dict:
                body = {"name": name, "rule": {"model_name": MODEL, **rule}, "rubric": "answer-quality"}
                assert (await client.post("/feedback/v1/review/queues", json=body)).status_code == 201
                return (await client.post(f"/feedback/v1/review/queues/{name}/fill")).json()

            downs = await filled("thumbs-down", {"select": "thumbs_down", "order": "newest"})
            assert (downs["considered"], downs["added"]) == (2, 2), downs
            canary_downs = await filled("canary-downs", {"select": "thumbs_down", "route": "canary"})
            assert (canary_downs["considered"], canary_downs["added"]) == (1, 1), canary_downs  # call-5
            # The off-topic answers ("Bananas are yellow.", "I like turtles.") are the ungrounded ones.
            ungrounded = await filled("ungrounded", {"select": "low_groundedness", "floor": 0.3})
            assert ungrounded["added"] >= 1, ungrounded
            reviewer = {"Authorization": f"Bearer {api_key(settings, Role.reviewer, 'alice')}"}
            seen = []
            while (
                claimed := await client.post("/feedback/v1/review/queues/ungrounded/claim", headers=reviewer)
            ).status_code == 200:
                item = claimed.json()
                seen.append(item["inference_id"])
                assert item["groundedness"] < 0.3, item
                skipped = await client.post(
                    f"/feedback/v1/review/items/{item['item_id']}/skip",
                    json={"reason": "checking the rule"},
                    headers=reviewer,
                )
                assert skipped.status_code == 204, skipped.text
            assert claimed.status_code == 204, claimed.text
            assert set(seen) <= {"call-2", "call-4"} and seen, seen

            # A queued call that is no longer stored (a TTL or a deletion) is retired at the next claim, and the
            # item after it is handed out instead of an error: thumbs-down offers the newest first, call-5.
            clickhouse.command(
                "ALTER TABLE inference_log DELETE WHERE inference_id = 'call-5' SETTINGS mutations_sync = 2"
            )
            claimed = await client.post("/feedback/v1/review/queues/thumbs-down/claim", headers=reviewer)
            assert claimed.status_code == 200 and claimed.json()["inference_id"] == "call-4", claimed.text
            counts = (await client.get("/feedback/v1/review/queues/thumbs-down")).json()["counts"]
            assert (counts["gone"], counts["claimed"], counts["open"]) == (1, 1, 1), counts


async def test_a_least_confident_queue_offers_the_answers_the_model_was_least_sure_of_first(
    settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget
) -> None:
    """Ordered by the mean token log-probability serving logs with each call: one answer per prompt (the
    least sure of a prompt's answers), the least sure first, answers logged without one last."""
    app, runtime, clickhouse = await review_service(settings, chdb_target)
    ops = api_key(settings, Role.operator, "ops")
    reviewer = {"Authorization": f"Bearer {api_key(settings, Role.reviewer, 'alice')}"}
    # (prompt, answer, mean token log-probability, exact in ClickHouse's Float32); the newest call last.
    calls = [
        ("Do you ship to Canada?", "Yes, in five to seven days.", -0.25),
        ("What does the blue light mean?", "Pairing, probably.", -1.75),
        ("Do you ship to Canada?", "We might, sometimes.", -2.5),  # the same prompt, less sure: kept instead
        ("How do I reset the hub?", "Hold the button for ten seconds.", None),  # logged before confidence was
        ("Is there a warranty?", "Two years.", -0.875),
    ]
    async with app.router.lifespan_context(app):
        await store_calls(
            runtime,
            clickhouse,
            [
                {
                    "input_text": question,
                    "output_text": answer,
                    "mean_token_logprob": confidence,
                    "min_token_logprob": None if confidence is None else confidence * 2,
                }
                for question, answer, confidence in calls
            ],
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://feedback",
            headers={"Authorization": f"Bearer {ops}"},
        ) as client:
            body = {
                "name": "least-sure",
                "rule": {"model_name": MODEL, "select": "traffic", "order": "least_confident"},
                "rubric": "answer-quality",
                "reviewers_per_item": 1,
            }
            assert (await client.post("/feedback/v1/review/queues", json=body)).status_code == 201
            filled = (await client.post("/feedback/v1/review/queues/least-sure/fill")).json()
            assert (filled["considered"], filled["added"], filled["duplicate_prompts"]) == (5, 4, 1), filled
            offered = []
            while (
                claimed := await client.post("/feedback/v1/review/queues/least-sure/claim", headers=reviewer)
            ).status_code == 200:
                item = claimed.json()
                offered.append((item["inference_id"], item["mean_token_logprob"]))
                skipped = await client.post(
                    f"/feedback/v1/review/items/{item['item_id']}/skip", json={"reason": "order"}, headers=reviewer
                )
                assert skipped.status_code == 204, skipped.text
            assert claimed.status_code == 204, claimed.text
    assert offered == [("call-2", -2.5), ("call-1", -1.75), ("call-4", -0.875), ("call-3", None)]


async def test_the_cli_defines_fills_and_works_a_queue_through_the_running_door(
    settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget, tmp_path: Path
) -> None:
    app, runtime, clickhouse = await review_service(settings, chdb_target)
    queue = tmp_path / "queue.yaml"
    queue.write_text(
        f"name: cli-review\nrule: {{select: traffic, model_name: {MODEL}, order: newest}}\nrubric: answer-quality\n"
    )

    async def flywheel(port: int, key: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "FLYWHEEL_HTTP_HOST": "127.0.0.1",
            "FLYWHEEL_HTTP_PORT": str(port),
            "FLYWHEEL_API_KEY": key,
        }
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "services.cli.main", "feedback", "review", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ops, alice = api_key(settings, Role.operator, "ops"), api_key(settings, Role.reviewer, "alice")
    port = free_port()
    async with served(app, port=port):
        bus = runtime.bus("test")
        await bus.publish(
            InferenceLogged(inference_id="call-0", model_name=MODEL, input_text=CALLS[0][0], output_text=CALLS[0][1])
        )
        await eventually(
            lambda: clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] == 1, what="the call stored"
        )
        defined = await flywheel(port, ops, "define", str(queue))
        assert defined.returncode == 0 and "cli-review v1 on rubric answer-quality:v1" in defined.stdout, defined
        filled = await flywheel(port, ops, "fill", "cli-review")
        assert "1 added of 1 matched" in filled.stdout, filled
        refused = await flywheel(port, ops, "next", "cli-review")
        assert refused.returncode == 1 and "answered 403" in refused.stderr + refused.stdout, refused
        claimed = await flywheel(port, alice, "next", "cli-review")
        item = json.loads(claimed.stdout)
        assert item["inference_id"] == "call-0", claimed
        submitted = await flywheel(
            port,
            alice,
            "submit",
            item["item_id"],
            "--score",
            "correct=up",
            "--score",
            "helpful=5",
            "--score",
            "tone=friendly",
        )
        assert submitted.returncode == 0 and submitted.stdout.strip().endswith("done"), submitted
        empty = await flywheel(port, alice, "next", "cli-review")
        assert "nothing is left in this queue for you" in empty.stdout, empty
    gone = await flywheel(port, alice, "list")
    assert gone.returncode == 1 and "cannot reach the feedback" in gone.stderr + gone.stdout, gone


async def test_the_judge_disagreement_rule_takes_the_answers_a_judge_and_an_end_user_judged_oppositely(
    settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget
) -> None:
    app, runtime, clickhouse = await review_service(settings, chdb_target)
    ops, app_key = api_key(settings, Role.operator, "ops"), api_key(settings, Role.app, "support-app")
    judge, user = FeedbackSource.judge, FeedbackSource.end_user
    up, down = Thumbs.up, Thumbs.down

    def verdict(inference_id: str, source: FeedbackSource, minutes_ago: int = 5, **given) -> Envelope:
        """Feedback as given `minutes_ago`: an actor's latest verdict is the one given last."""
        envelope = wrap(FeedbackReceived(inference_id=inference_id, source=source, **given), producer="test")
        return envelope.model_copy(update={"occurred_at": datetime.now(UTC) - timedelta(minutes=minutes_ago)})

    # Each call's feedback, published on the bus; the first call's judge gives its verdict through the door below.
    feedback = {
        "user-down-judge-up": [verdict("user-down-judge-up", user, thumbs=down)],
        "user-rates-5-judge-rates-1": [
            verdict("user-rates-5-judge-rates-1", user, rating=5, actor="u-1"),
            verdict("user-rates-5-judge-rates-1", judge, rating=1, actor="judge:qwen"),
        ],
        "both-down": [
            verdict("both-down", user, thumbs=down),
            verdict("both-down", judge, thumbs=down, actor="judge:qwen"),
        ],
        "only-user-down": [verdict("only-user-down", user, thumbs=down)],
        # A 3 is neither positive nor negative, whoever gives it.
        "user-rates-3": [
            verdict("user-rates-3", user, rating=3),
            verdict("user-rates-3", judge, thumbs=up, actor="judge:qwen"),
        ],
        "judge-rates-3": [
            verdict("judge-rates-3", user, thumbs=down),
            verdict("judge-rates-3", judge, rating=3, actor="judge:qwen"),
        ],
        # The judge's latest verdict is down, as the user's is.
        "judge-changed-mind": [
            verdict("judge-changed-mind", user, thumbs=down),
            verdict("judge-changed-mind", judge, minutes_ago=3, thumbs=up, actor="judge:qwen"),
            verdict("judge-changed-mind", judge, minutes_ago=2, thumbs=down, actor="judge:qwen"),
        ],
        # A later comment is no verdict: the judge's thumbs up still stands against the user's down.
        "judge-then-comment": [
            verdict("judge-then-comment", user, thumbs=down),
            verdict("judge-then-comment", judge, minutes_ago=3, thumbs=up, actor="judge:qwen"),
            verdict("judge-then-comment", judge, minutes_ago=2, comment="Checked again.", actor="judge:qwen"),
        ],
        # u-7's latest verdict is up, as the judge's is.
        "user-changed-mind": [
            verdict("user-changed-mind", user, minutes_ago=3, thumbs=down, actor="u-7"),
            verdict("user-changed-mind", user, minutes_ago=2, thumbs=up, actor="u-7"),
            verdict("user-changed-mind", judge, thumbs=up, actor="judge:qwen"),
        ],
        # Thumbs is the verdict; the rating beside it does not make the user's feedback negative.
        "user-up-rates-1": [
            verdict("user-up-rates-1", user, thumbs=up, rating=1),
            verdict("user-up-rates-1", judge, thumbs=up, actor="judge:qwen"),
        ],
        # A reviewer is not an end user: their thumbs down is already a review.
        "reviewer-down-judge-up": [verdict("reviewer-down-judge-up", judge, thumbs=up, actor="judge:qwen")],
    }
    async with app.router.lifespan_context(app):
        bus = runtime.bus("test")
        for i, inference_id in enumerate(feedback):
            await bus.publish(
                InferenceLogged(
                    inference_id=inference_id,
                    model_name=MODEL,
                    input_text=f"Question {i}: is the hub waterproof?",
                    output_text="It is splash-proof, not waterproof.",
                )
            )
        for envelopes in feedback.values():
            for envelope in envelopes:
                await bus.publish_envelope(envelope)
        await bus.publish(FeedbackReviewed(inference_id="reviewer-down-judge-up", thumbs=down, actor="alice"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:
            # A judge's verdict on an inference comes in through the feedback door like an end user's, with an app's key.
            judged = await client.post(
                "/feedback/v1/feedback",
                json={"inference_id": "user-down-judge-up", "thumbs": "up", "source": "judge", "actor": "judge:qwen"},
                headers={"Authorization": f"Bearer {app_key}"},
            )
            assert judged.status_code == 202, judged.text
            # And the reviewer's thumbs down, and the judge's verdict given through the door.
            pieces = 2 + sum(len(envelopes) for envelopes in feedback.values())
            await eventually(
                lambda: (
                    clickhouse.query("SELECT count() AS n FROM feedback")[0]["n"] == pieces
                    and clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] == len(feedback)
                ),
                what="the sink storing calls and feedback",
            )

            client.headers["Authorization"] = f"Bearer {ops}"
            queue = {
                "name": "judge-vs-users",
                "rule": {"select": "judge_disagreement", "model_name": MODEL, "order": "newest"},
                "rubric": "answer-quality",
            }
            assert (await client.post("/feedback/v1/review/queues", json=queue)).status_code == 201
            filled = (await client.post("/feedback/v1/review/queues/judge-vs-users/fill")).json()
            assert (filled["considered"], filled["added"]) == (3, 3), filled
            shown = (await client.get("/feedback/v1/review/queues/judge-vs-users")).json()
            assert shown["rule"]["select"] == "judge_disagreement", shown

            reviewer = {"Authorization": f"Bearer {api_key(settings, Role.reviewer, 'alice')}"}
            queued = set()
            while (
                claimed := await client.post("/feedback/v1/review/queues/judge-vs-users/claim", headers=reviewer)
            ).status_code == 200:
                item = claimed.json()
                queued.add(item["inference_id"])
                skipped = await client.post(
                    f"/feedback/v1/review/items/{item['item_id']}/skip",
                    json={"reason": "reading the rule"},
                    headers=reviewer,
                )
                assert skipped.status_code == 204, skipped.text
            assert claimed.status_code == 204, claimed.text
            assert queued == {"user-down-judge-up", "user-rates-5-judge-rates-1", "judge-then-comment"}
