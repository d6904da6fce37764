"""The query door cannot reach the file system or the network (issue 13): the monitor as `flywheel run
monitor` builds it (services/monitor/app.create_app under build_process) answers `POST /monitor/v1/query`
on real ClickHouse. Every attack and its variants (table functions, `file()`, `system.*`, SETTINGS,
multi-statements, comment and case tricks) is a clear 4xx that leaks nothing and changes nothing; an
app key is refused before any parsing; queries over the caps fail cleanly; the project's own queries
(ops views, Grafana panels, the docs' query guide, the demo) still answer as they did; and `flywheel ops sql` with
nothing running goes through the same guard.

The door needs neither the broker nor the tick loop, so the app is built but its lifespan (which starts
them) is not entered. Parametrised over both backends; the server one skips, with its reason, where no
ClickHouse server is reachable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from fastapi import FastAPI

from contracts.http import Role
from services.monitor.app import create_app
from services.monitor.cli import SQL as OPS_VIEWS
from services.monitor.traces import (
    SESSION_FEEDBACK_SQL,
    SPANS_SQL,
    SessionFilter,
    TraceFilter,
    sessions_query,
    spans_query,
    trace_feedback_query,
    traces_query,
)
from services.monitor.settings import MonitorSettings
from services.registry.store import RegistryStore
from services.runtime.auth import KeyStore, LocalKeys
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.clickhouse.query_guard import QueryGuard, QueryLimits, QueryOverLimit
from services.runtime.service import Runtime, Service, build_process
from services.runtime.settings import FlywheelSettings
from tests.conftest import REPO
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.test_grafana_queries import as_grafana_sends
from tests.unit.test_grafana_dashboards import DASHBOARDS, queries

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
INFERENCES = 40
# What must never come back from the door, whatever the query: the environment's admin key, /etc/passwd.
SECRET = "fw_bootstrap_admin_secret_that_must_not_leak_000000"
LEAKS = (SECRET, "FLYWHEEL_BOOTSTRAP_ADMIN_KEY", "root:x:0:0", "/bin/bash", "Traceback")

REFUSED = (403, "query_refused")
INVALID = (400, "query_invalid")
# (what it tries, the SQL, (status, code), words the message must hold so the caller knows what was refused)
ATTACKS = [
    ("file() environ", "SELECT file('/proc/self/environ')", REFUSED, "function file()"),
    ("file() passwd", "SELECT file('/etc/passwd')", REFUSED, "function file()"),
    ("file() case trick", "SELECT FiLe('/etc/passwd')", REFUSED, "function FiLe()"),
    ("file() upper case", "SELECT FILE('/etc/passwd') AS x", REFUSED, "function FILE()"),
    ("file() in a comment trick", "SELECT /*x*/file('/etc/passwd')", REFUSED, "function file()"),
    ("file() after a line comment with ;", "SELECT 1 -- ;\n, file('/etc/passwd')", REFUSED, "function file()"),
    ("file() backquoted", "SELECT `file`('/etc/passwd')", REFUSED, "function file()"),
    ("file() in a subquery", "SELECT * FROM (SELECT file('/etc/passwd') AS x)", REFUSED, "function file()"),
    (
        "file() in WHERE",
        "SELECT count() FROM inference_log WHERE file('/etc/passwd') != ''",
        REFUSED,
        "function file()",
    ),
    (
        "file() in a CTE",
        "WITH leak AS (SELECT file('/etc/passwd') AS x) SELECT x FROM leak",
        REFUSED,
        "function file()",
    ),
    (
        "file() as a view parameter",
        "SELECT * FROM inference_metrics(bucket_s = file('/etc/passwd'))",
        REFUSED,
        "name = value",
    ),
    ("file table function", "SELECT * FROM file('/etc/passwd', 'LineAsString')", REFUSED, "table function file()"),
    (
        "url table function",
        "SELECT * FROM url('http://169.254.169.254/latest/meta-data/', 'LineAsString')",
        REFUSED,
        "table function url()",
    ),
    ("s3 table function", "SELECT * FROM s3('https://bucket.s3.amazonaws.com/x.csv')", REFUSED, "table function s3()"),
    (
        "remote table function",
        "SELECT * FROM remote('127.0.0.1:9000', system.users)",
        REFUSED,
        "table function remote()",
    ),
    (
        "remoteSecure table function",
        "SELECT * FROM remoteSecure('127.0.0.1:9440', 'flywheel', 'feedback')",
        REFUSED,
        "table function remoteSecure()",
    ),
    ("cluster table function", "SELECT * FROM cluster('default', system.one)", REFUSED, "table function cluster()"),
    (
        "clusterAllReplicas table function",
        "SELECT * FROM clusterAllReplicas('default', system.one)",
        REFUSED,
        "table function clusterAllReplicas()",
    ),
    (
        "executable table function",
        "SELECT * FROM executable('cat /etc/passwd', 'LineAsString', 'x String')",
        REFUSED,
        "table function executable()",
    ),
    ("input table function", "SELECT * FROM input('x String')", REFUSED, "table function input()"),
    ("numbers table function", "SELECT * FROM numbers(10)", REFUSED, "table function numbers()"),
    (
        "table function joined",
        "SELECT * FROM feedback AS f JOIN file('/etc/passwd', 'LineAsString') AS p ON 1",
        REFUSED,
        "table function file()",
    ),
    ("dictGet", "SELECT dictGet('secrets', 'value', toUInt64(1))", REFUSED, "function dictGet()"),
    ("dictGetString", "SELECT dictGetString('secrets', 'value', toUInt64(1))", REFUSED, "function dictGetString()"),
    ("joinGet", "SELECT joinGet('flywheel.feedback', 'comment', 'x')", REFUSED, "function joinGet()"),
    ("getSetting", "SELECT getSetting('readonly')", REFUSED, "function getSetting()"),
    ("system.tables", "SELECT name FROM system.tables", REFUSED, "table system.tables"),
    ("system.users", "SELECT name FROM system.users", REFUSED, "table system.users"),
    ("SYSTEM.users in upper case", "SELECT * FROM SYSTEM.users", REFUSED, "table SYSTEM.users"),
    (
        "system table in a union",
        "SELECT model_name FROM inference_log UNION ALL SELECT name FROM system.tables",
        REFUSED,
        "table system.tables",
    ),
    (
        "system table through IN",
        "SELECT count() FROM inference_log WHERE model_name IN system.users",
        REFUSED,
        "table system.users",
    ),
    (
        "information_schema.tables",
        "SELECT * FROM information_schema.tables",
        REFUSED,
        "table information_schema.tables",
    ),
    (
        "INFORMATION_SCHEMA.TABLES",
        "SELECT * FROM INFORMATION_SCHEMA.TABLES",
        REFUSED,
        "table INFORMATION_SCHEMA.TABLES",
    ),
    ("another database", "SELECT * FROM default.feedback", REFUSED, "table default.feedback"),
    ("a table of no migration", "SELECT * FROM schema_migrations", REFUSED, "table schema_migrations"),
    ("identifier parameter", "SELECT * FROM {t:Identifier}", REFUSED, "never identifiers"),
    ("SETTINGS readonly=0", "SELECT 1 SETTINGS readonly = 0", REFUSED, "SETTINGS is not allowed"),
    (
        "SETTINGS raising a cap",
        "SELECT * FROM inference_log SETTINGS max_result_rows = 0",
        REFUSED,
        "SETTINGS is not allowed",
    ),
    (
        "SETTINGS in a subquery",
        "SELECT * FROM (SELECT * FROM feedback SETTINGS max_memory_usage = 0)",
        REFUSED,
        "SETTINGS is not allowed",
    ),
    ("; DROP TABLE", "SELECT 1; DROP TABLE feedback", REFUSED, "one statement per request"),
    ("two SELECTs", "SELECT 1; SELECT 2", REFUSED, "one statement per request"),
    ("DROP TABLE alone", "DROP TABLE feedback", REFUSED, "DROP is not a SELECT"),
    (
        "INSERT",
        "INSERT INTO model_price (model_name, usd_per_1k_input_tokens, usd_per_1k_output_tokens) VALUES ('x', 1, 1)",
        REFUSED,
        "INSERT is not a SELECT",
    ),
    ("SET readonly", "SET readonly = 0", REFUSED, "not a SELECT"),
    ("FORMAT", "SELECT 1 FORMAT JSONEachRow", REFUSED, "FORMAT is not allowed"),
    (
        "INTO OUTFILE",
        "SELECT * FROM feedback INTO OUTFILE '/tmp/flywheel-leak.csv'",
        REFUSED,
        "INTO OUTFILE is not allowed",
    ),
    (
        "INTO OUTFILE with a comment between",
        "SELECT * FROM feedback INTO /* x */ OUTFILE '/tmp/flywheel-leak.csv'",
        REFUSED,
        "INTO OUTFILE is not allowed",
    ),
    ("not a statement", "SELEC * FRM feedback", INVALID, "not a SQL statement"),
    ("not SQL", "SELECT * FROM feedback WHERE (", INVALID, "cannot be parsed"),
]


def _insert_traffic(store: ClickHouseStore) -> None:
    now = datetime.now(UTC)
    ids = [f"inf-{uuid.uuid4().hex[:12]}" for _ in range(INFERENCES)]
    store.insert_arrow(
        "inference_log",
        pa.table(
            {
                "event_id": pa.array([str(uuid.uuid4()) for _ in ids]),
                "occurred_at": pa.array(
                    [now - timedelta(minutes=i) for i in range(INFERENCES)], pa.timestamp("ms", "UTC")
                ),
                "inference_id": pa.array(ids),
                "model_name": pa.array(["smollm2"] * INFERENCES),
                "route": pa.array(["production"] * INFERENCES),
                "input_text": pa.array([f"question {i} " + "x" * 200 for i in range(INFERENCES)]),
                "output_text": pa.array([f"answer {i}" for i in range(INFERENCES)]),
                "prompt_tokens": pa.array([20 + i for i in range(INFERENCES)], pa.uint32()),
                "completion_tokens": pa.array([8] * INFERENCES, pa.uint32()),
                "latency_total_ms": pa.array([300.0 + i for i in range(INFERENCES)]),
                "status": pa.array(["ok" if i % 5 else "error" for i in range(INFERENCES)]),
            }
        ),
    )
    store.insert_arrow(
        "feedback",
        pa.table(
            {
                "event_id": pa.array([str(uuid.uuid4()) for _ in ids[::2]]),
                "occurred_at": pa.array([now] * len(ids[::2]), pa.timestamp("ms", "UTC")),
                "feedback_id": pa.array([f"fb-{i}" for i in range(len(ids[::2]))]),
                "inference_id": pa.array(ids[::2]),
                "thumbs": pa.array(["down" if i % 3 == 0 else "up" for i in range(len(ids[::2]))]),
                "rating": pa.array([1 + i % 5 for i in range(len(ids[::2]))], pa.uint8()),
                "source": pa.array(["user"] * len(ids[::2])),
            }
        ),
    )


class Door:
    """The built monitor app and keys of each role, with the writable store to look behind the door."""

    def __init__(self, app: FastAPI, store: ClickHouseStore, keys: dict[str, str]) -> None:
        self.app = app
        self.store = store
        self.keys = keys

    def client(self, role: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://monitor",
            headers={"Authorization": f"Bearer {self.keys[role]}"},
            timeout=60,
        )

    def state(self) -> dict[str, int]:
        """Every relation in the test's database with its row count: what an attack must leave as it was."""
        names = [
            row["name"]
            for row in self.store.query(
                "SELECT name FROM system.tables WHERE database = {db:String} ORDER BY name", {"db": self.store.database}
            )
        ]
        return {
            name: self.store.query(f"SELECT count() AS n FROM `{name}`")[0]["n"]
            for name in names
            if name != "inference_metrics"
        }


