"""What a service's benchmark gives `flywheel bench all`: rows of one table of ratios, each measured against
a baseline in the same run. Each service's cli.py declares its BENCHMARKS; the CLI finds them by name."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.runtime.cpu import cpu_flags

Echo = Callable[[str], None]


@dataclass
class Row:
    benchmark: str
    measure: str
    flywheel: float | None
    baseline: float | None
    unit: str
    better: str  # "higher" or "lower": which direction of flywheel/baseline is the improvement
    flywheel_label: str = ""
    baseline_label: str = ""
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.flywheel is None or not self.baseline:
            return None
        return self.flywheel / self.baseline


@dataclass(frozen=True)
class Benchmark:
    """One service's part of `flywheel bench all`: its name in the table, its inputs at each size, how it runs."""

    name: str
    sizes: dict[str, dict[str, Any]]  # "quick" (the CI size) and "full"
    run: Callable[[dict[str, Any], Echo], list[Row]]


# The instruction sets CPU inference and training speed depends on: the same figures on a machine without
# them are not comparable.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def machine() -> dict[str, Any]:
    """What the figures were measured on: they compare only within one run on one machine."""
    import torch

    from services.runtime.inference import engine_dtype
    from services.runtime.settings import FlywheelSettings, load_settings

    meminfo = Path("/proc/meminfo")
    total_kb = (
        next((int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")), 0)
        if meminfo.exists()
        else 0
    )
    memory = f"{total_kb / 2**20:.1f} GiB" if total_kb else None
    cpu = platform.processor() or platform.machine()
    present = cpu_flags()
    flags = [flag for flag in VECTOR_FLAGS if flag in present]
    if Path("/proc/cpuinfo").exists():
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_flags": flags,
        "torch_threads": torch.get_num_threads(),
        "engine_dtype": str(engine_dtype(load_settings(FlywheelSettings).engine_dtype)).removeprefix("torch."),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "memory": memory,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_line(described: dict[str, Any]) -> str:
    """`machine()` as the one line a results file opens with."""
    return (
        f"Machine: {described['cpu']}, {described['cpu_count']} cores, {described['memory']} memory, GPU {described['gpu'] or 'none'}; "
        f"CPU flags {' '.join(described.get('cpu_flags') or []) or 'none of ' + ' '.join(VECTOR_FLAGS)}; "
        f"torch threads {described.get('torch_threads')}; engine dtype {described.get('engine_dtype', 'float32')}; "
        f"{described['platform']}; Python {described['python']}, torch {described['torch']}; load average at start {described['load_average']}."
    )
