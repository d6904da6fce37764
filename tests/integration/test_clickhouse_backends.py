"""Both ClickHouse backends behind one interface: same migrations, same Arrow inserts, same answers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from services.runtime.clickhouse import ClickHouseError, load_migrations
from services.runtime.errors import ConfigurationError
from tests.fixtures.clickhouse import ClickHouseTarget

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
READONLY = 164
# Recent, so the 90-day TTL on text columns keeps the text; fixed sub-second part to check DateTime64(3).
T0 = (datetime.now(UTC) - timedelta(days=1)).replace(hour=3, minute=4, second=5, microsecond=678000)


def inference_batch(n: int, *, first: int = 0) -> pa.Table:
    """`n` inference_log rows with deterministic ids, in an order unlike the table's column order."""
    ids = range(first, first + n)
    return pa.table(
        {
            "output_text": [f"answer {i}" for i in ids],
            "inference_id": [f"inf-{i}" for i in ids],
            "event_id": [str(uuid.UUID(int=i + 1)) for i in ids],
            "occurred_at": pa.array([T0 + timedelta(seconds=i) for i in ids], pa.timestamp("ms", "UTC")),
            "producer": ["serving"] * n,
            "correlation_id": [f"corr-{i % 3}" for i in ids],
            "model_name": ["smollm2" if i % 2 else "other" for i in ids],
            "adapter_version": pa.array([None if i % 4 == 0 else 1 for i in ids], pa.uint32()),
            "route": ["production"] * n,
            "endpoint": ["chat.completions"] * n,
            "input_messages": ['[{"role": "user", "content": "hi"}]'] * n,
            "input_text": [f"question {i}" for i in ids],
            "prompt_tokens": pa.array([10 + i % 7 for i in ids], pa.uint32()),
            "completion_tokens": pa.array([20 + i % 5 for i in ids], pa.uint32()),
            "latency_total_ms": pa.array([float(i % 100) for i in ids], pa.float64()),
            "status": ["error" if i % 10 == 9 else "ok" for i in ids],
            "metadata": pa.array([[("app", "demo"), ("i", str(i))] for i in ids], pa.map_(pa.string(), pa.string())),
        }
    )


def feedback_batch() -> pa.Table:
    return pa.table(
        {
            "event_id": [str(uuid.UUID(int=1000 + i)) for i in range(3)],
            "occurred_at": pa.array([T0] * 3, pa.timestamp("ms", "UTC")),
            "producer": ["feedback"] * 3,
            "correlation_id": ["corr-1"] * 3,
            "feedback_id": ["fb-0", "fb-1", "fb-2"],
            "inference_id": ["inf-1", "inf-1", "inf-3"],
            "thumbs": ["down", None, "up"],
            "rating": pa.array([1, 2, None], pa.uint8()),
            "correction": ["better answer", None, None],
            "tags": [["wrong-fact"], [], ["tone", "style"]],
            "source": ["end_user", "reviewer", "judge"],
        }
    )


def evaluation_batch() -> pa.Table:
    return pa.table(
        {
            "evaluation_id": ["ev-1"] * 4,
            "example_id": ["ex-1", "ex-2", "ex-1", "ex-2"],
            "model_name": ["smollm2"] * 4,
            "adapter_version": pa.array([2, 2, 1, 1], pa.uint32()),
            "target": ["candidate", "candidate", "baseline", "baseline"],
            "metric": ["exact_match"] * 4,
            "score": pa.array([1.0, None, 0.0, 1.0], pa.float64()),
            "error": [None, "timeout", None, None],
            "prediction": ["a", "", "b", "c"],
            "reference": ["a", "b", "c", "c"],
            "created_at": pa.array([T0] * 4, pa.timestamp("ms", "UTC")),
        }
    )


