"""What a service's benchmark gives `flywheel bench all`: rows of one table of ratios, each measured against
a baseline in the same run. Each service's cli.py declares its BENCHMARKS; the CLI finds them by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
