"""`flywheel ops drift` as a user runs it, with nothing serving: the drift values a monitor stored in
ClickHouse (migration 0006), firing or not, read on the store opened read-only. Subprocesses, because
chDB lets one process own a data directory and the tests' own directory is taken."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")

# A monitor's process wrote these: two ticks of a PSI rule (the second firing) and a thumbs-down rule, which is no drift.
SEED = """
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.monitor.store import MonitorStore
from services.runtime.clickhouse import open_clickhouse

now = datetime.now(UTC)
with open_clickhouse(None, Path(sys.argv[1])) as store:
    store.migrate()
    def row(n, rule, metric, kind, value, firing):
        end = now - timedelta(minutes=10 * n)
        return {"evaluation_id": f"e{n}{rule}", "evaluated_at": end, "rule_name": rule, "rule_version": 1, "metric": metric, "kind": kind, "model_name": "smollm2",
                "adapter_version": 1, "prompt_version": None, "window_start": end - timedelta(minutes=10), "window_end": end, "value": value, "samples": 60, "firing": firing, "reason": ""}
    MonitorStore(lambda: store, lambda: store).write_evaluations([
        row(2, "prompt-tokens-drift", "prompt_tokens_psi", "psi", 0.0123, False),
        row(1, "prompt-tokens-drift", "prompt_tokens_psi", "psi", 0.4567, True),
        row(1, "thumbs-down", "thumbs_down_rate", "sql", 0.9, True),
    ])
"""


def test_ops_drift_lists_stored_drift_evaluations_over_time(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        idle_port = probe.getsockname()[1]
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_HTTP_PORT": str(idle_port),
        "COLUMNS": "250",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    subprocess.run([sys.executable, "-c", SEED, str(home)], cwd=REPO, env=env, check=True, timeout=180)

    done = subprocess.run(
        [FLYWHEEL, "ops", "drift", "--hours", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )

    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "prompt-tokens-drift" in line]
    assert (
        len(lines) == 2 and "0.4567" in lines[0] and "True" in lines[0] and "0.0123" in lines[1] and "False" in lines[1]
    ), done.stdout
    assert "thumbs-down" not in done.stdout, "a thumbs-down rate is not drift"
