"""Review queues over whole traces and sessions, on real components: spans, calls and feedback land through
Kafka and the feedback service's own sink in embedded ClickHouse; queues are defined and worked through its
door. A thumbs-down trace queue takes exactly the traces with negative feedback on the trace, a span or an
inference of it (not a reviewer's, not a neutral rating, not one outside the window); two reviewers score
its items, agreement matches the hand-computed values, a conflict is adjudicated, and each review lands as
feedback on the trace. An errored session queue takes the session with a failed span, and its review lands
on the session. An inference item whose call was traced shows its trace. Rules and reviews that make no
sense for a trace are refused with a 422 naming the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import pytest

from contracts.events import (
    FeedbackReceived,
    FeedbackReviewed,
    InferenceLogged,
    SpanKind,
    SpanLogged,
    SpanStatus,
    Thumbs,
)
from contracts.http import Role
from services.feedback.cli import item_lines
from services.runtime.settings import FlywheelSettings
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.test_review_queues import MODEL, review_service
from tests.support import api_key, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Traces, by what should happen to them in a thumbs-down trace queue.
DOWN_ON_TRACE, ERRORED, DOWN_ON_INFERENCE, LOW_ON_SPAN = (f"{n:x}" * 32 for n in (10, 11, 12, 13))
LIKED, REVIEWER_DOWN, NEUTRAL, OLD = (f"{n:x}" * 32 for n in (1, 2, 3, 4))
SESSION, CALM_SESSION = "conv-traced", "conv-calm"
TRACED_CALL = "chatcmpl-traced"
QUEUED = [LOW_ON_SPAN, DOWN_ON_INFERENCE, DOWN_ON_TRACE]  # newest first
# alice's and bob's `correct` on QUEUED: Cohen's kappa (2/3 - 4/9) / (1 - 4/9) = 2/5; Krippendorff's alpha
# (nominal, 3 up and 3 down in 3 units, one split) 1 - (2/6) / (18/30) = 4/9.
ALICE = ["up", "down", "up"]
BOB = ["up", "down", "down"]


def trace(trace_id: str, begun: datetime, *, session: str | None = None, error: bool = False) -> list[SpanLogged]:
    """A turn of a RAG app: its root, a retrieval (failed when `error`) and the LLM call under the root."""
    common: dict[str, Any] = {"trace_id": trace_id, "session_id": session, "service_name": "support-app"}
    root, retrieve, llm = (trace_id[:15] + digit for digit in "123")
    return [
        SpanLogged(
            span_id=root,
            name="answer question",
            kind=SpanKind.chain,
            started_at=begun,
            ended_at=begun + timedelta(milliseconds=900),
            input_text=f"question of {trace_id[:4]}",
            output_text=f"answer of {trace_id[:4]}",
            status=SpanStatus.ok,
            **common,
        ),
        SpanLogged(
            span_id=retrieve,
            parent_span_id=root,
            name="retrieve manuals",
            kind=SpanKind.retrieval,
            started_at=begun + timedelta(milliseconds=10),
            ended_at=begun + timedelta(milliseconds=200),
            input_text="warranty",
            output_text="" if error else "manual page 3",
            status=SpanStatus.error if error else SpanStatus.ok,
            error="index unavailable" if error else None,
            **common,
        ),
        SpanLogged(
            span_id=llm,
            parent_span_id=root,
            name=f"chat {MODEL}",
            kind=SpanKind.llm,
            started_at=begun + timedelta(milliseconds=250),
            ended_at=begun + timedelta(milliseconds=850),
            model_name=MODEL,
            inference_id=TRACED_CALL if trace_id == DOWN_ON_INFERENCE else None,
            input_text="prompt with manual page 3",
            output_text=f"answer of {trace_id[:4]}",
            status=SpanStatus.ok,
            **common,
        ),
    ]


async def test_trace_and_session_queues_fill_with_what_their_rules_name_and_reviews_land_on_them(
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
    now = datetime.now(UTC).replace(microsecond=0)
    minutes = {
        DOWN_ON_TRACE: 50,
        ERRORED: 45,
        DOWN_ON_INFERENCE: 40,
        LOW_ON_SPAN: 35,
        LIKED: 30,
        REVIEWER_DOWN: 25,
        NEUTRAL: 20,
        OLD: 60 * 48,
    }
    spans = [
        span
        for trace_id, ago in minutes.items()
        for span in trace(
            trace_id,
            now - timedelta(minutes=ago),
            session=SESSION if trace_id in (DOWN_ON_TRACE, ERRORED) else CALM_SESSION if trace_id == LIKED else None,
            error=trace_id == ERRORED,
        )
    ]
    feedback = [
        FeedbackReceived(trace_id=DOWN_ON_TRACE, thumbs=Thumbs.down),
        FeedbackReceived(inference_id=TRACED_CALL, thumbs=Thumbs.down),
        FeedbackReceived(trace_id=LOW_ON_SPAN, span_id=LOW_ON_SPAN[:15] + "2", rating=2),
        FeedbackReceived(trace_id=LIKED, thumbs=Thumbs.up),
        FeedbackReceived(session_id=CALM_SESSION, rating=5),
        # A reviewer's verdict is already a review; a 3 is the middle of the scale; OLD is out of the window.
        FeedbackReviewed(trace_id=REVIEWER_DOWN, thumbs=Thumbs.down, actor="carol"),
        FeedbackReceived(trace_id=NEUTRAL, rating=3),
        FeedbackReceived(trace_id=OLD, thumbs=Thumbs.down),
    ]
    async with app.router.lifespan_context(app):
        bus = runtime.bus("test")
        for span in spans:
            await bus.publish(span)
        await bus.publish(
            InferenceLogged(
                inference_id=TRACED_CALL,
                model_name=MODEL,
                input_text="How long is the warranty?",
                output_text="Two years.",
                trace_id=DOWN_ON_INFERENCE,
                span_id=DOWN_ON_INFERENCE[:15] + "3",
            )
        )
        for event in feedback:
            await bus.publish(event)

        def count(table: str) -> int:
            return int(clickhouse.query(f"SELECT count() AS n FROM {table}")[0]["n"])

        await eventually(
            lambda: (count("span"), count("inference_log"), count("feedback")) == (len(spans), 1, len(feedback)),
            what="the sink storing the spans, the call and the feedback",
        )

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:

            async def call(key: str, method: str, path: str, body: dict | None = None) -> httpx.Response:
                return await client.request(method, path, json=body, headers={"Authorization": f"Bearer {keys[key]}"})

            def queue(name: str, **rule: Any) -> dict[str, Any]:
                return {"name": name, "rule": rule, "rubric": "answer-quality", "reviewers_per_item": 2}

            # What makes no sense for a whole trace or session, and what an inference rule cannot do without.
            for body, param in (
                (queue("bad", target="trace", select="pairs"), "rule.select"),
                (queue("bad", target="trace", select="low_groundedness"), "rule.select"),
                (queue("bad", target="session", select="judge_disagreement"), "rule.select"),
                (queue("bad", target="session", select="traffic", route="canary"), "rule.route"),
                (queue("bad", select="errored", model_name=MODEL), "rule.select"),
                (queue("bad", select="traffic"), "rule.model_name"),
            ):
                refused = await call("ops", "POST", "/feedback/v1/review/queues", body)
                assert refused.status_code == 422, refused.text
                assert refused.json()["error"]["param"] == param, refused.text
                assert refused.json()["error"]["message"].startswith(param + ":"), refused.text

            # A thumbs-down trace queue: exactly the traces with negative feedback, newest first, each once.
            defined = await call(
                "ops", "POST", "/feedback/v1/review/queues", queue("bad-traces", target="trace", select="thumbs_down")
            )
            assert defined.status_code == 201, defined.text
            assert defined.json()["rule"]["target"] == "trace"
            filled = (await call("ops", "POST", "/feedback/v1/review/queues/bad-traces/fill")).json()
            assert (filled["considered"], filled["added"]) == (3, 3), filled
            again = (await call("ops", "POST", "/feedback/v1/review/queues/bad-traces/fill")).json()
            assert (again["added"], again["already_queued"]) == (0, 3), again

            for outsider in ("support-app", "watcher", "ops"):
                denied = await call(outsider, "POST", "/feedback/v1/review/queues/bad-traces/claim")
                assert denied.status_code == 403, (outsider, denied.text)

            stages: dict[str, str] = {}
            for reviewer, verdicts in (("alice", ALICE), ("bob", BOB)):
                claimed = []
                for verdict in verdicts:
                    item = (await call(reviewer, "POST", "/feedback/v1/review/queues/bad-traces/claim")).json()
                    assert item["target"] == "trace" and item["inference_id"] is None, item
                    claimed.append(item["trace_id"])
                    assert [(span["name"], span["depth"]) for span in item["spans"]] == [
                        ("answer question", 0),
                        ("retrieve manuals", 1),
                        (f"chat {MODEL}", 1),
                    ]
                    assert item["messages"] == [{"role": "user", "content": f"question of {item['trace_id'][:4]}"}]
                    assert item["answer"] == f"answer of {item['trace_id'][:4]}"
                    assert item["model_name"] == MODEL
                    if reviewer == "alice" and not stages:
                        corrected = await call(
                            "alice",
                            "POST",
                            f"/feedback/v1/review/items/{item['item_id']}/submit",
                            {"scores": {"correct": "up", "helpful": "4", "tone": "friendly"}, "correction": "No."},
                        )
                        assert corrected.status_code == 422, corrected.text
                        assert corrected.json()["error"]["param"] == "correction", corrected.text
                    done = await call(
                        reviewer,
                        "POST",
                        f"/feedback/v1/review/items/{item['item_id']}/submit",
                        {"scores": {"correct": verdict, "helpful": "4", "tone": "friendly"}, "comment": "read it"},
                    )
                    assert done.status_code == 200, done.text
                    stages[item["trace_id"]] = done.json()["stage"]
                assert claimed == QUEUED, f"{reviewer}: newest first"
                nothing = await call(reviewer, "POST", "/feedback/v1/review/queues/bad-traces/claim")
                assert nothing.status_code == 204, nothing.text
            assert stages == {LOW_ON_SPAN: "done", DOWN_ON_INFERENCE: "done", DOWN_ON_TRACE: "adjudication"}

            view = (await call("watcher", "GET", "/feedback/v1/review/queues/bad-traces")).json()
            correct = next(row for row in view["agreement"] if row["dimension"] == "correct")
            assert correct["items"] == 3
            assert correct["alpha"] == pytest.approx(float(Fraction(4, 9)))
            assert correct["kappa"] == pytest.approx(0.4)

            # carol settles the conflict, seeing both reviews and the trace.
            item = (await call("carol", "POST", "/feedback/v1/review/queues/bad-traces/claim")).json()
            assert (item["trace_id"], item["stage"]) == (DOWN_ON_TRACE, "adjudication")
            assert sorted(review["reviewer"] for review in item["reviews"]) == ["alice", "bob"]
            assert item["spans"][0]["name"] == "answer question"
            settled = await call(
                "carol",
                "POST",
                f"/feedback/v1/review/items/{item['item_id']}/submit",
                {"scores": {"correct": "down", "helpful": "2", "tone": "curt"}},
            )
            assert settled.json()["stage"] == "done", settled.text
            view = (await call("watcher", "GET", "/feedback/v1/review/queues/bad-traces")).json()
            assert view["counts"] == {"open": 0, "claimed": 0, "adjudication": 0, "done": 3, "gone": 0, "skips": 0}

            # An errored trace queue takes the trace with a failed span, and nothing else.
            await call(
                "ops", "POST", "/feedback/v1/review/queues", queue("failed-traces", target="trace", select="errored")
            )
            filled = (await call("ops", "POST", "/feedback/v1/review/queues/failed-traces/fill")).json()
            assert (filled["considered"], filled["added"]) == (1, 1), filled
            item = (await call("alice", "POST", "/feedback/v1/review/queues/failed-traces/claim")).json()
            assert item["trace_id"] == ERRORED and item["session_id"] == SESSION
            failed = next(span for span in item["spans"] if span["name"] == "retrieve manuals")
            assert (failed["status"], failed["error"]) == ("error", "index unavailable")
            # `flywheel feedback review next --text` prints the claim's tree, the children under the root.
            lines = item_lines(item)
            assert lines[0].endswith(f"trace {ERRORED}")
            tree = lines[lines.index("trace:") + 1 : lines.index("trace:") + 4]
            assert [line.split(" ms")[0] for line in tree] == [
                "  answer question  chain  900.0",
                "    retrieve manuals  retrieval  190.0",
                f"    chat {MODEL}  llm  600.0",
            ], tree
            assert tree[1].endswith("[error: index unavailable]")

            # An errored session queue: the session whose second turn failed, its turns in order.
            await call(
                "ops",
                "POST",
                "/feedback/v1/review/queues",
                {**queue("failed-sessions", target="session", select="errored"), "reviewers_per_item": 1},
            )
            filled = (await call("ops", "POST", "/feedback/v1/review/queues/failed-sessions/fill")).json()
            assert (filled["considered"], filled["added"]) == (1, 1), filled
            item = (await call("bob", "POST", "/feedback/v1/review/queues/failed-sessions/claim")).json()
            assert (item["target"], item["session_id"]) == ("session", SESSION)
            assert [(turn["trace_id"], turn["status"]) for turn in item["turns"]] == [
                (DOWN_ON_TRACE, "ok"),
                (ERRORED, "error"),
            ]
            assert item["answer"] == f"answer of {ERRORED[:4]}"
            assert [line for line in item_lines(item) if line.startswith("turn ")] == [
                f"turn 1  answer question  trace {DOWN_ON_TRACE}",
                f"turn 2  answer question  trace {ERRORED}  [error]",
            ]
            reviewed = await call(
                "bob",
                "POST",
                f"/feedback/v1/review/items/{item['item_id']}/submit",
                {"scores": {"correct": "down", "helpful": "1", "tone": "curt"}},
            )
            assert reviewed.json()["stage"] == "done", reviewed.text

            # A traffic session queue takes both sessions.
            await call(
                "ops", "POST", "/feedback/v1/review/queues", queue("all-sessions", target="session", select="traffic")
            )
            filled = (await call("ops", "POST", "/feedback/v1/review/queues/all-sessions/fill")).json()
            assert (filled["considered"], filled["added"]) == (2, 2), filled

            # An inference item whose call was traced carries its trace.
            await call(
                "ops",
                "POST",
                "/feedback/v1/review/queues",
                queue("answers", select="traffic", model_name=MODEL, order="newest"),
            )
            item = (await call("carol", "POST", "/feedback/v1/review/queues/answers/claim")).json()
            assert (item["target"], item["inference_id"], item["trace_id"]) == (
                "inference",
                TRACED_CALL,
                DOWN_ON_INFERENCE,
            )
            assert [span["name"] for span in item["spans"]] == ["answer question", "retrieve manuals", f"chat {MODEL}"]

        def reviews() -> list[dict[str, Any]]:
            return clickhouse.query(
                "SELECT queue, actor, source, inference_id, trace_id, span_id, session_id, rubric, comment "
                "FROM feedback FINAL WHERE queue IN ('bad-traces', 'failed-sessions') ORDER BY queue, actor, trace_id"
            )

        await eventually(lambda: len(reviews()) == 8, what="the eight reviews stored as feedback")
        rows = reviews()
        on_traces = [row for row in rows if row["queue"] == "bad-traces"]
        assert {(row["actor"], row["trace_id"]) for row in on_traces} == {
            *((reviewer, trace_id) for reviewer in ("alice", "bob") for trace_id in QUEUED),
            ("carol", DOWN_ON_TRACE),
        }
        assert {(row["inference_id"], row["span_id"], row["session_id"]) for row in on_traces} == {("", None, None)}
        assert {(row["source"], row["rubric"]) for row in rows} == {("reviewer", "answer-quality:v1")}
        (on_session,) = [row for row in rows if row["queue"] == "failed-sessions"]
        assert (on_session["actor"], on_session["session_id"], on_session["trace_id"]) == ("bob", SESSION, None)
