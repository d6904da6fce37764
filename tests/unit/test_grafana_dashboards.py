"""The provisioned Grafana dashboards: valid JSON, on the provisioned ClickHouse data source, and every
query reads only tables/views the migrations create and only columns those relations have."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from services.runtime.clickhouse import load_migrations

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "clickhouse.yaml"

# Words a dashboard query may use besides column names: SQL keywords and the functions the panels call.
SQL_WORDS = {
    "select",
    "from",
    "where",
    "and",
    "or",
    "not",
    "as",
    "group",
    "by",
    "order",
    "desc",
    "asc",
    "limit",
    "in",
    "is",
    "null",
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "round",
    "ifnull",
    "bucket_s",
}
RELATION = re.compile(r"CREATE\s+(TABLE|VIEW)\s+IF\s+NOT\s+EXISTS\s+(\w+)\s*(.*)", re.IGNORECASE | re.DOTALL)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    return [*parts, "".join(current)]


def _columns(kind: str, body: str) -> set[str]:
    if kind.upper() == "TABLE":
        inside = body[body.index("(") + 1 :]
        depth, end = 1, 0
        for end, char in enumerate(inside):  # noqa: B007 - `end` is read after the loop: where the parenthesis closes
            depth += (char == "(") - (char == ")")
            if depth == 0:
                break
        items = _split_top_level(inside[:end])
        return {
            item.split()[0].strip("`")
            for item in items
            if item.strip() and not item.strip().upper().startswith(("INDEX", "PROJECTION", "CONSTRAINT"))
        }
    select = re.search(r"\bAS\s+SELECT\b(.*?)^FROM\b", body, re.DOTALL | re.MULTILINE | re.IGNORECASE)
    assert select, f"cannot find the select list of view body {body[:80]!r}"
    names = set()
    for raw in _split_top_level(select.group(1)):
        item = "\n".join(line for line in raw.splitlines() if not line.strip().startswith("--")).strip()
        alias = re.search(r"\bAS\s+(\w+)\s*$", item, re.IGNORECASE)
        names.add(alias.group(1) if alias else item.split(".")[-1])
    return names


def schema() -> dict[str, set[str]]:
    """Relation name -> columns, from the shipped migrations."""
    relations: dict[str, set[str]] = {}
    for migration in load_migrations():
        for statement in migration.statements:
            code = "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))
            if match := RELATION.search(code):
                relations[match.group(2)] = _columns(
                    match.group(1), "AS " + match.group(3) if match.group(1).upper() == "VIEW" else match.group(3)
                )
    return relations


def queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["rawSql"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_there_is_a_dashboard() -> None:
    assert DASHBOARDS, "no dashboard JSON under deploy/grafana/dashboards"


def test_schema_reader_knows_the_views() -> None:
    relations = schema()
    assert {
        "requests",
        "latency_p95_ms",
        "thumbs_down_rate",
        "mean_rating",
        "feedback_coverage",
        "bucket",
    } <= relations["inference_metrics"]
    assert {"waiting_s", "feedback_id"} <= relations["feedback_awaiting_inference"]
    assert {"event_id", "model_name"} <= relations["inference_log"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_uses_the_provisioned_clickhouse_source(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    for panel in dashboard["panels"]:
        for source in [panel["datasource"], *(target["datasource"] for target in panel["targets"])]:
            assert source == {"type": "grafana-clickhouse-datasource", "uid": uid}, panel["title"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_read_only_existing_views_and_columns(path: Path) -> None:
    relations = schema()
    dashboard = json.loads(path.read_text())
    variables = {variable["name"] for variable in dashboard.get("templating", {}).get("list", [])}
    for title, sql in queries(dashboard):
        used = re.findall(r"\bFROM\s+(\w+)", sql, re.IGNORECASE)
        assert len(used) == 1, f"{title}: one relation per query, got {used}"
        relation = used[0]
        assert relation in relations, f"{title}: {relation} is created by no migration"
        assert set(re.findall(r"\$\{(\w+)\}", sql)) <= variables, f"{title}: uses an undefined dashboard variable"
        code = re.sub(r"'[^']*'", "''", sql)  # string literals
        code = re.sub(r"\$\{\w+\}|\$__\w+", "", code)  # Grafana variables and macros
        aliases = set(re.findall(r"\bAS\s+(\w+)", code, re.IGNORECASE))
        words = {word for word in re.findall(r"\b[A-Za-z_]\w*\b", code)} - {relation} - aliases
        unknown = {word for word in words if word.lower() not in SQL_WORDS and word not in relations[relation]}
        assert not unknown, f"{title}: {sorted(unknown)} are not columns of {relation} ({sorted(relations[relation])})"
