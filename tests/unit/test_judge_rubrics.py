"""Rubrics declare the fields their template takes: the golden-set rubrics a question, an answer and a
reference, the transcript rubrics (`flywheel ops judge`) a transcript; a rubric refuses any other, and the
evaluator's golden-set judge refuses a transcript rubric when its settings are read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.evaluator.settings import EvaluatorSettings
from services.runtime.scoring.judge import RUBRICS, Rubric, RubricFieldError, parse_judge_score

pytestmark = pytest.mark.unit


def test_rubrics_take_exactly_their_declared_fields() -> None:
    trace_rubric = RUBRICS["trace-quality@v1"]
    with pytest.raises(RubricFieldError, match="takes transcript; missing transcript; not answer, question"):
        trace_rubric.messages(question="Q?", answer="A.", reference="R.")
    with pytest.raises(RubricFieldError, match="missing reference; not transcript"):
        RUBRICS["correctness@v2"].messages(question="Q?", answer="A.", transcript="T")
    with pytest.raises(RubricFieldError, match="the template uses"):
        Rubric(name="broken", version=1, system="s", user="{question} {transcript}")
    with pytest.raises(RubricFieldError, match="missing answer"):
        Rubric(
            name="broken",
            version=1,
            system="s",
            user="{question} {answer} {reference}",
            examples=(({"question": "q", "reference": "r"}, "Score: 1"),),
        )


@pytest.mark.parametrize("key", ["trace-quality@v1", "session-quality@v1"])
def test_transcript_rubrics_show_a_small_judge_the_format_in_worked_examples(key: str) -> None:
    rubric = RUBRICS[key]
    messages = rubric.messages(transcript="THE TRANSCRIPT")
    assert rubric.grades_transcripts
    assert [m["role"] for m in messages] == ["system", *["user", "assistant"] * 2, "user"]
    assert messages[-1]["content"].endswith("\nTHE TRANSCRIPT")
    assert [parse_judge_score(m["content"]) for m in messages if m["role"] == "assistant"] == [5.0, 1.0]


def test_the_evaluators_golden_set_judge_refuses_a_transcript_rubric() -> None:
    assert EvaluatorSettings(judge_rubric="correctness@v2").judge_rubric == "correctness@v2"
    with pytest.raises(ValidationError, match="grades traces and sessions"):
        EvaluatorSettings(judge_rubric="trace-quality@v1")
