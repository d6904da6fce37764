"""How far reviewers agree: Krippendorff's alpha (nominal, ordinal or interval values), Cohen's kappa when
exactly two reviewers judged the same units, each reviewer's weight on the result, and the units they
disagree on. Used by `flywheel ops agreement` (the monitor) and by the review queues (the feedback service).

Written here rather than taken from a package: the maintained implementation on PyPI (`krippendorff`) is
GPL-3.0, which an Apache-2.0 project cannot depend on, and alpha is one coincidence matrix and a sum.
The formulas are Krippendorff's ("Computing Krippendorff's Alpha-Reliability", 2011); his worked example
is a unit test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float64]

# A unit (a target) with its values, one per reviewer; a unit with fewer than two values pairs with nothing.
Units = Mapping[Hashable, Mapping[str, float | str]]


class Scale(StrEnum):
    """How values differ: nominal (same or not), ordinal (by how many values lie between), interval (by
    their distance)."""

    nominal = "nominal"
    ordinal = "ordinal"
    interval = "interval"


def alpha(units: Units, scale: Scale) -> float | None:
    """Krippendorff's alpha over the units' pairable values; None when no unit has two values, or when
    every pairable value is the same (there is no variation to agree on)."""
    values = [list(by_reviewer.values()) for by_reviewer in units.values() if len(by_reviewer) >= 2]
    if not values:
        return None
    categories = sorted({value for unit in values for value in unit}, key=_order_key)
    index = {category: position for position, category in enumerate(categories)}
    coincidences = np.zeros((len(categories), len(categories)))
    for unit in values:
        counts = np.bincount([index[value] for value in unit], minlength=len(categories)).astype(float)
        # Each ordered pair of values from different reviewers of the unit, weighted 1 / (m_u - 1).
        coincidences += (np.outer(counts, counts) - np.diag(counts)) / (len(unit) - 1)
    totals = coincidences.sum(axis=1)
    pairable = totals.sum()
    distance = _squared_distances(categories, totals, scale)
    expected = float(np.outer(totals, totals).ravel() @ distance.ravel())
    if expected == 0:
        return None
    observed = float(coincidences.ravel() @ distance.ravel())
    return float(1 - (pairable - 1) * observed / expected)


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two reviewers' values on the same targets, in order; None when chance alone
    explains every agreement (both gave one same value throughout)."""
    if len(first) != len(second) or not first:
        raise ValueError("kappa needs the two reviewers' values on the same, non-empty list of targets")
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / len(first)
    shares_first, shares_second = _shares(first), _shares(second)
    by_chance = sum(share * shares_second.get(value, 0.0) for value, share in shares_first.items())
    if by_chance == 1:
        return None
    return (observed - by_chance) / (1 - by_chance)


@dataclass(frozen=True)
class Agreement:
    """One dimension's agreement: alpha over every reviewer, kappa when there are exactly two, each
    reviewer's alpha without them, and the units in conflict."""

    dimension: str
    scale: Scale
    alpha: float | None
    kappa: float | None
    units: int  # units with at least two reviewers' values
    reviewers: tuple[str, ...]
    alpha_without: dict[str, float | None]
    conflicts: list[tuple[Hashable, dict[str, float | str]]]


def agreement(dimension: str, units: Units, scale: Scale, *, conflict_spread: float = 0) -> Agreement:
    """Everything `flywheel ops agreement` says of one dimension. A unit is in conflict when its values
    differ (nominal) or span more than `conflict_spread` (ordinal, interval)."""
    paired = {unit: dict(values) for unit, values in units.items() if len(values) >= 2}
    reviewers = tuple(sorted({reviewer for values in paired.values() for reviewer in values}))
    kappa = None
    if len(reviewers) == 2:  # then every paired unit holds both reviewers' values
        first, second = reviewers
        kappa = cohen_kappa(
            [values[first] for values in paired.values()], [values[second] for values in paired.values()]
        )
    without = {
        reviewer: alpha(
            {unit: {r: v for r, v in values.items() if r != reviewer} for unit, values in paired.items()}, scale
        )
        for reviewer in reviewers
    }
    conflicts = [
        (unit, values) for unit, values in paired.items() if in_conflict(values.values(), scale, conflict_spread)
    ]
    return Agreement(dimension, scale, alpha(paired, scale), kappa, len(paired), reviewers, without, conflicts)


def _squared_distances(categories: list[float | str], totals: Matrix, scale: Scale) -> Matrix:
    size = len(categories)
    if scale is Scale.nominal:
        return np.asarray(1 - np.eye(size), dtype=float)
    if scale is Scale.interval:
        points = np.asarray(categories, dtype=float)
        return np.asarray((points[:, None] - points[None, :]) ** 2, dtype=float)
    # Ordinal: the values' ranks, each the midpoint of its own frequency among all pairable values.
    cumulative = np.concatenate(([0.0], np.cumsum(totals)))
    distance = np.zeros((size, size))
    for c in range(size):
        for k in range(c, size):
            between = cumulative[k + 1] - cumulative[c] - (totals[c] + totals[k]) / 2
            distance[c, k] = distance[k, c] = between**2
    return distance


def in_conflict(values: Iterable[float | str], scale: Scale, spread: float) -> bool:
    """Whether values disagree: any two differ (nominal), or they span more than `spread` (ordinal, interval)."""
    distinct = set(values)
    if scale is Scale.nominal or len(distinct) < 2:
        return len(distinct) > 1
    numbers = [float(value) for value in distinct]
    return max(numbers) - min(numbers) > spread


def _shares(values: Sequence[Hashable]) -> dict[Hashable, float]:
    return {value: count / len(values) for value, count in Counter(values).items()}


def _order_key(value: float | str) -> tuple[int, float | str]:
    return (0, value) if isinstance(value, int | float) else (1, value)