def alert_events() -> pa.Table:
    # The same alert, opened then resolved; the open event arrives last, as a late redelivery would.
    return pa.table(
        {
            "event_id": [str(uuid.UUID(int=2000)), str(uuid.UUID(int=2001))],
            "occurred_at": pa.array([T0 + timedelta(minutes=5), T0], pa.timestamp("ms", "UTC")),
            "producer": ["monitor"] * 2,
            "correlation_id": ["corr-a"] * 2,
            "alert_id": ["al-1"] * 2,
            "rule_name": ["feedback_score"] * 2,
            "rule_version": pa.array([1, 1], pa.uint32()),
            "severity": ["warning"] * 2,
            "state": ["resolved", "open"],
            "model_name": ["smollm2"] * 2,
            "metric": ["thumbs_down_rate"] * 2,
            "value": [0.4, 0.4],
            "threshold": [0.3, 0.3],
            "window_start": pa.array([T0 - timedelta(hours=1)] * 2, pa.timestamp("ms", "UTC")),
            "window_end": pa.array([T0] * 2, pa.timestamp("ms", "UTC")),
            "message": ["thumbs-down rate 40% over the last hour"] * 2,
        }
    )


SCENARIO_QUERIES = {
    "per_model": (
        "SELECT model_name, count() AS n, countIf(status = 'error') AS errors, sum(prompt_tokens) AS tokens,"
        " countIf(adapter_version IS NULL) AS base FROM inference_log FINAL GROUP BY model_name ORDER BY model_name"
    ),
    "one_row": (
        "SELECT toString(event_id) AS event_id, occurred_at, inference_id, output_text, input_text, metadata,"
        " adapter_version FROM inference_log FINAL WHERE inference_id = {inference_id:String}"
    ),
    "feedback": (
        "SELECT feedback_id, thumbs, rating, correction, tags, source FROM feedback FINAL"
        " WHERE inference_id = {inference_id:String} ORDER BY feedback_id"
    ),
    "evaluation": (
        "SELECT target, avg(score) AS mean, countIf(error IS NOT NULL) AS errors"
        " FROM evaluation_result FINAL WHERE evaluation_id = {evaluation_id:String} GROUP BY target ORDER BY target"
    ),
    "alert": "SELECT alert_id, state, occurred_at FROM alert FINAL",
    "since": "SELECT count() AS n FROM inference_log FINAL WHERE occurred_at >= {since:DateTime64(3, 'UTC')}",
}
SCENARIO_PARAMETERS = {
    "one_row": {"inference_id": "inf-5"},
    "feedback": {"inference_id": "inf-1"},
    "evaluation": {"evaluation_id": "ev-1"},
    "since": {"since": T0 + timedelta(seconds=10, milliseconds=500)},
}
EXPECTED = {
    "per_model": [
        {"model_name": "other", "n": 10, "errors": 0, "tokens": 127, "base": 5},
        {"model_name": "smollm2", "n": 10, "errors": 2, "tokens": 130, "base": 0},
    ],
    "one_row": [
        {
            "event_id": "00000000-0000-0000-0000-000000000006",
            "occurred_at": T0 + timedelta(seconds=5),
            "inference_id": "inf-5",
            "output_text": "answer 5",
            "input_text": "question 5",
            "metadata": [("app", "demo"), ("i", "5")],
            "adapter_version": 1,
        }
    ],
    "feedback": [
        {
            "feedback_id": "fb-0",
            "thumbs": "down",
            "rating": 1,
            "correction": "better answer",
            "tags": ["wrong-fact"],
            "source": "end_user",
        },
        {"feedback_id": "fb-1", "thumbs": None, "rating": 2, "correction": None, "tags": [], "source": "reviewer"},
    ],
    "evaluation": [
        {"target": "baseline", "mean": 0.5, "errors": 0},
        {"target": "candidate", "mean": 1.0, "errors": 1},
    ],
    "alert": [{"alert_id": "al-1", "state": "resolved", "occurred_at": T0 + timedelta(minutes=5)}],
    "since": [{"n": 9}],
}


