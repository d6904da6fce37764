"""torch's CPU threads follow the cores other processes leave free (services/runtime/cpu.py): measured with a
real busy process beside the test, not assumed from the core count."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from services.runtime import cpu
from services.runtime.cpu import cores, free_cpu_threads, use_free_cpus

pytestmark = pytest.mark.unit


def test_a_core_kept_busy_by_another_process_is_not_counted_as_free() -> None:
    if cores() < 2:
        pytest.fail("this test needs at least two cores to tell a busy one from a free one")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert free_cpu_threads() <= cores() - 1
    finally:
        busy.kill()
        busy.wait()


def test_this_process_own_work_is_not_taken_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # Narrow, on the arithmetic: both cores busy through the sample, all of it this process's own (its
    # engine loading, say): every core is free for its threads. Real load makes this vary; the test above
    # shows the measure against a real process.
    if cores() < 2:
        pytest.fail("this test needs at least two cores")
    readings = iter([100.0, 100.0 + 2 * cpu.SAMPLE_S])
    own = iter([10.0, 10.0 + 2 * cpu.SAMPLE_S])
    monkeypatch.setattr(cpu, "_busy_seconds", lambda: next(readings))
    monkeypatch.setattr(cpu.time, "process_time", lambda: next(own))
    assert free_cpu_threads() == cores()


def test_a_configured_count_or_omp_num_threads_wins_over_the_measure(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert use_free_cpus(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert use_free_cpus() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
