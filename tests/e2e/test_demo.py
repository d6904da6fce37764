"""`flywheel demo`, the README's main job, from a fresh data directory: it runs on real components,
reports, and leaves no process or port behind. Twice, because a second run reuses what exists."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from infra.processes import port_is_free, process_alive
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def run_demo(home: Path) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")}
    return subprocess.run([str(REPO / ".venv" / "bin" / "flywheel"), "demo", "--home", str(home)], capture_output=True, text=True, env=env, timeout=540)


def test_the_demo_runs_reports_and_cleans_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for attempt in (1, 2):
        result = run_demo(home)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Traceback" not in result.stdout + result.stderr
        summary = (home / "reports" / "demo-summary.txt").read_text()
        assert "consumed once each: 17" in summary
        assert "duplicates skipped: 1; dead-lettered: 1" in summary
        assert "inference_log" in summary and "feedback" in summary
        if attempt == 2:
            assert "migrations applied this run: none (already up to date)" in summary

        state = home / "infra" / "kafka"
        assert not (state / "state.json").exists(), "the demo must stop the broker it started"
        assert (state / "broker.log").exists(), "the demo started no local broker"
        kafka_line = next(line for line in summary.splitlines() if line.startswith("kafka: "))
        _, address, _, pid, *_ = kafka_line.split()
        assert not process_alive(int(pid)), f"broker pid {pid} still runs"
        assert port_is_free(int(address.rsplit(":", 1)[1]))