def run_scenario(target: ClickHouseTarget) -> dict[str, list[dict]]:
    store = target.open()
    store.migrate()
    store.insert_arrow("inference_log", inference_batch(20))
    store.insert_arrow("feedback", feedback_batch())
    store.insert_arrow("evaluation_result", evaluation_batch())
    store.insert_arrow("alert", alert_events())
    return {name: store.query(sql, SCENARIO_PARAMETERS.get(name)) for name, sql in SCENARIO_QUERIES.items()}


def test_same_inserts_and_queries_give_the_same_answers(clickhouse_target: ClickHouseTarget) -> None:
    # Each backend is held to one literal expectation, so passing on both means they agree.
    assert run_scenario(clickhouse_target) == EXPECTED


def test_backends_agree_row_for_row(request: pytest.FixtureRequest, chdb_target: ClickHouseTarget) -> None:
    url = request.getfixturevalue("clickhouse_server_url")
    server_target = ClickHouseTarget("server", url, chdb_target.home, f"test_{uuid.uuid4().hex}")
    try:
        assert run_scenario(server_target) == run_scenario(chdb_target)
    finally:
        server_target.close_all()
        admin = server_target.open()
        admin.command(f"DROP DATABASE IF EXISTS `{server_target.database}`")
        server_target.close_all()


def test_migrations_apply_once(clickhouse_target: ClickHouseTarget) -> None:
    store = clickhouse_target.open()
    names = [m.name for m in load_migrations()]
    assert store.migrate() == names
    assert store.migrate() == []
    assert clickhouse_target.open().migrate() == []
    recorded = store.query("SELECT version, name FROM schema_migrations FINAL ORDER BY version")
    assert [row["name"] for row in recorded] == names
    assert store.query("SELECT count() AS n FROM schema_migrations")[0]["n"] == len(names)


def test_redelivered_batch_is_deduplicated(clickhouse_target: ClickHouseTarget) -> None:
    store = clickhouse_target.open()
    store.migrate()
    batch = inference_batch(50)
    store.insert_arrow("inference_log", batch, dedup_token="inference.logged:0:100")
    store.insert_arrow("inference_log", batch, dedup_token="inference.logged:0:100")
    # The token drops the second insert before it is written: even a read without FINAL sees one copy.
    assert store.query("SELECT count() AS n FROM inference_log")[0]["n"] == 50

    # Without a token (or with a new one) the copy is stored, and FINAL still collapses it per inference_id.
    store.insert_arrow("inference_log", batch.slice(0, 10), dedup_token="inference.logged:0:101")
    store.insert_arrow("inference_log", batch.slice(0, 10))
    assert store.query("SELECT count() AS n FROM inference_log FINAL")[0]["n"] == 50
    latest = "SELECT inference_id FROM inference_log ORDER BY ingested_at DESC LIMIT 1 BY inference_id"
    assert len(store.query(latest)) == 50


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO feedback (feedback_id, inference_id) VALUES ('f', 'i')",
        "CREATE TABLE sneaky (a UInt8) ENGINE = Memory",
        "DROP TABLE inference_log",
        "ALTER TABLE inference_log DELETE WHERE 1",
        "TRUNCATE TABLE alert",
        "SET readonly = 0",
        "SELECT 1 SETTINGS readonly = 0",
    ],
)
def test_readonly_handle_is_refused_by_the_engine(clickhouse_target: ClickHouseTarget, statement: str) -> None:
    clickhouse_target.open().migrate()
    reader = clickhouse_target.open(readonly=True)
    with pytest.raises(ClickHouseError) as refused:
        reader.command(statement)
    assert refused.value.code == READONLY, refused.value
    assert reader.query("SELECT count() AS n FROM inference_log FINAL") == [{"n": 0}]


