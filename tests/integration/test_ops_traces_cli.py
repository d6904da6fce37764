"""`flywheel ops traces|sessions|trace` as a user runs them, with nothing serving: spans the sink stored
(migration 0008) read on the store opened read-only, through the query guard. Subprocesses, because
chDB lets one process own a data directory and the tests' own directory is taken."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.spans import RetrainingTrace
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
ANSWER = "4bf92f3577b34da6a3ce929d0e0e4736"
FAILED = "0af7651916cd43dd8448eb211c80319c"
NIGHTLY = "5b8efff798038103d269b633813fc60c"

# Two turns of conversation conv-9 ten and five minutes ago (the second with a failing tool), and a
# nightly job three days ago, stored by the sink as it stores span.logged; feedback on the first turn's
# LLM answer, on that turn, on its retrieval span, and on the conversation.
SEED = f"""
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from contracts.envelope import wrap
from contracts.events import FeedbackReceived, SpanLogged
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.runtime.clickhouse import open_clickhouse
from services.runtime.privacy import Redactor
from services.runtime.spans import RetrainingTrace

now = datetime.now(UTC)
def span(trace, span_id, parent, name, kind, start, start_ms, duration_ms, **fields):
    begin = start + timedelta(milliseconds=start_ms)
    return wrap(SpanLogged(trace_id=trace, span_id=span_id, parent_span_id=parent, name=name, kind=kind,
                           started_at=begin, ended_at=begin + timedelta(milliseconds=duration_ms), **fields), producer="seed")
app = dict(session_id="conv-9", service_name="rag-app")
first, second, nightly = now - timedelta(minutes=10), now - timedelta(minutes=5), now - timedelta(days=3)
retraining, retrained = RetrainingTrace("alert-cli-1"), now - timedelta(days=2)
def step(name, started_ms, duration_ms, step, service):
    begin = retrained + timedelta(milliseconds=started_ms)
    return wrap(retraining.span(step, name=name, kind="chain", service_name=service, started_at=begin,
                                ended_at=begin + timedelta(milliseconds=duration_ms)), producer="seed")
with open_clickhouse(None, Path(sys.argv[1])) as store:
    store.migrate()
    sink = Sink(FeedbackStore(lambda: store), Redactor())
    sink.store_spans([
        span("{ANSWER}", "a000000000000001", None, "answer", "chain", first, 0, 1200, status="ok", **app),
        span("{ANSWER}", "a000000000000002", "a000000000000001", "retrieve", "retrieval", first, 10, 50, **app),
        span("{ANSWER}", "a000000000000003", "a000000000000001", "chat smollm2", "llm", first, 100, 1000,
             prompt_tokens=120, completion_tokens=30, model_name="smollm2", inference_id="chatcmpl-a", **app),
        span("{ANSWER}", "a000000000000004", "a000000000000003", "triton [/]", "unknown", first, 150, 800,
             service_name="flywheel-serving"),
        span("{FAILED}", "b000000000000001", None, "answer", "chain", second, 0, 700, **app),
        span("{FAILED}", "b000000000000002", "b000000000000001", "lookup_order", "tool", second, 5, 600,
             status="error", error="timeout", **app),
        span("{NIGHTLY}", "c000000000000001", None, "reindex [/bold]", "chain", nightly, 0, 90, service_name="indexer"),
        step("retraining acme", 0, 5, "retraining", "flywheel-monitor"),
        step("train retrain-alert-cli-1", 10, 60000, "training/retrain-alert-cli-1", "flywheel-trainer"),
    ])
    sink.store_feedback([
        wrap(FeedbackReceived(inference_id="chatcmpl-a", thumbs="down"), producer="seed"),
        wrap(FeedbackReceived(trace_id="{ANSWER}", thumbs="up"), producer="seed"),
        wrap(FeedbackReceived(trace_id="{ANSWER}", span_id="a000000000000002", thumbs="down", rating=2), producer="seed"),
        wrap(FeedbackReceived(session_id="conv-9", thumbs="up", rating=4), producer="seed"),
    ])
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("ops-traces") / "home"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        idle_port = probe.getsockname()[1]
    environment = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_HTTP_PORT": str(idle_port),
        "COLUMNS": "300",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    subprocess.run([sys.executable, "-c", SEED, str(home)], cwd=REPO, env=environment, check=True, timeout=180)
    return environment


def flywheel(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLYWHEEL, "ops", *arguments], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def rows_naming(output: str, *ids: str) -> dict[str, list[str]]:
    """The table rows of `output` that name each id, split into their cells."""
    return {
        id_: [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines() if id_ in line]
        for id_ in ids
    }


