"""`flywheel feedback give|list` and `flywheel ops replay|sql` as a user runs them: subprocesses on the
real broker, each with its own home (chDB data directory) and topics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from contracts.envelope import wrap
from contracts.events import InferenceLogged, SpanLogged
from contracts.examples import example_events
from contracts.topics import topic_for
from infra.processes import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


@pytest.fixture
def cli(tmp_path: Path, kafka_bootstrap: str, topics: str):
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(tmp_path / "home"),
        # A port nothing listens on: `list` and `sql` fall back to the store, as without a running process.
        "FLYWHEEL_HTTP_PORT": str(free_port()),
        "FLYWHEEL_TOPIC_PREFIX": topics,
        "FLYWHEEL_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "PYTHONWARNINGS": "ignore",
    }

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([FLYWHEEL, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        if ok:
            assert done.returncode == 0, f"flywheel {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    return run


async def publish_inferences(bootstrap: str, topic_prefix: str, n: int, spans: int = 0) -> None:
    """`n` inferences, and `spans` spans of one trace (the gateway's call inside an app's trace)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(n):
            envelope = wrap(
                InferenceLogged(inference_id=f"cli-{i}", model_name="smollm2", prompt_tokens=3, completion_tokens=2),
                producer="test",
            )
            await producer.send(
                topic_for(InferenceLogged, topic_prefix), envelope.model_dump_json().encode(), key=f"cli-{i}".encode()
            )
        example = example_events()[SpanLogged]
        for i in range(spans):
            span = example.model_copy(
                update={"span_id": f"{i + 1:016x}", "parent_span_id": None if i == 0 else "1".zfill(16)}
            )
            await producer.send(
                topic_for(SpanLogged, topic_prefix),
                wrap(span, producer="test").model_dump_json().encode(),
                key=span.trace_id.encode(),
            )
        await producer.flush()
    finally:
        await producer.stop()


def replay_counts(output: str) -> dict[str, tuple[int, int]]:
    """topic suffix -> (read, inserted) from `flywheel ops replay`'s lines."""
    counts = {}
    for line in output.strip().splitlines():
        topic, rest = line.split(": ", 1)
        fields = dict(part.rsplit(" ", 1) for part in rest.split(", "))
        counts[topic.rsplit(".", 2)[-2] + "." + topic.rsplit(".", 1)[-1]] = (
            int(fields["read"]),
            int(fields["inserted"]),
        )
    return counts


async def test_give_replay_twice_and_list(cli, kafka_bootstrap: str, topics: str) -> None:
    given = cli(
        "feedback",
        "give",
        "cli-1",
        "--thumbs",
        "down",
        "--rating",
        "2",
        "--comment",
        "wrong, write to ann@example.org",
        "--tag",
        "duration",
        "--source",
        "reviewer",
    )
    assert "published" in given.stdout
    await publish_inferences(kafka_bootstrap, topics, 40, spans=3)

    first = replay_counts(cli("ops", "replay").stdout)
    second = replay_counts(cli("ops", "replay").stdout)
    # A reviewer's feedback travels on feedback.reviewed (the feedback service's topic), not feedback.received.
    assert first == {
        "inference.logged": (40, 40),
        "feedback.received": (0, 0),
        "feedback.reviewed": (1, 1),
        "span.logged": (3, 3),
    }
    assert second == {
        "inference.logged": (40, 0),
        "feedback.received": (0, 0),
        "feedback.reviewed": (1, 0),
        "span.logged": (3, 0),
    }, "a second replay must add nothing"

    stored = cli(
        "ops", "sql", "SELECT count() AS rows, uniqExact(event_id) AS events FROM inference_log"
    ).stdout.split()
    assert stored == ["rows", "events", "40", "40"]

    listed = json.loads(cli("feedback", "list", "cli-1").stdout)
    assert listed["inference_stored"] is True
    [item] = listed["items"]
    assert (item["thumbs"], item["rating"], item["tags"], item["source"]) == ("down", 2, ["duration"], "reviewer")
    assert item["comment"] == "wrong, write to [EMAIL]"

    # A trace's feedback is asked for as feedback on it is given: the trace is stored, nobody rated it yet.
    trace_id = example_events()[SpanLogged].trace_id
    on_the_trace = json.loads(cli("feedback", "list", "--trace-id", trace_id).stdout)
    assert (on_the_trace["target"], on_the_trace["trace_id"], on_the_trace["stored"], on_the_trace["items"]) == (
        "trace",
        trace_id,
        True,
        [],
    )
    nothing_named = cli("feedback", "list", ok=False)
    assert nothing_named.returncode != 0 and "feedback names no target" in nothing_named.stderr + nothing_named.stdout


def test_bad_feedback_is_refused_with_the_field_named(cli) -> None:
    malformed = cli("feedback", "give", "not an id", "--thumbs", "up", ok=False)
    assert malformed.returncode != 0 and "malformed" in malformed.stderr + malformed.stdout
    out_of_range = cli("feedback", "give", "cli-1", "--rating", "9", ok=False)
    assert out_of_range.returncode != 0 and "rating" in out_of_range.stderr + out_of_range.stdout
    empty = cli("feedback", "give", "cli-1", ok=False)
    assert empty.returncode != 0 and "empty feedback" in empty.stderr + empty.stdout
