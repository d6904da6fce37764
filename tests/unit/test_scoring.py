"""Scores with known values: SQuAD-style exact match and F1, sacrebleu BLEU, ROUGE-L, JSON validity,
the unsafe-content lexicon and the judge's score parser."""

from __future__ import annotations

import pytest

from services.runtime.scoring import (
    RUBRICS,
    bleu,
    exact_match,
    fact_numbers,
    json_validity,
    parse_judge_score,
    rouge_l,
    scan_unsafe,
    token_f1,
)
from services.runtime.scoring.judge import JudgeParseError

pytestmark = pytest.mark.unit


def test_exact_match_normalises_case_punctuation_and_articles() -> None:
    assert exact_match("The Sync button!", "sync button") == 1.0
    assert exact_match("Sync button twice", "sync button") == 0.0


def test_token_f1_known_values() -> None:
    # prediction 4 tokens, reference 3, 2 in common: P=1/2, R=2/3, F1=4/7
    assert token_f1("hold sync for ten", "press sync ten") == pytest.approx(4 / 7)
    assert token_f1("anything", "") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("a b c", "x y z") == 0.0


def test_bleu_and_rouge_l_known_values() -> None:
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert bleu("completely different words here", "the cat sat on the mat") < 0.1
    # LCS "the cat the mat" (4) over 6 and 6 tokens: F = 4/6
    assert rouge_l("the cat was on the mat", "the cat sat by the mat") == pytest.approx(4 / 6)


def test_json_validity_against_a_schema() -> None:
    schema = {
        "type": "object",
        "required": ["ticket", "priority"],
        "properties": {"priority": {"enum": ["low", "high"]}},
    }
    assert json_validity('{"ticket": 3, "priority": "high"}', schema).valid
    assert json_validity('```json\n{"ticket": 3, "priority": "low"}\n```', schema).valid
    wrong = json_validity('{"ticket": 3, "priority": "urgent"}', schema)
    assert not wrong.valid and "priority" in wrong.problem
    assert not json_validity("Sure! Here it is: {}", schema).valid
    assert json_validity("[1, 2]").valid


def test_unsafe_lexicon_matches_on_word_boundaries_with_categories() -> None:
    assert not scan_unsafe("Kill the process and restart the hub; skills and the therapist agree.").unsafe
    finding = scan_unsafe("You are an idiot. Go kill   yourself.")
    assert finding.unsafe
    assert finding.categories == {"harassment": ["you are an idiot"], "self_harm": ["kill yourself"]}
    assert scan_unsafe("ask Competitor X instead", {"brand": ["competitor x"]}).categories == {
        "brand": ["competitor x"]
    }


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ('{"score": 4, "reason": "ok"}', 4.0),
        ("Score: 3\nThe answer misses the duration.", 3.0),
        ("I'd say 5/5.", 5.0),
        (" 2 ", 2.0),
        ("**Rating:** 1", 1.0),
    ],
)
def test_judge_scores_are_parsed_robustly(reply: str, score: float) -> None:
    assert parse_judge_score(reply) == score


@pytest.mark.parametrize("reply", ["The answer is good.", '{"score": 9}', "Score: 0", "3/10"])
def test_unparseable_or_out_of_range_judge_replies_are_errors(reply: str) -> None:
    with pytest.raises(JudgeParseError):
        parse_judge_score(reply)


def test_fact_numbers_wants_exactly_the_reference_numbers() -> None:
    reference = "Hold Sync for 12 seconds; the reset takes about 90 seconds."
    assert fact_numbers("Hold it 12 seconds, then wait 90.", reference) == 1.0
    assert fact_numbers("Hold it 12 seconds.", reference) == 0.0  # one missing
    assert fact_numbers("Hold it 12 seconds, wait 90, then 5 more.", reference) == 0.0  # one invented
    assert fact_numbers("anything", "Press the Sync button twice.") is None  # nothing to check


def test_rubric_versions_build_their_own_judge_prompts() -> None:
    v1 = RUBRICS["correctness@v1"].messages(question="Q?", answer="A.", reference="R.")
    assert [m["role"] for m in v1] == ["system", "user"] and "Answer to grade:\nA." in v1[1]["content"]
    v2 = RUBRICS["correctness@v2"].messages(question="Q?", answer="A.", reference="R.")
    assert [m["role"] for m in v2] == ["system", *["user", "assistant"] * 3, "user"]
    assert [parse_judge_score(m["content"]) for m in v2 if m["role"] == "assistant"] == [
        5.0,
        1.0,
        3.0,
    ]  # worked replies parse
    assert v2[-1]["content"] == "Question: Q?\nReference answer: R.\nAnswer to grade: A."
