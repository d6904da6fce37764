"""Named failpoints: off unless FLYWHEEL_FAILPOINTS arms them, a malformed value is refused naming the
fix, an armed crash point kills the process on its Nth pass (seen from outside, in a subprocess), and a
fail-while-exists point raises the error its code names while its file exists, at run time."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime import failpoints
from services.runtime.errors import ConfigurationError

pytestmark = pytest.mark.unit


def test_nothing_is_armed_without_the_variable() -> None:
    assert failpoints.parse("") == {}


def test_a_spec_arms_a_known_point_on_its_nth_pass() -> None:
    assert failpoints.parse("consumer.batch.after_handler=crash@3") == {
        "consumer.batch.after_handler": failpoints.Armed("crash", nth=3)
    }
    assert failpoints.parse(" consumer.batch.after_handler=crash ,") == {
        "consumer.batch.after_handler": failpoints.Armed("crash", nth=1)
    }


def test_a_spec_arms_an_outage_while_a_file_exists_beside_a_crash() -> None:
    assert failpoints.parse(
        "consumer.batch.after_handler=crash@2,feedback.clickhouse_unavailable=fail-while-exists:/tmp/x/down"
    ) == {
        "consumer.batch.after_handler": failpoints.Armed("crash", nth=2),
        "feedback.clickhouse_unavailable": failpoints.Armed("fail-while-exists", path=Path("/tmp/x/down")),
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("consumer.batch.after_handlr=crash", "unknown failpoint 'consumer.batch.after_handlr'"),
        ("consumer.batch.after_handler=hang", "must read consumer.batch.after_handler=crash"),
        ("consumer.batch.after_handler=crash@0", "N >= 1"),
        ("consumer.batch.after_handler=crash@x", "N >= 1"),
        ("consumer.batch.after_handler=crash@", "N >= 1"),
        # Each point takes the actions its tests were written for: an outage at the commit point means nothing.
        ("consumer.batch.after_handler=fail-while-exists:/tmp/down", "must read consumer.batch.after_handler=crash"),
        ("feedback.clickhouse_unavailable=crash", "must read feedback.clickhouse_unavailable=fail-while-exists:PATH"),
        ("feedback.clickhouse_unavailable=fail-while-exists:", "fail-while-exists:PATH"),
        ("feedback.clickhouse_unavailable=fail-while-exists", "fail-while-exists:PATH"),
    ],
)
def test_a_malformed_spec_is_refused_naming_the_fix(spec: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match="FLYWHEEL_FAILPOINTS") as error:
        failpoints.parse(spec)
    assert message in str(error.value)


def test_an_armed_point_kills_the_process_on_its_nth_pass() -> None:
    program = (
        "from services.runtime import failpoints\n"
        "for n in range(1, 5):\n"
        "    print(n, flush=True)\n"
        "    failpoints.hit('consumer.batch.after_handler')\n"
    )
    env = {"FLYWHEEL_FAILPOINTS": "consumer.batch.after_handler=crash@3", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["1", "2", "3"]


def test_an_outage_point_raises_the_named_error_only_while_its_file_exists(tmp_path: Path) -> None:
    switch = tmp_path / "down"
    failpoints.arm(f"feedback.clickhouse_unavailable=fail-while-exists:{switch}")
    try:
        failpoints.hit("feedback.clickhouse_unavailable", raises=ConnectionError)  # no file: no outage
        switch.touch()
        with pytest.raises(ConnectionError, match=f"failpoint feedback.clickhouse_unavailable: {switch} exists"):
            failpoints.hit("feedback.clickhouse_unavailable", raises=ConnectionError)
        switch.unlink()
        failpoints.hit("feedback.clickhouse_unavailable", raises=ConnectionError)
    finally:
        failpoints.arm("")
