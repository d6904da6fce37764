"""The query guard alone (no engine): what it accepts, what it refuses and how it says so, judged on the
parsed tree, so comments, quoting and case cannot smuggle anything through. The same attacks against the
live door and engine are in tests/security/test_query_door.py."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from services.runtime.clickhouse.query_guard import (
    ALLOWED_FUNCTIONS,
    QueryGuard,
    QueryLimits,
    QueryRefused,
    migration_relations,
)

pytestmark = pytest.mark.unit

USERS = Path(__file__).resolve().parents[2] / "deploy" / "clickhouse" / "users.d" / "flywheel.xml"

GUARD = QueryGuard("flywheel")

ACCEPTED = [
    "SELECT count() FROM inference_log",
    "SELECT * FROM flywheel.feedback",
    "SELECT model_name, count() AS n FROM inference_log FINAL GROUP BY model_name ORDER BY n DESC LIMIT 10",
    "SELECT * FROM inference_metrics(bucket_s = 3600) WHERE bucket >= now() - INTERVAL 1 DAY",
    "SELECT * FROM inference_metrics(bucket_s = {bucket:UInt32}) WHERE bucket >= now() - toIntervalHour({hours:UInt32})",
    "WITH recent AS (SELECT * FROM inference_log WHERE occurred_at > now() - INTERVAL 1 HOUR) SELECT count() FROM recent",
    "SELECT inference_id FROM inference_log UNION ALL SELECT inference_id FROM feedback",
    "SELECT * FROM (SELECT model_name, avg(latency_total_ms) AS mean FROM inference_log GROUP BY model_name) WHERE mean > 100",
    "SELECT f.feedback_id, i.model_name FROM feedback AS f LEFT JOIN inference_log AS i ON f.inference_id = i.inference_id",
    "SELECT countIf(status = 'error') / count() AS error_rate, quantileIf(0.95)(latency_total_ms, status = 'ok') AS p95 FROM inference_log",
    "SELECT uniqExact(event_id), argMax(model_name, occurred_at), groupArray(inference_id) FROM inference_log",
    "SELECT CASE WHEN rating >= 4 THEN 'good' ELSE 'bad' END AS verdict, CAST(rating AS String) AS r, rating::Int32 AS i FROM feedback",
    "SELECT toStartOfHour(occurred_at) AS hour, dateDiff('second', occurred_at, now()) AS age FROM feedback",
    "SELECT arrayMap(x -> lower(x), tags) AS t, JSONExtractString(input_messages, 'role') AS role FROM feedback ARRAY JOIN tags AS tag, inference_log",
    "SELECT count() FROM inference_log WHERE inference_id IN {ids:Array(String)} AND model_name IN (SELECT model_name FROM model_price)",
    "SELECT count() FROM inference_log WHERE model_name IN feedback_with_inference",
    "SELECT * FROM alert FINAL ORDER BY occurred_at DESC LIMIT 1 BY alert_id",
    "(SELECT 1)",
    "SELECT 1;",
    "SELECT count() FROM inference_log WHERE EXISTS (SELECT 1 FROM feedback WHERE feedback.inference_id = inference_log.inference_id)",
    "WITH Recent AS (SELECT 1 AS x) select COUNT() from Recent",
]

REFUSED = [
    ("SELECT file('/proc/self/environ')", 403, "function file() is not allowed"),
    ("SELECT FiLe('/etc/passwd')", 403, "function FiLe() is not allowed"),
    ("SELECT/**/file('/etc/passwd')", 403, "function file() is not allowed"),
    ("SELECT 1 -- ;\n, file('/etc/passwd')", 403, "function file() is not allowed"),
    ("SELECT 1 # comment\n, file('/etc/passwd')", 403, "function file() is not allowed"),
    ("SELECT \"file\"('/etc/passwd')", 403, "function file() is not allowed"),
    ("SELECT `file`('/etc/passwd')", 403, "function file() is not allowed"),
    ("SELECT lower(file('/etc/passwd'))", 403, "function file() is not allowed"),
    ("SELECT * FROM inference_log WHERE input_text = file('/etc/passwd')", 403, "function file() is not allowed"),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", 403, "table function file() is not allowed"),
    ("SELECT * FROM FILE('/etc/passwd', 'LineAsString')", 403, "table function FILE() is not allowed"),
    ("SELECT * FROM url('http://example.com', 'CSV')", 403, "table function url() is not allowed"),
    ("SELECT * FROM s3('https://b.s3.amazonaws.com/k')", 403, "table function s3() is not allowed"),
    ("SELECT * FROM s3Cluster('c', 'https://b/k')", 403, "table function s3Cluster() is not allowed"),
    ("SELECT * FROM hdfs('hdfs://h/p', 'CSV')", 403, "table function hdfs() is not allowed"),
    ("SELECT * FROM remote('h', system.users)", 403, "table function remote() is not allowed"),
    ("SELECT * FROM remoteSecure('h', db, t)", 403, "table function remoteSecure() is not allowed"),
    ("SELECT * FROM cluster('c', system.one)", 403, "table function cluster() is not allowed"),
    ("SELECT * FROM clusterAllReplicas('c', system.one)", 403, "table function clusterAllReplicas() is not allowed"),
    ("SELECT * FROM executable('x', 'CSV', 'a String')", 403, "table function executable() is not allowed"),
    ("SELECT * FROM input('a String')", 403, "table function input() is not allowed"),
    ("SELECT * FROM numbers(10)", 403, "table function numbers() is not allowed"),
    ("SELECT * FROM merge('flywheel', '.*')", 403, "table function merge() is not allowed"),
    ("SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')", 403, "table function mysql() is not allowed"),
    ("SELECT * FROM postgresql('h:5432', 'db', 't', 'u', 'p')", 403, "table function postgresql() is not allowed"),
    ("SELECT * FROM jdbc('jdbc:x', 't')", 403, "table function jdbc() is not allowed"),
    # sqlglot reads `dictionary` as a keyword-named table with column aliases here; refused by name all the same.
    ("SELECT * FROM dictionary('d')", 403, "table dictionary is not allowed"),
    ("SELECT * FROM inference_log('x')", 403, "table function inference_log() is not allowed"),
    ("SELECT * FROM feedback JOIN url('http://x', 'CSV') AS u ON 1", 403, "table function url() is not allowed"),
    ("SELECT * FROM feedback_with_inference(x = url('http://x'))", 403, "takes parameters as name = value"),
    ("SELECT * FROM inference_metrics(bucket_s = file('/etc/passwd'))", 403, "takes parameters as name = value"),
    ("SELECT dictGet('d', 'a', 1)", 403, "function dictGet() is not allowed"),
    ("SELECT dictGetOrDefault('d', 'a', 1, 'x')", 403, "function dictGetOrDefault() is not allowed"),
    ("SELECT dictHas('d', 1)", 403, "function dictHas() is not allowed"),
    ("SELECT joinGet('j', 'v', 1)", 403, "function joinGet() is not allowed"),
    ("SELECT getSetting('readonly')", 403, "function getSetting() is not allowed"),
    ("SELECT currentUser()", 403, "not allowed"),
    ("SELECT hostName()", 403, "function hostName() is not allowed"),
    ("SELECT sleep(3)", 403, "function sleep() is not allowed"),
    ("SELECT throwIf(1)", 403, "function throwIf() is not allowed"),
    ("SELECT fileIf('x', 1)", 403, "function fileIf() is not allowed"),
    ("SELECT * FROM system.tables", 403, "table system.tables is not allowed"),
    ("SELECT * FROM system.users", 403, "table system.users is not allowed"),
    ('SELECT * FROM "system"."users"', 403, "table system.users is not allowed"),
    ("SELECT * FROM information_schema.tables", 403, "table information_schema.tables is not allowed"),
    ("SELECT * FROM INFORMATION_SCHEMA.COLUMNS", 403, "table INFORMATION_SCHEMA.COLUMNS is not allowed"),
    ("SELECT * FROM default.inference_log", 403, "table default.inference_log is not allowed"),
    ("SELECT * FROM schema_migrations", 403, "table schema_migrations is not allowed"),
    ("SELECT * FROM Inference_Log", 403, "table Inference_Log is not allowed"),
    ("SELECT count() FROM inference_log WHERE 'root' IN system.users", 403, "table system.users is not allowed"),
    (
        "SELECT * FROM inference_log WHERE inference_id IN (SELECT name FROM system.users)",
        403,
        "table system.users is not allowed",
    ),
    (
        "SELECT system.users.name FROM inference_log",
        403,
        "names database 'system'; the query door reads 'flywheel' only",
    ),
    ("WITH x AS (SELECT * FROM system.users) SELECT * FROM x", 403, "table system.users is not allowed"),
    ("SELECT 1 WHERE EXISTS (SELECT name FROM system.users)", 403, "table system.users is not allowed"),
    ("SELECT * APPLY(file) FROM inference_log", 403, "APPLY() is not allowed"),
    ("SELECT * FROM view(SELECT * FROM system.users)", 403, "table function view() is not allowed"),
    ("SELECT * FROM generateRandom('a String')", 403, "table function generateRandom() is not allowed"),
    ('SELECT * FROM "system.users"', 403, "table system.users is not allowed"),
    ("SELECT * FROM inference_log PASTE JOIN system.one", 403, "table system.one is not allowed"),
    ("SELECT (SELECT name FROM system.users LIMIT 1)", 403, "table system.users is not allowed"),
    ("EXPLAIN SELECT file('x')", 403, "EXPLAIN is not a SELECT"),
    ("SELECT * FROM {t:Identifier}", 403, "never identifiers"),
    ("SELECT {c:Identifier} FROM inference_log", 403, "never identifiers"),
    ("SELECT 1 SETTINGS readonly = 0", 403, "SETTINGS is not allowed"),
    ("SELECT 1 settings ReadOnly = 0", 403, "SETTINGS is not allowed"),
    ("SELECT * FROM (SELECT 1 SETTINGS max_result_rows = 0)", 403, "SETTINGS is not allowed"),
    ("SELECT 1 UNION ALL SELECT 2 SETTINGS max_execution_time = 0", 403, "SETTINGS is not allowed"),
    ("SELECT 1 FORMAT TabSeparated", 403, "FORMAT is not allowed"),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", 403, "INTO OUTFILE is not allowed"),
    ("SELECT 1 into -- c\n outfile '/tmp/x'", 403, "INTO OUTFILE is not allowed"),
    ("SELECT 1; DROP TABLE feedback", 403, "one statement per request"),
    ("SELECT 1; SELECT 2", 403, "one statement per request"),
    ("SELECT 1;\n-- ;\nSELECT 2", 403, "one statement per request"),
    ("DROP TABLE feedback", 403, "DROP is not a SELECT"),
    ("INSERT INTO feedback SELECT * FROM feedback", 403, "INSERT is not a SELECT"),
    ("ALTER TABLE feedback DELETE WHERE 1", 403, "ALTER is not a SELECT"),
    ("TRUNCATE TABLE feedback", 403, "TRUNCATE is not a SELECT"),
    ("SET readonly = 0", 403, "SET is not a SELECT"),
    ("SHOW TABLES", 403, "SHOW is not a SELECT"),
    ("CREATE TABLE x (a UInt8) ENGINE = File(CSV)", 403, "CREATE is not a SELECT"),
    ("SELEC * FRM feedback", 400, "not a SQL statement"),
    ("SELECT * FROM feedback WHERE (", 400, "cannot be parsed"),
    ("   ", 400, "empty"),
    ("SELECT 'unterminated", 400, "cannot be parsed"),
]


@pytest.mark.parametrize("sql", ACCEPTED)
def test_accepts_one_select_over_flywheels_tables(sql: str) -> None:
    regenerated = GUARD.check(sql)
    # What runs is the judged tree, regenerated: it passes the guard again, and carries no comment.
    assert GUARD.check(regenerated) == regenerated and "--" not in regenerated and "/*" not in regenerated


@pytest.mark.parametrize(("sql", "status", "words"), REFUSED, ids=[sql[:60] for sql, _, _ in REFUSED])
def test_refuses_with_a_precise_reason(sql: str, status: int, words: str) -> None:
    with pytest.raises(QueryRefused) as refused:
        GUARD.check(sql)
    assert refused.value.status == status and words in str(refused.value), str(refused.value)
    assert refused.value.code == ("query_refused" if status == 403 else "query_invalid")


def test_table_refusals_list_the_allowed_tables() -> None:
    with pytest.raises(
        QueryRefused,
        match="allowed tables: alert, evaluation_result, feedback, feedback_awaiting_inference, feedback_with_inference, inference_log, inference_metrics, model_price, monitor_evaluation, session_summary, span, trace_summary",
    ):
        GUARD.check("SELECT * FROM system.users")


def test_the_allow_list_of_tables_comes_from_the_migrations() -> None:
    relations = migration_relations()
    assert {
        "inference_log",
        "feedback",
        "evaluation_result",
        "alert",
        "model_price",
        "monitor_evaluation",
        "span",
    } <= relations.tables
    assert relations.views == {
        "feedback_with_inference",
        "feedback_awaiting_inference",
        "inference_metrics",
        "trace_summary",
        "session_summary",
    }
    assert "schema_migrations" not in relations.names


def test_another_database_is_the_configured_one() -> None:
    assert (
        QueryGuard("tenant_a").check("SELECT count() FROM tenant_a.feedback") == "SELECT count() FROM tenant_a.feedback"
    )
    with pytest.raises(QueryRefused, match="table flywheel.feedback is not allowed"):
        QueryGuard("tenant_a").check("SELECT count() FROM flywheel.feedback")


def test_no_reader_of_files_or_the_network_is_on_the_function_allow_list() -> None:
    dangerous = {
        "file",
        "url",
        "s3",
        "remote",
        "remotesecure",
        "cluster",
        "clusterallreplicas",
        "executable",
        "input",
        "dictget",
        "dictgetstring",
        "dicthas",
        "joinget",
        "getsetting",
        "currentuser",
        "hostname",
        "getmacro",
        "filesystemavailable",
        "sleep",
        "sleepeachrow",
    }
    assert not dangerous & ALLOWED_FUNCTIONS


def test_the_caps_are_settings_the_engine_enforces() -> None:
    assert QueryLimits(
        max_execution_time_s=5, max_result_rows=10, max_result_bytes=2048, max_memory_usage=4096
    ).settings() == {
        "max_execution_time": 5,
        "max_result_rows": 10,
        "max_result_bytes": 2048,
        "result_overflow_mode": "throw",
        "max_memory_usage": 4096,
    }


@pytest.mark.parametrize("user", ["flywheel_query", "flywheel_grafana"])
def test_the_read_only_server_users_are_granted_exactly_the_migrations_relations(user: str) -> None:
    account = ET.parse(USERS).getroot().find(f"users/{user}")
    grants = [query.text or "" for query in account.findall("grants/query")]
    granted = {
        match.group(1) for grant in grants if (match := re.fullmatch(r"GRANT SELECT ON flywheel\.(\w+)", grant.strip()))
    }
    assert len(granted) == len(grants), f"{user} holds a grant other than SELECT on one relation: {grants}"
    assert granted == migration_relations().names, (
        f"{USERS.name}: {user}'s grants and the migrations differ by {sorted(granted ^ migration_relations().names)}"
    )


def test_the_query_door_users_profile_caps_sit_within_its_ceilings() -> None:
    profile = ET.parse(USERS).getroot().find("profiles/flywheel_query")
    defaults = QueryLimits().settings()
    for setting in ("max_execution_time", "max_result_rows", "max_result_bytes", "max_memory_usage"):
        ceiling = profile.find(f"constraints/{setting}")
        low, high = int(ceiling.findtext("min")), int(ceiling.findtext("max"))
        assert low >= 1, f"{setting}: a minimum of 0 would let a request ask for no limit"
        assert low <= int(defaults[setting]) <= high and low <= int(profile.findtext(setting)) <= high, setting
