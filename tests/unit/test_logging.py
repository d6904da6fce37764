"""A service's logged exception reads as type, message and stack, without every frame's locals."""

from __future__ import annotations

import logging

import pytest

from services.runtime.logging import configure_logging
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
