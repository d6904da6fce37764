"""`flywheel ops judge` as a user runs it, on real components: a three-turn session of a RAG app's traces
(retrieval, tool and LLM spans under a chain) published on real Kafka and stored by the feedback service's
real sink in chDB; the feedback and monitor services in one process as `flywheel up` runs them (the command
reads spans through the monitor's query door and publishes through the feedback door, finding both where
the process recorded itself, with the caller's FLYWHEEL_API_KEY); and Flywheel's own gateway serving the
real SmolLM2-135M on Triton as the judge (test_evaluator_judge.judge_gateway). The command runs as a
subprocess, as a user runs it.

What the judge saw is read back from Kafka: the gateway's `inference.logged` for each judgement holds the
prompt it was given, and that must be the whole trace in tree order."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from infra.processes import free_port
from contracts.events import SpanKind, SpanLogged
from contracts.http import Role
from contracts.topics import topic_for
from services.feedback.app import create_app as feedback_app
from services.feedback.settings import FeedbackSettings
from services.monitor.app import create_app as monitor_app
from services.monitor.settings import MonitorSettings
from services.runtime.privacy import PrivacySettings
from services.runtime.running import forget, record
from services.runtime.service import Runtime, build_process
from services.runtime.settings import FlywheelSettings
from tests.conftest import REPO
from tests.fixtures.trainer_model import base_model_dir  # noqa: F401 - fixture
from tests.integration.test_evaluator_judge import JUDGE, judge_gateway
from tests.integration.test_event_bus import read_all
from tests.support import api_key, eventually, served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
SESSION = "support-chat-judge"
TURNS = (
    # trace id, question, retrieved passage, tool call, tool result, answer
    (
        "1f3a9c2e4b5d6e7f8091a2b3c4d5e6f7",
        "Is my X200 still under warranty?",
        "Passage K-17: the X200 carries a two-year warranty from delivery.",
        'check_purchase {"serial": "X200-5531"}',
        '{"delivered": "2026-02-01"}',
        "Yes: your X200 was delivered in February 2026, so its two-year warranty runs until February 2028.",
    ),
    (
        "2e4b6d8f0a1c3e5f7a9b1c3d5e7f9a1b",
        "Where is order 1182?",
        "Passage L-04: orders leave the Leeds depot within two days.",
        'track_parcel {"order": 1182}',
        '{"status": "out for delivery"}',
        "Order 1182 left the Leeds depot and is out for delivery today.",
    ),
    (
        "3c5e7a9b1d3f5a7c9e1b3d5f7a9c1e3b",
        "Can I return it instead?",
        "Passage R-09: returns are free within 30 days of delivery.",
        'open_return {"order": 1182}',
        '{"return_id": "RMA-77"}',
        "Yes, returns are free for 30 days; return RMA-77 is open for order 1182.",
    ),
)


def turn_spans(turn: int, start: datetime) -> list[SpanLogged]:
    """One turn as the app traced it: a chain holding a retrieval, a model call that picks a tool, the tool
    call, and the model call that answers."""
    trace_id, question, passage, tool_call, tool_result, answer = TURNS[turn]
    root = f"{turn + 1:x}000000000000001"

    def span(n: int, parent: str | None, name: str, kind: SpanKind, at_ms: int, **fields: Any) -> SpanLogged:
        return SpanLogged(
            trace_id=trace_id,
            span_id=f"{turn + 1:x}00000000000000{n}",
            parent_span_id=parent,
            name=name,
            kind=kind,
            started_at=start + timedelta(milliseconds=at_ms),
            ended_at=start + timedelta(milliseconds=at_ms + 200),
            session_id=SESSION,
            service_name="rag-app",
            **fields,
        )

    conversation = json.dumps([{"role": "system", "content": passage}, {"role": "user", "content": question}])
    return [
        span(1, None, "answer", SpanKind.chain, 0, input_text=question, output_text=answer),
        span(2, root, "retrieve", SpanKind.retrieval, 10, input_text=question, output_text=passage),
        span(3, root, "plan", SpanKind.llm, 300, input_text=conversation, output_text=tool_call),
        span(4, root, tool_call.split()[0], SpanKind.tool, 600, input_text=tool_call, output_text=tool_result),
        span(5, root, "compose", SpanKind.llm, 900, input_text=conversation, output_text=answer),
    ]


def cli_env(home: Path, key: str) -> dict[str, str]:
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")},
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_HTTP_PORT": str(free_port()),  # nothing answers there: the doors are found in the record
        "FLYWHEEL_API_KEY": key,
        "PYTHONDONTWRITEBYTECODE": "1",
    }


async def ops_judge(env: dict[str, str], *arguments: str) -> tuple[int, str, str]:
    # The doors and the judge are served on this test's event loop: the command runs beside it, not blocking it.
    command = await asyncio.create_subprocess_exec(
        FLYWHEEL,
        "ops",
        "judge",
        *arguments,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(command.communicate(), timeout=300)
    assert command.returncode is not None
    return command.returncode, stdout.decode(), " ".join(stderr.decode().split())


async def stored(runtime: Runtime, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return await asyncio.to_thread(runtime.clickhouse().query, sql, parameters)


async def judge_prompts(settings: FlywheelSettings, expected: int) -> list[str]:
    """The prompts the judge was given, as the gateway logged them on Kafka."""
    topic = settings.topic_prefix + topic_for("inference.logged")
    records = await read_all(settings.resolved_kafka_bootstrap(), topic, expected, timeout_s=60)
    return [json.loads(record.value)["payload"]["input_text"] for record in records]


@pytest.mark.usefixtures("own_embedded_clickhouse")
async def test_a_judge_scores_a_whole_trace_and_a_whole_session_as_feedback_on_them(
    settings: FlywheelSettings,
    topics: str,
    base_model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # A reviewer's key reads spans through the query door (viewer) and sends feedback: what the command needs.
    caller = api_key(settings, Role.reviewer)
    process, runtime = build_process(
        settings,
        [
            functools.partial(
                feedback_app, settings=FeedbackSettings(batch_max_wait_ms=100), privacy=PrivacySettings()
            ),
            functools.partial(monitor_app, settings=MonitorSettings(tick_s=3600)),
        ],
        title="flywheel-feedback-monitor",
    )
    async with served(process) as url:
        recorded = record(settings.home, ["feedback", "monitor"], url)
        try:
            start = datetime.now(UTC) - timedelta(minutes=10)
            spans = [span for turn in range(3) for span in turn_spans(turn, start + timedelta(minutes=turn))]
            seed = runtime.bus("rag-app")
            for span in spans:
                await seed.publish(span)

            async def all_stored() -> bool:
                return (await stored(runtime, "SELECT count() AS n FROM span"))[0]["n"] >= len(spans)

            await eventually(all_stored, timeout_s=90, what=f"the sink storing {len(spans)} spans")
            env = cli_env(settings.home, caller)
            first, second, third = (turn[0] for turn in TURNS)

            # Bad ids are usage errors, before anything is read or asked.
            code, _, err = await ops_judge(
                env, "--trace-id", "not-a-trace", "--judge-url", "http://x", "--judge-model", "m"
            )
            assert code == 2 and "--trace-id" in err and "is not a trace id" in err, err
            code, _, err = await ops_judge(
                env, "--session-id", "two words", "--judge-url", "http://x", "--judge-model", "m"
            )
            assert code == 2 and "--session-id" in err and "is not a session id" in err, err

            # A judge that does not answer: reported, nothing published, exit 1.
            code, out, err = await ops_judge(
                env, "--trace-id", third, "--judge-url", f"http://127.0.0.1:{free_port()}/v1", "--judge-model", "m"
            )
            assert code == 1 and f"trace {third}: not judged: APIConnectionError" in err, (out, err)
            assert "1 of 1 not judged or not published" in err, err

            async with judge_gateway(base_model_dir, tmp_path, runtime) as (judge_url, judge_key):
                judge = ("--judge-url", judge_url, "--judge-model", JUDGE, "--judge-api-key", judge_key)

                code, out, err = await ops_judge(env, "--trace-id", second, *judge)
                assert code == 0, (out, err[-3000:])
                print(out)
                code, out, err = await ops_judge(env, "--session-id", SESSION, *judge)
                assert code == 0, (out, err[-3000:])
                print(out)
                code, out, err = await ops_judge(env, "--trace-id", first, "--dry-run", *judge)
                assert code == 0 and "dry run" in out, (out, err[-3000:])
                # Chosen by a filter instead of by id: the app's recent sessions.
                chosen = ("--level", "session", "--since", "1h", "--service", "rag-app", "--dry-run")
                code, out, err = await ops_judge(env, *chosen, *judge)
                assert code == 0 and SESSION in out and "dry run" in out, (out, err[-3000:])
                # Judged, but the feedback door does not answer: reported, exit 1.
                nowhere = f"http://127.0.0.1:{free_port()}"
                code, out, err = await ops_judge(env, "--trace-id", third, "--feedback-url", nowhere, *judge)
                assert code == 1 and f"trace {third}: not published: ConnectError" in err, (out, err[-3000:])

            prompts = await judge_prompts(settings, expected=5)
            assert len(prompts) == 5, prompts
            # The trace judgement: the judge saw the whole trace, its steps in tree order, the answer last.
            [on_trace] = [prompt for prompt in prompts if f"Trace:\nTrace {second}" in prompt]
            seen = on_trace[on_trace.index(f"Trace {second}") :]
            _, question, passage, tool_call, tool_result, answer = TURNS[1]
            order = [
                f"User question: {question}",
                "- answer [chain]",
                "  - retrieve [retrieval]",
                f"output: {passage}",
                "  - plan [llm]",
                "  - track_parcel [tool]",
                f"input: {tool_call}",
                f"output: {tool_result}",
                "  - compose [llm]",
                f"Final answer: {answer}",
            ]
            at = [seen.index(part) for part in order]
            assert at == sorted(at) and "[... " not in seen, seen  # whole: nothing cut
            # The session judgement: every turn, in time order, each with its question and answer.
            # By id and by filter, the same session reads the same.
            [on_session, again] = [
                prompt for prompt in prompts if f"Conversation:\nSession {SESSION}: 3 turns" in prompt
            ]
            assert on_session == again
            at = [on_session.rindex(f"User question: {turn[1]}") for turn in TURNS]
            at += [on_session.rindex(f"Final answer: {TURNS[-1][5]}")]
            assert at == sorted(at), on_session

            async def judged() -> list[dict[str, Any]]:
                return await stored(
                    runtime,
                    "SELECT trace_id, session_id, rating, comment, tags, source, actor FROM feedback FINAL "
                    "WHERE inference_id = '' ORDER BY occurred_at",
                )

            async def both_stored() -> bool:
                return len(await judged()) >= 2

            await eventually(both_stored, timeout_s=60, what="the judge's two scores stored as feedback")
            rows = await judged()
            by_target = {(row["trace_id"], row["session_id"]): row for row in rows}
            # Neither the dry run nor the judgements that failed stored anything.
            assert set(by_target) == {(second, None), (None, SESSION)}, rows
            on_trace_row, on_session_row = by_target[second, None], by_target[None, SESSION]
            for row, rubric in ((on_trace_row, "trace-quality@v1"), (on_session_row, "session-quality@v1")):
                assert row["source"] == "judge" and row["actor"] == f"judge:{JUDGE}" and row["tags"] == [rubric]
                assert 1 <= row["rating"] <= 5 and row["comment"].strip(), row

            # The views people read show the scores beside the trace and the session.
            summaries = await stored(
                runtime,
                "SELECT trace_id, feedback_count FROM trace_summary WHERE trace_id IN {ids:Array(String)} ORDER BY trace_id",
                {"ids": [first, second, third]},
            )
            assert {row["trace_id"]: row["feedback_count"] for row in summaries} == {first: 0, second: 1, third: 0}
            [session] = await stored(
                runtime,
                "SELECT session_feedback, session_mean_rating FROM session_summary WHERE session_id = {s:String}",
                {"s": SESSION},
            )
            assert session["session_feedback"] == 1 and session["session_mean_rating"] == on_session_row["rating"]
        finally:
            forget(recorded)
