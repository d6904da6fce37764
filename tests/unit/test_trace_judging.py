"""What `flywheel ops judge` shows its judge and what it refuses: a trace and a session as transcripts (tree
order, indentation, per-step and total bounds with marks, question and answer never cut), the verdict as
feedback, and the command's usage errors (the command against
real Kafka, chDB and SmolLM2 on Triton: tests/integration/test_ops_judge.py)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from services.monitor.cli import app
from services.monitor.trace_judging import (
    ENDS_MAX,
    STEP_TEXT_MAX,
    Level,
    Turn,
    Verdict,
    judge_all,
    session_transcript,
    transcripts_of,
    turn_of,
)
from services.runtime.scoring.judge import Judge, JudgeResult

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(span_id: str, parent: str | None, name: str, start: int, **fields: Any) -> dict[str, Any]:
    """A row as traces.spans_query(text_max=ENDS_MAX) reads it: text cut to ENDS_MAX, full lengths beside."""
    input_text, output_text = fields.get("input_text", ""), fields.get("output_text", "")
    return {
        "span_id": span_id,
        "parent_span_id": parent,
        "name": name,
        "kind": fields.get("kind", "chain"),
        "start_us": start,
        "duration_ms": fields.get("duration_ms", 10.0),
        "status": fields.get("status", "ok"),
        "error": fields.get("error"),
        "input_text": input_text[:ENDS_MAX],
        "input_chars": len(input_text),
        "output_text": output_text[:ENDS_MAX],
        "output_chars": len(output_text),
    }


def rag_trace() -> list[dict[str, Any]]:
    # By start, as the query returns them; the tool call started before the retrieval's sibling LLM call.
    return [
        span(
            "a1",
            None,
            "answer",
            0,
            input_text="Where is order 1182?",
            output_text="It shipped on Monday.",
            duration_ms=900,
        ),
        span(
            "a2",
            "a1",
            "retrieve",
            1000,
            kind="retrieval",
            input_text="order 1182",
            output_text="Orders ship in 2 days.",
        ),
        span("a3", "a1", "lookup_order", 2000, kind="tool", input_text='{"order": 1182}', output_text="shipped"),
        span(
            "a4",
            "a1",
            "chat",
            3000,
            kind="llm",
            input_text='[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where?"}]',
            output_text='{"choices": [{"message": {"role": "assistant", "content": "It shipped\\non Monday."}}]}',
        ),
        span("a5", "a4", "triton", 3100, kind="llm", status="error", error="deadline\nexceeded"),
    ]


def test_a_trace_reads_as_question_steps_in_tree_order_and_answer() -> None:
    text = turn_of(TRACE, rag_trace()).text(3000)
    assert text == "\n".join(
        [
            f"Trace {TRACE}: 5 spans, 900 ms, 1 in error",
            "User question: Where is order 1182?",
            "- answer [chain] 900 ms ok",
            "  input: (the user's question)",
            "  output: (the final answer)",
            "  - retrieve [retrieval] 10 ms ok",
            "    input: order 1182",
            "    output: Orders ship in 2 days.",
            "  - lookup_order [tool] 10 ms ok",
            '    input: {"order": 1182}',
            "    output: shipped",
            "  - chat [llm] 10 ms ok",
            "    input: system: Be brief. | user: Where?",  # a message list, read as turns
            "    output: It shipped on Monday.",  # an OpenAI response, read as its answer, on one line
            "    - triton [llm] 10 ms error, error: deadline exceeded",
            "Final answer: It shipped on Monday.",
        ]
    )


def test_without_text_on_the_root_the_first_input_and_the_last_output_are_question_and_answer() -> None:
    spans = [
        span("b1", None, "pipeline", 0),
        span("b2", "b1", "chat", 10, kind="llm", input_text="Warranty?", output_text="Two years."),
        span("b3", "b1", "rewrite", 20, kind="llm", input_text="Rewrite: Two years.", output_text="It is two years."),
    ]
    turn = turn_of(TRACE, spans)
    assert (turn.question, turn.answer) == ("Warranty?", "It is two years.")
    assert "input: (the user's question)" in turn.steps[1] and "output: (the final answer)" in turn.steps[2]


def test_each_step_and_the_question_and_answer_are_bounded_with_a_mark() -> None:
    long_step, long_question = "x" * 5000, "q" * 4000
    spans = [
        span("c1", None, "answer", 0, input_text=long_question, output_text="Short answer."),
        span("c2", "c1", "retrieve", 10, kind="retrieval", output_text=long_step),
    ]
    # A long OpenAI response whose answer is short: the answer is whole, nothing to mark.
    response = {"choices": [{"message": {"role": "assistant", "content": "Short."}}], "padding": "p" * 800}
    spans.append(span("c3", "c1", "chat", 20, kind="llm", output_text=json.dumps(response)))
    turn = turn_of(TRACE, spans)
    assert turn.question == "q" * ENDS_MAX + f" [... cut: {ENDS_MAX} of 4000 characters shown]"
    assert turn.steps[1].endswith("x" * STEP_TEXT_MAX + f" [... cut: {STEP_TEXT_MAX} of 5000 characters shown]")
    assert turn.steps[2].endswith("  output: Short.")


def test_past_the_budget_middle_steps_are_cut_and_question_and_answer_stay_whole() -> None:
    spans = [span("d0", None, "agent", 0, input_text="What is the refund window?", output_text="Thirty days.")]
    spans += [
        span(f"d{i}", "d0", f"step-{i}", i * 10, kind="tool", input_text=f"call {i}", output_text="y" * 200)
        for i in range(1, 41)
    ]
    text = turn_of(TRACE, spans).text(1500)
    assert len(text) <= 1500
    lines = text.splitlines()
    assert lines[1] == "User question: What is the refund window?" and lines[-1] == "Final answer: Thirty days."
    [mark] = [line for line in lines if "cut to fit" in line]
    kept = [line.strip() for line in lines if line.strip().startswith("- step-")]
    assert mark == f"[... {40 - len(kept)} steps cut to fit the judge's budget ...]"
    # Both ends of the pipeline stay: its first steps and its last ones, in order.
    assert kept[0] == "- step-1 [tool] 10 ms ok" and kept[-1] == "- step-40 [tool] 10 ms ok"
    assert lines.index(mark) < lines.index("  - step-40 [tool] 10 ms ok")


def turn(n: int, steps: int = 2) -> Turn:
    return Turn(
        f"Trace {n:032x}: {steps + 1} spans, 10 ms, 0 in error",
        f"question {n}?",
        [f"- step {n}.{i} [tool] 1 ms ok\n  output: {'z' * 100}" for i in range(steps)],
        f"answer {n}.",
    )


def test_a_session_reads_turn_by_turn_in_time_order() -> None:
    text = session_transcript("conv-1", [turn(1), turn(2), turn(3)], 3000)
    lines = text.splitlines()
    assert lines[0] == "Session conv-1: 3 turns"
    assert [line for line in lines if line.startswith("Turn ")] == ["Turn 1", "Turn 2", "Turn 3"]
    assert [line for line in lines if line.startswith("User question")] == [
        f"User question: question {n}?" for n in (1, 2, 3)
    ]
    assert "- step 3.1 [tool] 1 ms ok" in lines and len(text) <= 3000


def test_a_long_session_drops_steps_then_middle_turns_but_keeps_the_first_question_and_last_answer() -> None:
    text = session_transcript("conv-2", [turn(n, steps=5) for n in range(1, 31)], 900)
    lines = text.splitlines()
    assert not any(line.startswith("- step") for line in lines)
    assert "User question: question 1?" in lines and lines[-1] == "Final answer: answer 30."
    [mark] = [line for line in lines if "turns cut" in line]
    shown = [line for line in lines if line.startswith("Turn ")]
    assert mark == f"[... {30 - len(shown)} turns cut to fit the judge's budget ...]"
    # Even a budget smaller than one turn keeps the session's first question and its last answer.
    tiny = session_transcript("conv-2", [turn(n) for n in range(1, 4)], 10).splitlines()
    assert "User question: question 1?" in tiny and tiny[-1] == "Final answer: answer 3."


def test_a_verdict_is_judge_feedback_on_its_trace_or_session() -> None:
    scored = Verdict.of(Level.trace, TRACE, JudgeResult(0.75, "Score: 4. Grounded.\nmore"), 1, 5)
    assert (scored.rating, scored.reason) == (4, "Score: 4. Grounded.")
    assert scored.feedback("trace-quality@v1", "smollm2") == {
        "trace_id": TRACE,
        "rating": 4,
        "comment": "Score: 4. Grounded.\nmore",
        "tags": ["trace-quality@v1"],
        "source": "judge",
        "actor": "judge:smollm2",
    }
    on_session = Verdict.of(Level.session, "conv-1", JudgeResult(0.0, "Score: 1"), 1, 5)
    assert on_session.feedback("session-quality@v1", "m")["session_id"] == "conv-1"
    unparsed = Verdict.of(Level.trace, TRACE, JudgeResult(None, "I think", "JudgeParseError: no score"), 1, 5)
    assert (unparsed.rating, unparsed.reason) == (None, "JudgeParseError: no score")


def test_targets_without_spans_are_reported_and_the_rest_judged_in_the_order_given() -> None:
    unknown = "f" * 32

    def rows(query: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return rag_trace() if TRACE in json.dumps(query[1]) else []

    transcripts, missing = transcripts_of([(Level.trace, unknown), (Level.trace, TRACE)], rows, 3000)
    assert list(transcripts) == [(Level.trace, TRACE)]
    assert "Where is order 1182?" in transcripts[Level.trace, TRACE]
    assert missing == [Verdict(Level.trace, unknown, None, "", "no spans stored")]

    replies = iter(["Score: 5. Answered from the order lookup.", "no number here"])
    asked: list[str] = []

    async def create(**request: Any) -> Any:
        asked.append(request["messages"][-1]["content"])
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=next(replies)))])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    judge = Judge(client, model="m", rubric="trace-quality@v1")
    second = ("a" * 31 + "1", "Turn text")
    verdicts = asyncio.run(
        judge_all({(Level.trace, TRACE): "first", (Level.trace, second[0]): second[1]}, {Level.trace: judge})
    )
    assert [(v.target, v.rating) for v in verdicts] == [(TRACE, 5), (second[0], None)]
    assert verdicts[1].error is not None and "JudgeParseError" in verdicts[1].error
    assert "first" in asked[0] and "Turn text" in asked[1]


JUDGE_AT = ["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]


@pytest.mark.parametrize(
    ("arguments", "hint", "message"),
    [
        (["--trace-id", "not-a-trace"], "--trace-id", "is not a trace id"),
        (["--trace-id", "0" * 32], "--trace-id", "all-zero trace id"),
        (["--session-id", "has space"], "--session-id", "is not a session id"),
        (["--trace-id", TRACE, "--since", "1h"], "--since", "not both"),
        (["--level", "session", "--name", "answer"], "--name", "use it with --level trace"),
        (["--level", "turn"], "--level", "turn"),
        (["--limit", "201"], "--limit", "less than or equal to 200"),
        (["--trace-id", TRACE, "--rubric", "correctness@v2"], "--rubric", "not a transcript rubric"),
        (["--since", "yesterday"], "--since", "neither a duration nor a time"),
    ],
)
def test_bad_input_is_a_usage_error(arguments: list[str], hint: str, message: str) -> None:
    result = CliRunner().invoke(app, ["ops", "judge", *arguments, *JUDGE_AT])
    assert result.exit_code == 2, result.output
    assert hint in result.output and message in " ".join(result.output.split()), result.output


def test_without_a_judge_endpoint_the_command_says_which_options_to_give() -> None:
    result = CliRunner().invoke(app, ["ops", "judge", "--trace-id", TRACE], env={})
    assert result.exit_code == 2 and "--judge-url and --judge-model" in " ".join(result.output.split())
