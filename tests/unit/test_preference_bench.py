"""`flywheel bench preference` builds its DPO pairs from the demo's corrections and the answers they replaced:
records the registry accepts as a preference dataset, so the same file could be published and trained."""

from __future__ import annotations

import json

import pytest

from services.evaluator.preference_bench import chosen_facts, correction_pairs, rows_about
from services.registry.datasets import validate_jsonl

pytestmark = pytest.mark.unit

SYSTEM = {"role": "system", "content": "You are Acme Nimbus hub support."}


def correction(question: str, answer: str) -> dict:
    return {"messages": [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_a_correction_is_chosen_over_the_answer_it_replaced() -> None:
    corrections = [correction("How do I reset the hub?", "Hold Sync for 12 seconds.")]

    (pair,) = correction_pairs(corrections, ["Unplug it and hope."], "smollm2-135m-instruct")

    assert pair["prompt"] == corrections[0]["messages"][:-1]
    assert (pair["chosen"], pair["rejected"]) == ("Hold Sync for 12 seconds.", "Unplug it and hope.")
    assert pair["provenance"]["kind"] == "correction"
    assert validate_jsonl((json.dumps(pair) + "\n").encode()) == ("preference", 1)


def test_a_correction_that_changes_nothing_or_replaces_no_answer_makes_no_pair() -> None:
    corrections = [correction("Reset?", "Hold Sync for 12 seconds."), correction("Reboot?", "Press Sync twice.")]

    assert correction_pairs(corrections, [" Hold Sync for 12 seconds. ", "  "], "m") == []


def test_the_facts_are_the_first_distinct_golden_answers_and_select_their_rows() -> None:
    golden = [correction("q1", "A"), correction("q2", "A"), correction("q3", "B"), correction("q4", "C")]
    training = [correction("t1", "C"), correction("t2", "A"), correction("t3", "B")]

    facts = chosen_facts(golden, 2)

    assert facts == {"A", "B"}
    assert [row["messages"][1]["content"] for row in rows_about(training, facts)] == ["t2", "t3"]
