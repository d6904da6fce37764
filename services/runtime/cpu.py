"""How many threads torch gets on the CPU: the cores other work leaves free, measured when compute starts.

torch's default (one thread per core) assumes the cores are idle. On a shared machine its OpenMP workers
wait at every barrier for a peer the scheduler has parked behind another process, and the work collapses:
with ~15 runnable processes on 2 cores one training step took 20 s with one thread and 90 s with two
(bench/results/train-2026-11-22.md); with one core kept busy by another job, an evaluation that takes a
minute on the quiet machine had not finished after fifteen. So an engine load, an evaluation and a
training job first measure what the other processes use (a quarter-second sample of /proc/stat, this
process's own CPU time subtracted) and take the rest, at least one core. OMP_NUM_THREADS, when set, is
the operator's choice and is kept.
"""

from __future__ import annotations

import os
import time

SAMPLE_S = 0.25


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent not idle since boot, or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them; empty where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


def bf16_native() -> bool:
    """Whether matrix products in bfloat16 run on the hardware's own instructions: AMX or AVX-512-BF16 on
    the CPU, or a CUDA GPU that has them. Elsewhere torch emulates bfloat16, slower than float32."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_cpu_threads(sample_s: float = SAMPLE_S) -> int:
    """The cores other processes leave free now, at least one."""
    available = cores()
    busy_before, own_before, started = _busy_seconds(), time.process_time(), time.monotonic()
    if busy_before is None:
        return max(1, min(available, round(available - os.getloadavg()[0])))
    time.sleep(sample_s)
    busy_after, own_after, elapsed = _busy_seconds(), time.process_time(), time.monotonic() - started
    assert busy_after is not None
    others = max(0.0, (busy_after - busy_before) - (own_after - own_before)) / elapsed
    # Half a core of other work still takes a core from a 2-thread barrier: round up what others use.
    return max(1, min(available, available - int(others + 0.5)))


def use_free_cpus(configured: int = 0) -> int:
    """Set torch's intra-op threads to `configured`, else to OMP_NUM_THREADS's choice, else to the free cores; the count."""
    import torch

    if configured:
        threads = configured
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"]) or torch.get_num_threads()
    else:
        threads = free_cpu_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
