"""The monitor's state files as an existing FLYWHEEL_HOME/monitor holds them still load after the split
into parts: retraining.json in both its layouts (the first, {model: when}; the current, {requested,
answered}) and canaries.json, read and rewritten in the same layout."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts.events import AlertRaised, Severity, Stage, StageChanged
from services.monitor.retraining import RetrainingPolicy
from services.monitor.service import Monitor
from services.monitor.store import MonitorStore
from services.runtime.registry_client import RegistryClient

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def no_clickhouse() -> None:
    raise AssertionError("this path must not touch ClickHouse")


def monitor(state_dir: Path) -> Monitor:
    # A registry nobody answers and a store that fails when opened: what is checked here reads only the files.
    return Monitor(
        MonitorStore(no_clickhouse, no_clickhouse),
        [],
        lambda envelope: no_clickhouse(),
        RegistryClient("http://127.0.0.1:9", None),
        policy=RetrainingPolicy(cooldown_s=3600),
        state_dir=state_dir,
    )


def alert(model_name: str) -> AlertRaised:
    return AlertRaised(
        alert_id="a-1",
        rule_name="thumbs-down",
        rule_version=1,
        severity=Severity.warning,
        model_name=model_name,
        metric="thumbs_down_rate",
        value=0.4,
        threshold=0.1,
        window_start=NOW - timedelta(minutes=10),
        window_end=NOW,
        message="thumbs down",
    )


@pytest.mark.parametrize("layout", ["first", "current"])
async def test_a_retraining_asked_for_before_the_upgrade_still_holds_its_model_in_cooldown(
    tmp_path: Path, layout: str
) -> None:
    asked = (NOW - timedelta(minutes=5)).isoformat()
    stored = (
        {"smollm2": asked}
        if layout == "first"
        else {"requested": {"smollm2": asked}, "answered": {"a-0": "retrain-a-0"}}
    )
    (tmp_path / "retraining.json").write_text(json.dumps(stored))

    # In cooldown: no corrections read, no dataset published, nothing requested.
    assert await monitor(tmp_path).retraining.maybe_retrain(alert("smollm2"), NOW) is None
    # Another model is not in cooldown, so it goes on to read the corrections (here: the store that must not be opened).
    with pytest.raises(AssertionError, match="must not touch ClickHouse"):
        await monitor(tmp_path).retraining.maybe_retrain(alert("other"), NOW)


def test_the_canaries_watched_before_the_upgrade_are_still_watched_and_rewritten_in_their_layout(
    tmp_path: Path,
) -> None:
    watched = {
        "smollm2": {
            "version": 2,
            "since": (NOW - timedelta(hours=1)).isoformat(),
            "percent": 20.0,
            "last_review": {
                "at": NOW.isoformat(),
                "action": "wait",
                "control_version": 1,
                "summary": "wait: 10 < 100 inferences",
            },
        },
        "tinyllama": {"version": 5, "since": NOW.isoformat(), "percent": 10.0},
    }
    (tmp_path / "canaries.json").write_text(json.dumps(watched))
    restarted = monitor(tmp_path)
    assert restarted.canaries.watched() == watched

    # The registry archives smollm2's canary: its watch ends; the other stays exactly as it was.
    restarted.canaries.watch(
        StageChanged(
            model_name="smollm2", adapter_version=2, from_stage=Stage.production, to_stage=Stage.archived, actor="alice"
        ),
        NOW,
    )
    assert json.loads((tmp_path / "canaries.json").read_text()) == {"tinyllama": watched["tinyllama"]}
    # A move of a version that is not the watched one changes nothing.
    restarted.canaries.watch(
        StageChanged(
            model_name="tinyllama", adapter_version=4, from_stage=Stage.staging, to_stage=Stage.archived, actor="alice"
        ),
        NOW,
    )
    assert restarted.canaries.watched() == {"tinyllama": watched["tinyllama"]}
