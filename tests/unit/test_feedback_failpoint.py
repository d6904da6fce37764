"""Failpoint feedback.clickhouse_unavailable (services/runtime/failpoints.py, armed as
`feedback.clickhouse_unavailable=fail-while-exists:PATH`): while its file exists the sink's store fails every
statement without touching ClickHouse, so the sink takes the outage path (StoreUnavailable -> RetryLater)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.envelope import wrap
from contracts.events import InferenceLogged
from services.runtime.privacy import Redactor
from services.feedback.service import Sink, StoreUnavailable
from services.feedback.store import FeedbackStore
from services.runtime import failpoints
from services.runtime.clickhouse import ClickHouseError

pytestmark = pytest.mark.unit


class Answering:
    """Stands in for a ClickHouse handle that answers: records what reached it."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def query(self, sql: str, parameters: object = None) -> list[dict]:
        self.statements.append(sql)
        return [{"ok": 1}] if sql.startswith("SELECT 1") else []

    def insert_arrow(self, table: str, data: object, dedup_token: str | None = None) -> None:
        self.statements.append(f"INSERT {table}")


@pytest.fixture
def disarmed() -> Iterator[None]:
    failpoints.arm("")
    yield
    failpoints.arm("")


def test_unarmed_the_store_reaches_clickhouse(disarmed: None, tmp_path: Path) -> None:
    clickhouse = Answering()
    (tmp_path / "down").touch()  # a file alone arms nothing
    FeedbackStore(lambda: clickhouse).ping()  # type: ignore[arg-type, return-value]
    assert clickhouse.statements == ["SELECT 1 AS ok"]


def test_while_the_file_exists_nothing_reaches_clickhouse_and_the_sink_reports_unavailable(
    disarmed: None, tmp_path: Path
) -> None:
    clickhouse = Answering()
    switch = tmp_path / "down"
    failpoints.arm(f"feedback.clickhouse_unavailable=fail-while-exists:{switch}")
    store = FeedbackStore(lambda: clickhouse)  # type: ignore[arg-type, return-value]
    sink = Sink(store, Redactor())
    batch = [wrap(InferenceLogged(inference_id="a", model_name="m"), producer="test")]

    switch.touch()
    with pytest.raises(ClickHouseError, match="failpoint feedback.clickhouse_unavailable"):
        store.ping()
    with pytest.raises(StoreUnavailable):
        sink.store_inferences(batch)
    assert clickhouse.statements == []

    switch.unlink()
    assert sink.store_inferences(batch) == 1
    assert clickhouse.statements[-1] == "INSERT inference_log"
