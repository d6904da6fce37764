"""A service's logged exception reads as type, message and stack, without every frame's locals."""

from __future__ import annotations

import logging

import pytest

from services.runtime.logging import CoordinatorStarting, configure_logging
from services.runtime.settings import FlywheelSettings

pytestmark = pytest.mark.unit


def failing_tick() -> None:
    window = {"rows": list(range(5000, 5100))}
    raise ConnectionError(f"registry door at 127.0.0.1:1 not listening ({len(window['rows'])} rows waiting)")


def test_a_logged_exception_is_a_compact_traceback(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(FlywheelSettings(home=tmp_path))
        try:
            failing_tick()
        except ConnectionError:
            logging.getLogger("flywheel.monitor").exception("monitor tick failed")
        err = capsys.readouterr().err
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert "monitor tick failed" in err
    assert "ConnectionError: registry door at 127.0.0.1:1 not listening (100 rows waiting)" in err
    assert "in failing_tick\n    raise ConnectionError(" in err
    assert "5042" not in err, "a frame's locals were printed"
    assert len(err.splitlines()) < 15, err


def test_a_starting_brokers_coordinator_errors_are_dropped_for_a_minute_then_shown() -> None:
    now = [0.0]
    starting = CoordinatorStarting(grace_s=60, clock=lambda: now[0])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka.consumer.group_coordinator", logging.ERROR, __file__, 1, message, (), None)

    unavailable = "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError"
    assert not starting.filter(record(unavailable))
    assert starting.filter(record("Heartbeat failed: [Error 27] RebalanceInProgressError")), "other errors pass"
    now[0] = 60.0
    assert starting.filter(record(unavailable)), "a coordinator missing past the first minute is a fault to see"
