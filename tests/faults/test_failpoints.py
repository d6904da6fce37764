"""Named failpoints: off unless FLYWHEEL_FAILPOINTS arms them, a malformed value is refused naming the
fix, and an armed point kills the process on its Nth pass (seen from outside, in a subprocess)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from services.runtime import failpoints
from services.runtime.errors import ConfigurationError

pytestmark = pytest.mark.unit


def test_nothing_is_armed_without_the_variable() -> None:
    assert failpoints.parse("") == {}


def test_a_spec_arms_a_known_point_on_its_nth_pass() -> None:
    assert failpoints.parse("consumer.batch.after_handler=crash@3") == {"consumer.batch.after_handler": 3}
    assert failpoints.parse(" consumer.batch.after_handler=crash ,") == {"consumer.batch.after_handler": 1}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("consumer.batch.after_handlr=crash", "unknown failpoint 'consumer.batch.after_handlr'"),
        ("consumer.batch.after_handler=hang", "must read consumer.batch.after_handler=crash"),
        ("consumer.batch.after_handler=crash@0", "N >= 1"),
        ("consumer.batch.after_handler=crash@x", "N >= 1"),
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
