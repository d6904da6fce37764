"""Reviewer agreement (services/monitor/agreement.py) against values computed by hand: Krippendorff's own
worked example, and a small thumbs example worked through in the docstring of its test."""

from __future__ import annotations

import math

import pytest

from services.monitor.agreement import units_of
from services.runtime.agreement import Scale, agreement, alpha, cohen_kappa

pytestmark = pytest.mark.unit

# Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011), section C: four observers, twelve
# units, values 1 to 5, missing values left out. He reports nominal 0.743, ordinal 0.815, interval 0.849.
_OBSERVED = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}
KRIPPENDORFF = {
    unit: {observer: values[unit] for observer, values in _OBSERVED.items() if values[unit] is not None}
    for unit in range(12)
}


@pytest.mark.parametrize(
    ("scale", "published"), [(Scale.nominal, 0.743), (Scale.ordinal, 0.815), (Scale.interval, 0.849)]
)
def test_alpha_reproduces_krippendorffs_worked_example(scale: Scale, published: float) -> None:
    # Unit 12 has one value: it pairs with nothing and must not count.
    assert round(alpha(KRIPPENDORFF, scale) or math.nan, 3) == published


def test_two_reviewers_thumbs_give_the_hand_computed_alpha_and_kappa() -> None:
    """Five answers, two reviewers, who differ on one (u2).

    Alpha: every unit has two values, so each ordered pair weighs 1/(2-1) = 1. Coincidences: up-up 4 (u1,
    u4), down-down 4 (u3, u5), up-down 1 and down-up 1 (u2); n_up = n_down = 5, n = 10. Nominal: alpha =
    1 - (n - 1) * (1 + 1) / (n_up * n_down * 2) = 1 - 9 * 2 / 50 = 0.64.
    Kappa: observed agreement 4/5; rita says up 3/5, sam 2/5, so by chance 0.6 * 0.4 + 0.4 * 0.6 = 0.48;
    kappa = (0.8 - 0.48) / (1 - 0.48) = 8/13."""
    rows = [
        {"target": unit, "actor": actor, "thumbs": value}
        for unit, rita, sam in [
            ("u1", "up", "up"),
            ("u2", "up", "down"),
            ("u3", "down", "down"),
            ("u4", "up", "up"),
            ("u5", "down", "down"),
        ]
        for actor, value in (("rita", rita), ("sam", sam))
    ]
    measured = agreement("thumbs", units_of(rows, "thumbs"), Scale.nominal)

    assert measured.alpha == pytest.approx(0.64)
    assert measured.kappa == pytest.approx(8 / 13)
    assert (measured.units, measured.reviewers) == (5, ("rita", "sam"))
    assert measured.conflicts == [("u2", {"rita": "up", "sam": "down"})]
    # Without one of two reviewers no target has two values: there is nothing to agree on.
    assert measured.alpha_without == {"rita": None, "sam": None}


def test_a_reviewer_who_disagrees_with_the_rest_is_the_one_whose_absence_raises_alpha() -> None:
    units = {
        unit: {"rita": value, "sam": value, "tom": 6 - value if unit % 2 else value}
        for unit, value in enumerate([1, 2, 4, 5, 1, 5, 2, 4])
    }
    measured = agreement("rating", units, Scale.ordinal, conflict_spread=1)

    assert measured.alpha is not None and measured.alpha < 1
    assert measured.alpha_without["tom"] == pytest.approx(1.0)
    assert max(measured.alpha_without, key=lambda reviewer: measured.alpha_without[reviewer] or -1) == "tom"
    # Ratings one step apart are not a conflict, two or more are: 2 against 4, 5 against 1 ...
    assert {unit for unit, _ in measured.conflicts} == {1, 3, 5, 7}
    assert measured.kappa is None, "kappa is for exactly two reviewers"


def test_a_reviewers_latest_value_on_a_target_counts_and_empty_values_do_not() -> None:
    rows = [
        {"target": "t", "actor": "rita", "rating": 2},
        {"target": "t", "actor": "rita", "rating": 4},  # she changed her mind: the later one counts
        {"target": "t", "actor": "sam", "rating": 4},
        {"target": "t", "actor": "tom", "rating": None},
    ]
    assert units_of(rows, "rating") == {"t": {"rita": 4, "sam": 4}}


def test_no_pairable_values_or_no_variation_give_no_figure_rather_than_a_false_one() -> None:
    assert alpha({"t": {"rita": 3}}, Scale.interval) is None
    assert alpha({"t": {"rita": 3, "sam": 3}, "u": {"rita": 3, "sam": 3}}, Scale.interval) is None
    assert cohen_kappa(["up", "up"], ["up", "up"]) is None
    assert alpha({"t": {"rita": 1, "sam": 1}, "u": {"rita": 5, "sam": 5}}, Scale.interval) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same, non-empty list"):
        cohen_kappa(["up"], [])


def test_the_command_prints_each_dimension_each_reviewer_and_the_conflicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The printout alone, over rows as the store gives them (the query against the real store and door:
    tests/integration/test_reviewer_agreement.py)."""
    from typer.testing import CliRunner

    from services.monitor import cli

    stored = [
        ("inference:u1", "rita", "up", 4),
        ("inference:u1", "sam", "up", 5),
        ("inference:u2", "rita", "up", 1),
        ("inference:u2", "sam", "down", 4),
        ("inference:u3", "rita", "down", 2),
        ("inference:u3", "sam", "down", 2),
    ]
    asked: list[tuple[str, dict[str, object]]] = []

    def run_query(sql: str, parameters: dict[str, object]) -> tuple[list[str], list[list[object]]]:
        asked.append((sql, parameters))
        return ["target", "actor", "thumbs", "rating"], [list(row) for row in stored]

    monkeypatch.setattr(cli, "run_query", run_query)
    result = CliRunner().invoke(cli.app, ["ops", "agreement", "--since", "7d", "--model", "smollm2"])

    assert result.exit_code == 0, result.output
    assert asked[0][1]["model_name"] == "smollm2"
    lines = [" ".join(line.replace("│", " ").split()) for line in result.output.splitlines()]
    units = {
        unit: {"rita": rita, "sam": sam}
        for unit, rita, sam in [("u1", "up", "up"), ("u2", "up", "down"), ("u3", "down", "down")]
    }
    assert f"thumbs nominal {alpha(units, Scale.nominal):.3f}" in " ".join(lines)
    assert "thumbs: 1 targets in conflict" in " ".join(lines)
    assert "rating: 1 targets in conflict" in " ".join(lines), "1 against 4 is a conflict, 4 against 5 is not"
    assert any(line.startswith("inference:u2 rita: 1, sam: 4") for line in lines)


def test_the_command_says_where_reviewer_feedback_comes_from_when_there_is_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from services.monitor import cli
    from services.runtime.errors import FlywheelError

    monkeypatch.setattr(cli, "run_query", lambda sql, parameters: (["target", "actor", "thumbs", "rating"], []))
    result = CliRunner().invoke(cli.app, ["ops", "agreement"])
    # The CLI's entry point prints a FlywheelError as one line, no traceback.
    assert isinstance(result.exception, FlywheelError)
    assert "no reviewer's thumbs or rating since 30d" in str(result.exception)
