"""The pairs `flywheel ops preference-dataset` builds from a model's inferences and their feedback (the
command against a real store and registry: tests/integration/test_ops_preference_dataset.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.monitor.preference_datasets import PairKind, build_pairs, prompt_of
from services.registry.datasets import validate_jsonl

pytestmark = pytest.mark.unit


def row(inference_id: str, answer: str, *, prompt: str = "Refund window?", **feedback: Any) -> dict[str, Any]:
    return {
        "inference_id": inference_id,
        "adapter_version": 1,
        "prompt_version": None,
        "input_messages": "[]",
        "input_text": prompt,
        "output_text": answer,
        "thumbs_up": 0,
        "thumbs_down": 0,
        "up_ids": [],
        "down_ids": [],
        "rating_mean": None,
        "rating_ids": [],
        "correction": "",
        "correction_id": "",
        "choices": [],
    } | feedback


def up(inference_id: str, answer: str, **fields: Any) -> dict[str, Any]:
    return row(inference_id, answer, thumbs_up=1, up_ids=[f"up-{inference_id}"], **fields)


def down(inference_id: str, answer: str, **fields: Any) -> dict[str, Any]:
    return row(inference_id, answer, thumbs_down=1, down_ids=[f"down-{inference_id}"], **fields)


def texts(rows: list[dict[str, Any]], **options: Any) -> list[tuple[str, str, str]]:
    return [(p.kind.value, p.chosen, p.rejected) for p in build_pairs("smol", rows, **options).pairs]


def test_thumbs_pairs_are_bounded_per_prompt_and_kept_apart_by_prompt() -> None:
    rows = [up(f"u{i}", f"good {i}") for i in range(3)] + [down(f"d{i}", f"bad {i}") for i in range(3)]
    rows.append(down("x", "bad 0", prompt="Other question?"))
    assert texts(rows) == [
        ("thumbs", "good 0", "bad 0"),
        ("thumbs", "good 0", "bad 1"),
        ("thumbs", "good 0", "bad 2"),
        ("thumbs", "good 1", "bad 0"),
    ]
    assert len(texts(rows, limit=2)) == 2


def test_mixed_verdicts_same_texts_and_contradictions_give_no_pair() -> None:
    mixed = row("m", "maybe", thumbs_up=1, thumbs_down=1, up_ids=["u"], down_ids=["d"])
    built = build_pairs("smol", [mixed, up("a", "same"), down("b", "same")])
    assert (built.pairs, built.same_text) == ([], 1)
    # Thumbs prefer A, ratings prefer B: the feedback disagrees, so neither pair is taught.
    a = up("a", "A", rating_mean=1.0, rating_ids=["ra"])
    b = down("b", "B", rating_mean=5.0, rating_ids=["rb"])
    built = build_pairs("smol", [a, b])
    assert (built.pairs, built.contradicted) == ([], 2)


def test_ratings_pair_answers_a_point_apart_widest_gap_first() -> None:
    rows = [
        row("a", "A", rating_mean=3.5, rating_ids=["ra"]),
        row("b", "B", rating_mean=4.0, rating_ids=["rb"]),
        row("c", "C", rating_mean=2.0, rating_ids=["rc"]),
    ]
    assert texts(rows) == [("rating", "B", "C"), ("rating", "A", "C")]


def test_a_correction_is_preferred_to_the_answer_it_replaced_and_records_are_valid() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Refund window?"}]
    fixed = row("a", "Ninety days.", input_messages=json.dumps(messages), correction="Thirty days.", correction_id="f")
    built = build_pairs("smol", [fixed, down("b", "Ninety days.")])
    [pair] = built.pairs
    assert pair.record("smol") == {
        "prompt": messages,
        "chosen": "Thirty days.",
        "rejected": "Ninety days.",
        "provenance": {
            "kind": "correction",
            "model_name": "smol",
            "chosen": {"feedback_ids": ["f"]},
            "rejected": {"inference_id": "a", "adapter_version": 1, "prompt_version": None, "feedback_ids": []},
        },
    }
    assert built.counts() == {PairKind.correction: 1, PairKind.pairwise: 0, PairKind.thumbs: 0, PairKind.rating: 0}
    assert validate_jsonl(built.jsonl().encode()) == ("preference", 1)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ('[{"role": "user", "content": "hi"}]', [{"role": "user", "content": "hi"}]),
        # Not a conversation the answers reply to as it stands: the rendered prompt stands in for it.
        (
            '[{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]',
            [{"role": "user", "content": "RENDERED"}],
        ),
        ('[{"role": "assistant", "content": "hi"}]', [{"role": "user", "content": "RENDERED"}]),
        ("not json", [{"role": "user", "content": "RENDERED"}]),
        ("", [{"role": "user", "content": "RENDERED"}]),
    ],
)
def test_the_prompt_is_the_chat_when_it_ends_with_the_user(messages: str, expected: list[dict[str, str]]) -> None:
    assert prompt_of({"input_messages": messages, "input_text": "RENDERED"}) == expected


def chose(feedback_id: str, item_id: str, other: str, *, tie: bool = False, adjudication: bool = False) -> list[str]:
    """A choice as the query returns it, on the row of the answer it is on."""
    return [feedback_id, item_id, other, "1" if tie else "0", "1" if adjudication else "0"]


def test_a_pairwise_item_gives_its_decided_choice_and_nothing_while_undecided_or_tied() -> None:
    agreed = [
        row("a1", "Thirty days.", choices=[chose("f1", "item-a", "a2"), chose("f2", "item-a", "a2")]),
        row("a2", "Ninety days."),
    ]
    adjudicated = [
        row("b1", "Yes.", prompt="Ship to Canada?", choices=[chose("f3", "item-b", "b2")]),
        row(
            "b2",
            "Yes, in a week.",
            prompt="Ship to Canada?",
            choices=[chose("f4", "item-b", "b1"), chose("f5", "item-b", "b1", adjudication=True)],
        ),
    ]
    waiting = [
        row("c1", "Blue.", prompt="Colour?", choices=[chose("f6", "item-c", "c2")]),
        row("c2", "Red.", prompt="Colour?", choices=[chose("f7", "item-c", "c1")]),
    ]
    tied = [
        row("d1", "Hi.", prompt="Hello?", choices=[chose("f8", "item-d", "d2", tie=True)]),
        row("d2", "Hey.", prompt="Hello?"),
    ]
    built = build_pairs("smol", agreed + adjudicated + waiting + tied)
    assert [(p.kind.value, p.chosen, p.rejected, p.provenance["chosen"]["feedback_ids"]) for p in built.pairs] == [
        ("pairwise", "Thirty days.", "Ninety days.", ["f1", "f2"]),
        ("pairwise", "Yes, in a week.", "Yes.", ["f5"]),
    ]
    assert built.pairs[1].provenance["item_id"] == "item-b"
    assert built.pairs[1].provenance["rejected"]["inference_id"] == "b1"