def build_door(target: ClickHouseTarget, tmp_path: Path, monitor_settings: MonitorSettings | None = None) -> Door:
    store = target.open()
    store.migrate()
    _insert_traffic(store)
    registry = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.migrate()
    keystore = KeyStore(registry.engine)
    keys = {
        role.value: keystore.create(principal=f"{role.value}-caller", role=role, created_by="test")[0]
        for role in (Role.viewer, Role.app, Role.operator, Role.admin)
    }
    # Offered to this process's doors as the registry built here would offer it (services never open its database).
    LocalKeys.register(registry.url, keystore)
    settings = FlywheelSettings(
        home=target.home, database_url=registry.url, kafka_bootstrap="127.0.0.1:1", clickhouse_url=target.url
    )

    def monitor(runtime: Runtime) -> Service:
        runtime.clickhouse = lambda: store
        return create_app(
            runtime, monitor_settings or MonitorSettings(), open_readonly=partial(target.open, readonly=True)
        )

    app, _ = build_process(settings, [monitor], title="query-door-test")
    return Door(app, store, keys)


@pytest.fixture
def door(clickhouse_target: ClickHouseTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Door]:
    # The environment an attacker would read through file('/proc/self/environ').
    monkeypatch.setenv("FLYWHEEL_BOOTSTRAP_ADMIN_KEY", SECRET)
    yield build_door(clickhouse_target, tmp_path)


