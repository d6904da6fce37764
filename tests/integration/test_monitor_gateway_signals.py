"""What the gateway records beyond the answer, as the sink stores it and the monitor reads it, on the
embedded ClickHouse: response-cache hits (counted as their version's inferences, but their latency and
replayed answers kept out of the canary's arms), the output guard's verdicts (its block and finding rates)
and the model's confidence in its answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from contracts.envelope import wrap
from contracts.events import GuardOutcome, InferenceLogged
from services.feedback.models import inference_table
from services.monitor.rules import Rule
from services.monitor.store import MonitorStore
from services.runtime.clickhouse import ClickHouseStore
from tests.monitor_support import clickhouse, monitor_store  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

MODEL = "cache-hits-model"


def inference(number: int, route: str, latency_ms: float, at: datetime) -> InferenceLogged:
    return InferenceLogged(
        inference_id=f"cache-hits-{number}",
        model_name=MODEL,
        adapter_version=1,
        route=route,
        input_text=f"question {number % 3}",
        output_text=f"answer {number % 3}",
        latency_total_ms=latency_ms,
        started_at=at,
    )


def test_canary_arms_leave_out_the_latency_and_answers_of_cache_hits(
    clickhouse: ClickHouseStore,  # noqa: F811
    monitor_store: MonitorStore,  # noqa: F811
) -> None:
    start = datetime.now(UTC) - timedelta(minutes=1)
    generated = [inference(number, "production", 400.0, start) for number in range(6)]
    hits = [inference(number, "cache", 2.0, start) for number in range(6, 30)]
    events = generated + hits
    clickhouse.insert_arrow("inference_log", inference_table([wrap(e, producer="serving") for e in events], events))
    end = datetime.now(UTC) + timedelta(minutes=1)

    (arm,) = monitor_store.canary_arms(MODEL, (1, 2), start, end)
    assert arm["inferences"] == 30
    assert sorted(arm["latencies"]) == [400.0] * 6, "a cache hit's latency measures the cache, not the version"
    answers = monitor_store.answers(MODEL, (1, 2), start, end, limit=100)
    assert len(answers) == 6


def test_the_guards_verdicts_are_stored_and_rated_over_the_answers_it_checked(
    clickhouse: ClickHouseStore,  # noqa: F811
    monitor_store: MonitorStore,  # noqa: F811
) -> None:
    model = "guard-rates-model"
    start = datetime.now(UTC) - timedelta(minutes=1)
    found = (GuardOutcome.blocked, GuardOutcome.redacted)
    # (input, output): a request blocked at the door, an answer blocked, one redacted, five passed both
    # guards, and twelve calls neither guard checked.
    outcomes = (
        [(GuardOutcome.blocked, None), (GuardOutcome.passed, GuardOutcome.blocked), (None, GuardOutcome.redacted)]
        + [(GuardOutcome.passed, GuardOutcome.passed)] * 5
        + [(None, None)] * 12
    )
    events = [
        InferenceLogged(
            inference_id=f"guard-rates-{number}",
            model_name=model,
            adapter_version=1,
            guard_input_outcome=given,
            guard_input_found=["OPENAI_KEY"] if given in found else [],
            guard_output_outcome=answered,
            guard_output_found=["CARD", "EMAIL"] if answered in found else [],
        )
        for number, (given, answered) in enumerate(outcomes)
    ]
    clickhouse.insert_arrow("inference_log", inference_table([wrap(e, producer="serving") for e in events], events))
    end = datetime.now(UTC) + timedelta(minutes=1)

    stored = clickhouse.query(
        "SELECT guard_input_outcome, guard_input_found, guard_output_outcome, guard_output_found FROM inference_log FINAL "
        "WHERE inference_id IN ('guard-rates-0', 'guard-rates-1') ORDER BY inference_id"
    )
    assert stored == [
        {
            "guard_input_outcome": "blocked",
            "guard_input_found": ["OPENAI_KEY"],
            "guard_output_outcome": None,
            "guard_output_found": [],
        },
        {
            "guard_input_outcome": "passed",
            "guard_input_found": [],
            "guard_output_outcome": "blocked",
            "guard_output_found": ["CARD", "EMAIL"],
        },
    ]
    rates = {}
    for metric in ("guard_block_rate", "guard_finding_rate"):
        rule = Rule(name=metric.replace("_", "-"), version=1, metric=metric, threshold=0.1, scope=("model_name",))
        (row,) = [row for row in monitor_store.aggregate(rule, start, end) if row["model_name"] == model]
        rates[metric] = (row["value"], row["samples"])
    # Over the 8 calls a guard checked; the 12 neither checked (guards off) count in neither.
    assert rates == {"guard_block_rate": (2 / 8, 8), "guard_finding_rate": (3 / 8, 8)}


def test_the_models_confidence_is_averaged_over_the_answers_that_carry_it(
    clickhouse: ClickHouseStore,  # noqa: F811
    monitor_store: MonitorStore,  # noqa: F811
) -> None:
    """The window's answers are less sure than the baseline's; cache replays, which carry none, do not count."""
    model = "confidence-model"
    now = datetime.now(UTC)
    earlier, recent = now - timedelta(hours=2), now - timedelta(minutes=1)
    # Earlier: four answers at -0.25. Recent: two at -1.5, two at -0.5, and two replays that carry none.
    logged = [(earlier, -0.25)] * 4 + [(recent, -1.5), (recent, -0.5)] * 2 + [(recent, None)] * 2
    envelopes = [
        wrap(
            InferenceLogged(
                inference_id=f"confidence-{number}",
                model_name=model,
                adapter_version=1,
                route="cache" if confidence is None else "production",
                mean_token_logprob=confidence,
            ),
            producer="serving",
        ).model_copy(update={"occurred_at": at})
        for number, (at, confidence) in enumerate(logged)
    ]
    clickhouse.insert_arrow("inference_log", inference_table(envelopes, [e.payload for e in envelopes]))
    rule = Rule(name="confidence-drop", version=1, metric="mean_token_logprob", threshold=0.0, scope=("model_name",))

    def confidence(start: datetime, end: datetime) -> tuple[float, int]:
        (row,) = [row for row in monitor_store.aggregate(rule, start, end) if row["model_name"] == model]
        return row["value"], row["samples"]

    assert confidence(now - timedelta(hours=3), now - timedelta(hours=1)) == (-0.25, 4)
    assert confidence(now - timedelta(minutes=5), now) == (-1.0, 4)
