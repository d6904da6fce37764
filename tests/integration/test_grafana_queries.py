"""Every provisioned Grafana query runs on a migrated ClickHouse, with Grafana's macros filled in as
the ClickHouse data source fills them."""

from __future__ import annotations

import json
import re

import pytest

from tests.fixtures.clickhouse import ClickHouseTarget
from tests.unit.test_grafana_dashboards import DASHBOARDS, queries

pytestmark = pytest.mark.integration


def as_grafana_sends(sql: str) -> str:
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= toDateTime(0) AND \1 <= now()", sql)
    return sql.replace("${bucket_s}", "3600")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_run(path, chdb_target: ClickHouseTarget) -> None:
    store = chdb_target.open()
    store.migrate()
    for title, sql in queries(json.loads(path.read_text())):
        assert store.query(as_grafana_sends(sql)) == [], title