def test_readonly_handle_refuses_arrow_inserts_and_migrations(clickhouse_target: ClickHouseTarget) -> None:
    writer = clickhouse_target.open()
    writer.migrate()
    reader = clickhouse_target.open(readonly=True)
    for attempt in (lambda: reader.insert_arrow("inference_log", inference_batch(1)), reader.migrate):
        with pytest.raises(ClickHouseError) as refused:
            attempt()
        assert refused.value.code == READONLY, refused.value
    writer.insert_arrow("inference_log", inference_batch(3))
    assert reader.query("SELECT count() AS n FROM inference_log FINAL") == [{"n": 3}]


def test_readonly_open_of_a_missing_database_says_so(clickhouse_target: ClickHouseTarget) -> None:
    missing = ClickHouseTarget(
        clickhouse_target.backend, clickhouse_target.url, clickhouse_target.home, "never_created"
    )
    with pytest.raises(ConfigurationError, match="does not exist"):
        missing.open(readonly=True)


def test_columns_bind_by_name_not_position(clickhouse_target: ClickHouseTarget) -> None:
    store = clickhouse_target.open()
    store.migrate()
    batch = inference_batch(2)
    shuffled = batch.select(list(reversed(batch.column_names)))
    store.insert_arrow("inference_log", shuffled)
    rows = store.query("SELECT inference_id, output_text, input_text FROM inference_log FINAL ORDER BY inference_id")
    assert rows == [
        {"inference_id": "inf-0", "output_text": "answer 0", "input_text": "question 0"},
        {"inference_id": "inf-1", "output_text": "answer 1", "input_text": "question 1"},
    ]


def test_hundred_thousand_rows_in_one_arrow_insert(clickhouse_target: ClickHouseTarget) -> None:
    store = clickhouse_target.open()
    store.migrate()
    batch = inference_batch(100_000)
    started = time.perf_counter()
    store.insert_arrow("inference_log", batch)
    elapsed = time.perf_counter() - started
    print(
        f"\n{clickhouse_target.backend}: 100000 rows into inference_log in {elapsed:.3f}s = {100_000 / elapsed:,.0f} rows/s"
    )
    assert store.query("SELECT count() AS n, uniqExact(inference_id) AS ids FROM inference_log FINAL") == [
        {"n": 100_000, "ids": 100_000}
    ]


def test_a_second_chdb_directory_in_one_process_is_refused_clearly(tmp_path: Path) -> None:
    # In a child process: this one holds the session's chDB directory open for the other tests.
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from services.runtime.clickhouse import open_clickhouse
        from services.runtime.errors import ConfigurationError

        first = open_clickhouse(None, Path({str(tmp_path / "a")!r}))
        again = open_clickhouse(None, Path({str(tmp_path / "a")!r}), readonly=True)
        try:
            open_clickhouse(None, Path({str(tmp_path / "b")!r}))
        except ConfigurationError as error:
            print("REFUSED", error)
        again.close()
        first.close()
        later = open_clickhouse(None, Path({str(tmp_path / "b")!r}))
        print("REOPENED", later.query("SELECT 1 AS one"))
        later.close()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused = next(line for line in done.stdout.splitlines() if line.startswith("REFUSED"))
    assert f"already open at {(tmp_path / 'a' / 'clickhouse').resolve()}" in refused
    assert str((tmp_path / "b" / "clickhouse").resolve()) in refused
    assert "REOPENED [{'one': 1}]" in done.stdout


def test_old_text_expires_but_the_numbers_stay(clickhouse_target: ClickHouseTarget) -> None:
    store = clickhouse_target.open()
    store.migrate()
    old = inference_batch(1).set_column(
        3, "occurred_at", pa.array([datetime.now(UTC) - timedelta(days=100)], pa.timestamp("ms", "UTC"))
    )
    store.insert_arrow("inference_log", old)
    store.command("OPTIMIZE TABLE inference_log FINAL")
    rows = store.query("SELECT input_text, output_text, input_messages, prompt_tokens FROM inference_log FINAL")
    assert rows == [{"input_text": "", "output_text": "", "input_messages": "", "prompt_tokens": 10}]
