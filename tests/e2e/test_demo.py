"""`flywheel demo`, the README's main job, from a fresh data directory: the seven steps of the loop on
real components (local Kafka, embedded ClickHouse, SQLite registry, Triton, SmolLM2), a report, and
no process or port left behind. Twice, because a second run reuses what exists.

Slow: the first run trains two LoRA adapters and evaluates them on a CPU (18 minutes on a quiet
2-core machine, more on a shared one); the second reuses them. FLYWHEEL_DEMO_TEST_RUNS=1 runs once."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from infra.processes import port_is_free
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.loop, pytest.mark.timeout(7200)]

STEPS = 7


def run_demo(home: Path) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "flywheel"), "demo", "--home", str(home)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3500,
    )


def test_the_demo_closes_the_loop_reports_and_cleans_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for attempt in range(1, int(os.environ.get("FLYWHEEL_DEMO_TEST_RUNS", "2")) + 1):
        result = run_demo(home)
        summary_path = home / "reports" / "demo-summary.txt"
        summary = summary_path.read_text() if summary_path.exists() else "(no summary written)"
        assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
        assert result.returncode == 0, summary + result.stderr[-3000:]

        passed = re.findall(r"^\[PASS\] step (\d)", summary, flags=re.MULTILINE)
        assert passed == [str(n) for n in range(1, STEPS + 1)], summary
        # Step 3: the first adapter passed the gate against the base model; the run that promoted it reads its approval back.
        assert re.search(
            r"^gate adapter v1 vs the base model on acme-golden:v1 \(facts@v1\): PASS", summary, flags=re.MULTILINE
        ), summary
        if attempt == 1:
            assert re.search(
                r"^audit: .* adapter\.stage\.production smollm2-135m-instruct:v1 approver demo-approver",
                summary,
                flags=re.MULTILINE,
            ), summary
        # Steps 4-5: every inference and every review stored once in ClickHouse.
        stored = re.search(r"inference_log: (\d+) events, (\d+) rows read without FINAL \(duplicates: 0\)", summary)
        assert stored and int(stored[1]) > 0, summary
        assert re.search(r"feedback in ClickHouse: (\d+) events, (\d+) with corrections", summary), summary
        if attempt == 1:
            # Steps 6-7: the alert caused a retraining on corrections; v2 beat v1, went canary then full, and was rolled back.
            assert re.search(r"^alert: demo-thumbs-down-rate thumbs_down_rate", summary, flags=re.MULTILINE), summary
            assert "provenance feedback" in summary
            assert re.search(
                r"^gate adapter v2 vs adapter v1 on acme-golden:v2 \(facts@v1\): PASS", summary, flags=re.MULTILINE
            ), summary
            assert re.search(
                r"^traffic step 7: canary 50%: .*smollm2-135m-instruct:v1 \d+, smollm2-135m-instruct:v2 \d+",
                summary,
                flags=re.MULTILINE,
            ), summary
            assert "after rollback: 8 requests served by smollm2-135m-instruct:v1" in summary
        else:
            assert "(reused)" in (home / "reports" / "demo-report.html").read_text() or ", reused)" in summary
        assert "final production version: smollm2-135m-instruct:v1" in summary

        html = (home / "reports" / "demo-report.html").read_text()
        assert html.count("<svg") >= 3 and "Gate decisions" in html

        assert not (home / "infra" / "kafka" / "state.json").exists(), "the demo must stop the broker it started"
        for kind, port in re.findall(
            r"^cleanup: (kafka stopped|services stopped); (?:http )?port (\d+) free$", summary, flags=re.MULTILINE
        ):
            assert port_is_free(int(port)), f"{kind}: port {port} still in use"
        assert len(re.findall(r"^cleanup: .* free$", summary, flags=re.MULTILINE)) == 2, summary