def test_traces_lists_recent_traces_with_their_sums_and_filters(env: dict[str, str]) -> None:
    listed = flywheel(env, "traces", "--since", "1h")
    assert listed.returncode == 0, listed.stderr[-2000:]
    found = rows_naming(listed.stdout, ANSWER, FAILED, NIGHTLY)
    assert found[NIGHTLY] == [], "three days ago is not in the last hour"
    # trace_id, started_at, duration_ms, root_name, service_name, session_id, spans, llm_spans, tokens_in,
    # tokens_out, cost_usd, errors, feedback, thumbs_down
    [answer] = found[ANSWER]
    # Feedback on the trace, on its retrieval span and on the inference its LLM span names.
    assert answer[2:] == ["1200.0", "answer", "rag-app", "conv-9", "4", "1", "120", "30", "", "0", "3", "2"]
    [failed] = found[FAILED]
    assert failed[2:] == ["700.0", "answer", "rag-app", "conv-9", "2", "0", "0", "0", "", "1", "0", "0"]
    assert listed.stdout.index(FAILED) < listed.stdout.index(ANSWER), "newest first"

    errors = flywheel(env, "traces", "--since", "1h", "--errors-only")
    assert errors.returncode == 0, errors.stderr[-2000:]
    assert FAILED in errors.stdout and ANSWER not in errors.stdout

    by_service = flywheel(env, "traces", "--since", "7d", "--service", "indexer", "--limit", "5")
    assert by_service.returncode == 0, by_service.stderr[-2000:]
    assert ANSWER not in by_service.stdout and FAILED not in by_service.stdout
    # An app's span name is printed as it is, never read as table markup.
    assert rows_naming(by_service.stdout, NIGHTLY)[NIGHTLY][0][3] == "reindex [/bold]"

    by_session = flywheel(env, "traces", "--since", "7d", "--session", "conv-9", "--limit", "1")
    assert by_session.returncode == 0, by_session.stderr[-2000:]
    assert rows_naming(by_session.stdout, FAILED, ANSWER, NIGHTLY) == {
        FAILED: [rows_naming(listed.stdout, FAILED)[FAILED][0]],
        ANSWER: [],
        NIGHTLY: [],
    }, "the session's newest trace only"


def test_sessions_lists_each_conversation_once(env: dict[str, str]) -> None:
    done = flywheel(env, "sessions", "--since", "1h")
    assert done.returncode == 0, done.stderr[-2000:]
    [session] = rows_naming(done.stdout, "conv-9")["conv-9"]
    # session_id, first_at, last_at, duration_ms, traces, turns, services, spans, tokens_in, tokens_out,
    # cost_usd, errors, errored_traces, feedback, thumbs_down, on_session, on_session_down, session_rating:
    # feedback counts the three within its traces and the one on the conversation itself.
    assert session[3:] == [
        "300700.0", "2", "2", "['rag-app']", "6", "120", "30", "", "1", "1", "4", "2", "1", "0", "4.0",
    ]  # fmt: skip

    quiet = flywheel(env, "sessions", "--since", "1h", "--service", "indexer")
    assert quiet.returncode == 0 and "conv-9" not in quiet.stdout and "no rows" in quiet.stdout


def test_trace_prints_the_span_tree(env: dict[str, str]) -> None:
    done = flywheel(env, "trace", ANSWER)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        f"trace {ANSWER}: 4 spans, 1200.0 ms, tokens 120 in / 30 out, 0 in error, feedback 1 (1 up) on the trace",
        "answer  [chain]  +0.0 ms  1200.0 ms  ok  service rag-app  span a000000000000001",
        "  retrieve  [retrieval]  +10.0 ms  50.0 ms  unset  service rag-app  span a000000000000002  "
        "feedback 1 (1 down, rating 2.0)",
        "  chat smollm2  [llm]  +100.0 ms  1000.0 ms  unset  tokens 120/30  model smollm2  service rag-app  "
        "inference chatcmpl-a  span a000000000000003  feedback 1 (1 down)",
        "    triton [/]  [unknown]  +150.0 ms  800.0 ms  unset  service flywheel-serving  span a000000000000004",
    ]


def test_a_retrainings_trace_is_found_by_its_correlation_id(env: dict[str, str]) -> None:
    done = flywheel(env, "trace", "--retraining", "alert-cli-1")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"trace {RetrainingTrace('alert-cli-1').trace_id}: 2 spans, 60010.0 ms"), lines
    assert lines[1].startswith("retraining acme  [chain]  +0.0 ms  5.0 ms")
    assert lines[2].startswith("  train retrain-alert-cli-1  [chain]  +10.0 ms  60000.0 ms")


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (("trace",), "give either a trace id or --retraining CORRELATION_ID"),
        (("trace", ANSWER, "--retraining", "alert-cli-1"), "give either a trace id or --retraining CORRELATION_ID"),
        (("trace", "4bf92f35'; DROP TABLE span; --"), "is not a trace id: a trace id is 32 lowercase hex digits"),
        (("trace", "0" * 32), "an all-zero trace id is invalid"),
        (("traces", "--session", "conv 9"), "is not a session id"),
        (("traces", "--since", "last week"), "is neither a duration nor a time"),
    ],
)
def test_malformed_input_is_refused_with_what_to_write(env: dict[str, str], arguments: tuple, says: str) -> None:
    done = flywheel(env, *arguments)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr


def test_a_trace_with_no_spans_stored_says_so(env: dict[str, str]) -> None:
    done = flywheel(env, "trace", "f" * 32)
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"error: no spans stored for trace {'f' * 32}: list recent ones with `flywheel ops traces`"
    )