def assert_clean_refusal(response: httpx.Response, status: int, code: str, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert not any(leak in response.text for leak in LEAKS), response.text


async def test_every_attack_is_a_clear_4xx_that_leaks_and_changes_nothing(door: Door) -> None:
    before = door.state()
    async with door.client("viewer") as viewer:
        for what, sql, (status, code), words in ATTACKS:
            response = await viewer.post("/monitor/v1/query", json={"sql": sql})
            try:
                assert_clean_refusal(response, status, code, words)
            except AssertionError as failure:
                raise AssertionError(f"{what}: {failure}") from None
        refused_table = (await viewer.post("/monitor/v1/query", json={"sql": "SELECT * FROM system.tables"})).json()[
            "error"
        ]["message"]
        assert (
            "allowed tables: alert, evaluation_result, feedback" in refused_table
            and "inference_metrics" in refused_table
        )
    assert door.state() == before
    assert before["inference_log"] == INFERENCES and before["model_price"] == 0
    assert not Path("/tmp/flywheel-leak.csv").exists()


async def test_an_app_key_is_refused_before_any_parsing(door: Door) -> None:
    async with door.client("app") as app:
        for sql in (
            "SELECT file('/proc/self/environ')",
            "SELECT file('/etc/passwd')",
            "SELECT count() FROM inference_log",
            "SELEC not even SQL",
        ):
            response = await app.post("/monitor/v1/query", json={"sql": sql})
            assert_clean_refusal(response, 403, "insufficient_role", "has role app; this needs viewer")


async def test_the_roles_that_read_use_the_door(door: Door) -> None:
    for role in ("viewer", "operator", "admin"):
        async with door.client(role) as client:
            response = await client.post("/monitor/v1/query", json={"sql": "SELECT count() AS n FROM inference_log"})
            assert response.status_code == 200 and response.json()["rows"] == [[INFERENCES]], (role, response.text)


def project_queries() -> list[tuple[str, str, dict]]:
    """The queries Flywheel itself sends to the door or documents: ops views, Grafana panels, the docs' query guide, the demo, the tests."""
    found = [(f"ops {name}", sql, {"hours": 24, "bucket": 3600}) for name, sql in OPS_VIEWS.items()]
    found += [
        ("ops traces", *traces_query(TraceFilter(0, service="rag-app", errors_only=True), 50)),
        ("ops sessions", *sessions_query(SessionFilter(0, service="rag-app", errors_only=True), 50)),
        (
            "console traces",
            *traces_query(TraceFilter(0, session="conv-1", name_contains="50%_off", min_duration_ms=12.5), 51, 950),
        ),
        ("console session's traces", *traces_query(TraceFilter(0, session="conv-1"), 1001, oldest_first=True)),
        ("console sessions", *sessions_query(SessionFilter(0, thumbs_down=True), 51, 50)),
        ("console trace", *spans_query("4bf92f3577b34da6a3ce929d0e0e4736", limit=1001, text_max=4000)),
        (
            "trace feedback",
            *trace_feedback_query("4bf92f3577b34da6a3ce929d0e0e4736", [{"inference_id": "chatcmpl-1"}]),
        ),
        ("session feedback", SESSION_FEEDBACK_SQL, {"session": "conv-1"}),
        ("ops trace", SPANS_SQL, {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}),
    ]
    for path in DASHBOARDS:
        found += [
            (f"grafana {title}", as_grafana_sends(sql), {}) for title, sql in queries(json.loads(path.read_text()))
        ]
    guide = (REPO / "docs" / "how-to" / "query-clickhouse.md").read_text()
    block = guide.split("```sql\n", 1)[1].split("```", 1)[0]
    found.append(("query-clickhouse guide example", block.strip(), {}))
    ids = ["inf-none"]
    found += [
        (
            "demo step 4",
            "SELECT count() AS rows, uniqExact(event_id) AS events, countIf(adapter_version = {v:UInt32}) AS on_version FROM inference_log WHERE inference_id IN {ids:Array(String)}",
            {"ids": ids, "v": 1},
        ),
        (
            "demo step 4 errors",
            "SELECT count() AS n FROM inference_log WHERE user_id IN {users:Array(String)} AND status != 'ok' AND occurred_at >= parseDateTime64BestEffort({since:String}, 3)",
            {"users": ["customer-0"], "since": "2026-01-01T00:00:00+00:00"},
        ),
        (
            "demo step 5",
            "SELECT count() AS rows, uniqExact(event_id) AS events, countIf(correction != '') AS corrections, "
            "(SELECT countIf(inference_stored) FROM feedback_with_inference WHERE inference_id IN {ids:Array(String)}) AS joined FROM feedback WHERE inference_id IN {ids:Array(String)}",
            {"ids": ids},
        ),
        ("process-shape fault test", "SELECT (SELECT count() FROM inference_log), (SELECT count() FROM feedback)", {}),
        ("cli run test", "SELECT count() FROM feedback WHERE inference_id = {id:String}", {"id": "inf-none"}),
        ("feedback cli test", "SELECT count() AS rows, uniqExact(event_id) AS events FROM inference_log", {}),
        ("monitor test", "SELECT model_name, count() AS n FROM inference_log GROUP BY model_name", {}),
        (
            "awaiting view",
            "SELECT feedback_id, waiting_s FROM feedback_awaiting_inference ORDER BY waiting_s DESC LIMIT 5",
            {},
        ),
        (
            "joined view",
            "SELECT model_name, thumbs, count() AS n FROM feedback_with_inference GROUP BY model_name, thumbs ORDER BY thumbs",
            {},
        ),
        ("alerts", "SELECT * FROM alert FINAL ORDER BY occurred_at DESC LIMIT 10", {}),
        (
            "evaluations",
            "SELECT evaluation_id, metric, avg(score) AS mean FROM evaluation_result GROUP BY evaluation_id, metric",
            {},
        ),
        (
            "monitor evaluations",
            "SELECT rule_name, max(value) AS worst FROM monitor_evaluation FINAL GROUP BY rule_name",
            {},
        ),
        (
            "prices",
            "SELECT model_name, argMax(usd_per_1k_input_tokens, updated_at) AS price FROM model_price GROUP BY model_name",
            {},
        ),
        ("qualified by the database", "SELECT count() AS n FROM {database}.inference_log", {}),
    ]
    return found


async def test_the_projects_own_queries_answer_as_they_did(door: Door) -> None:
    async with door.client("viewer") as viewer:
        for what, template, parameters in project_queries():
            sql = template.replace("{database}", door.store.database)
            response = await viewer.post("/monitor/v1/query", json={"sql": sql, "parameters": parameters})
            assert response.status_code == 200, f"{what}: {response.text}"
            direct = door.store.query_arrow(sql, parameters or None)
            body = response.json()
            # The door runs the SQL regenerated from the judged tree: same columns, same number of rows.
            assert body["columns"] == direct.column_names and body["row_count"] == direct.num_rows, (
                what,
                body["columns"],
                direct.column_names,
            )
        traffic = (
            await viewer.post(
                "/monitor/v1/query", json={"sql": OPS_VIEWS["traffic"], "parameters": {"hours": 24, "bucket": 3600}}
            )
        ).json()
        assert sum(row[traffic["columns"].index("requests")] for row in traffic["rows"]) == INFERENCES


@pytest.mark.parametrize(
    ("limit", "sql", "cap"),
    [
        ({"query_max_result_rows": 5}, "SELECT inference_id FROM inference_log", "max_result_rows"),
        ({"query_max_result_bytes": 1024}, "SELECT input_text FROM inference_log", "max_result_bytes"),
    ],
)
async def test_a_query_over_a_cap_fails_cleanly_with_400(
    clickhouse_target: ClickHouseTarget, tmp_path: Path, limit: dict[str, int], sql: str, cap: str
) -> None:
    door = build_door(clickhouse_target, tmp_path, MonitorSettings(**limit))
    before = door.state()
    async with door.client("viewer") as viewer:
        over = await viewer.post("/monitor/v1/query", json={"sql": sql})
        assert over.status_code == 400, over.text
        error = over.json()["error"]
        assert error["code"] == "query_over_limit" and cap in error["message"] and "narrow it" in error["message"], (
            error
        )
        assert "Traceback" not in over.text
        # Under the cap, the same door answers.
        small = await viewer.post("/monitor/v1/query", json={"sql": "SELECT count() AS n FROM inference_log"})
        assert small.status_code == 200 and small.json()["rows"] == [[INFERENCES]], small.text
    assert door.state() == before


def test_the_engine_enforces_the_memory_and_time_caps(clickhouse_target: ClickHouseTarget) -> None:
    store = clickhouse_target.open()
    store.migrate()
    for _ in range(5):
        _insert_traffic(store)
    readonly = clickhouse_target.open(readonly=True)
    guard = QueryGuard(readonly.database)
    # Every pair of prompts gathered into one array: some 16 MB, far over 1 MiB (and over the 4 MiB a
    # thread may allocate before the query's memory tracker hears of it).
    gathered = "SELECT groupArray(concat(a.input_text, b.input_text)) AS pairs FROM inference_log AS a CROSS JOIN inference_log AS b"
    with pytest.raises(QueryOverLimit, match="max_memory_usage"):
        guard.run(readonly, gathered, None, QueryLimits(max_memory_usage=1024 * 1024))
    # Every row with every other, four ways, hashed: 200^4 hashes, minutes of work on any machine here,
    # so the cap, not the machine's speed on the day, decides (three ways finished under a second when idle).
    heavy = (
        "SELECT sum(cityHash64(a.input_text, b.input_text, c.input_text, d.input_text)) AS h FROM inference_log AS a"
        " CROSS JOIN inference_log AS b CROSS JOIN inference_log AS c CROSS JOIN inference_log AS d"
    )
    with pytest.raises(QueryOverLimit, match="max_execution_time"):
        guard.run(readonly, heavy, None, QueryLimits(max_execution_time_s=1))
    # The caps belong to the query, not the handle: the next one runs under the defaults.
    assert guard.run(readonly, "SELECT count() AS n FROM inference_log", None, QueryLimits()).to_pylist() == [
        {"n": 5 * INFERENCES}
    ]


def test_flywheel_ops_sql_with_nothing_running_goes_through_the_same_guard(tmp_path: Path) -> None:
    """The CLI opens the store itself when no process answers: the same guard and caps apply, so a query
    behaves alike with or without a running monitor (and a script tested locally works in production)."""
    home = tmp_path / "home"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        idle_port = probe.getsockname()[1]
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_HTTP_PORT": str(idle_port),
        "FLYWHEEL_BOOTSTRAP_ADMIN_KEY": SECRET,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    seed = "import sys; from pathlib import Path; from services.runtime.clickhouse import open_clickhouse\nwith open_clickhouse(None, Path(sys.argv[1])) as s: s.migrate()"
    subprocess.run([sys.executable, "-c", seed, str(home)], cwd=REPO, env=env, check=True, timeout=180)

    leak = subprocess.run(
        [FLYWHEEL, "ops", "sql", "SELECT file('/proc/self/environ')"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert leak.returncode != 0 and "function file() is not allowed" in leak.stderr + leak.stdout, (
        leak.stdout,
        leak.stderr,
    )
    assert SECRET not in leak.stdout + leak.stderr and "Traceback" not in leak.stderr
    system = subprocess.run(
        [FLYWHEEL, "ops", "sql", "SELECT name FROM system.users"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert system.returncode != 0 and "table system.users is not allowed" in system.stderr + system.stdout, (
        system.stdout,
        system.stderr,
    )
    counted = subprocess.run(
        [FLYWHEEL, "ops", "sql", "SELECT count() AS n FROM inference_log"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert counted.returncode == 0 and counted.stdout.split() == ["n", "0"], (counted.stdout, counted.stderr)


@pytest.mark.parametrize(
    "clickhouse_target", ["server"], indirect=True
)  # embedded chDB has no users: the guard is its only line
def test_on_a_server_the_door_users_grants_alone_refuse_files_and_system_tables(
    clickhouse_target: ClickHouseTarget,
) -> None:
    """Defence in depth on a server: the query door's own user (as deploy/clickhouse/users.d provisions it:
    SELECT on the migrations' tables and views) is refused by ClickHouse itself, guard or no guard."""
    from urllib.parse import urlsplit, urlunsplit

    from services.runtime.clickhouse import ClickHouseError, open_clickhouse
    from services.runtime.clickhouse.query_guard import migration_relations

    admin = clickhouse_target.open()
    admin.migrate()
    user, password = f"door_{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    try:
        admin.command(f"CREATE USER {user} IDENTIFIED WITH sha256_password BY '{password}'")
    except ClickHouseError as error:
        pytest.skip(f"the test server's user cannot create users (access_management off): {str(error).splitlines()[0]}")
    try:
        for relation in sorted(migration_relations().names):
            admin.command(f"GRANT SELECT ON `{clickhouse_target.database}`.`{relation}` TO {user}")
        parts = urlsplit(clickhouse_target.url)
        door_url = urlunsplit(
            (parts.scheme, f"{user}:{password}@{parts.hostname}:{parts.port}", f"/{clickhouse_target.database}", "", "")
        )
        with open_clickhouse(
            door_url, clickhouse_target.home, readonly=True, database=clickhouse_target.database
        ) as door:
            assert door.query("SELECT count() AS n FROM inference_log") == [{"n": 0}]
            assert door.query("SELECT count() AS n FROM inference_metrics(bucket_s = 60)") == [{"n": 0}]
            # Straight to the engine, past the guard: the server's grants refuse each.
            for sql in (
                "SELECT * FROM file('/etc/passwd', 'LineAsString')",
                "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
                "SELECT * FROM remote('127.0.0.1', system.one)",
                "SELECT name FROM system.users",
                "SELECT * FROM default.schema_migrations",
            ):
                with pytest.raises(ClickHouseError):
                    door.query(sql)
            with pytest.raises(ClickHouseError):
                door.command("INSERT INTO model_price (model_name) VALUES ('x')")
            # The caps travel with the query and hold on the server too.
            _insert_traffic(admin)
            with pytest.raises(QueryOverLimit, match="max_result_rows"):
                QueryGuard(door.database).run(
                    door, "SELECT inference_id FROM inference_log", None, QueryLimits(max_result_rows=5)
                )
    finally:
        admin.command(f"DROP USER IF EXISTS {user}")
