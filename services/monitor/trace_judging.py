"""A trace or a session as the transcript an LLM judge reads (`flywheel ops judge`), and the judge's verdict
as feedback on it.

A trace reads as its user's question, its spans in tree order (traces.tree_order), indented, each with
kind, name, duration, status and error and its input and output, then its final answer. A session reads
as its traces in time order, one turn each. Each step's text is bounded, and the transcript as a whole:
a small judge's context is short (the gateway takes 1,536 prompt tokens by default). What is cut says so
in the text, and the question and the answer are never what is cut to fit: the middle steps (then the
middle turns) give way first.

The module reads through the `rows` function it is given (the CLI's query door or store) and opens nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from services.monitor.span_datasets import input_messages, output_text
from services.monitor.traces import (
    MAX_TREE_SPANS,
    SessionFilter,
    TraceFilter,
    sessions_query,
    spans_query,
    traces_query,
)
from services.runtime.span_tree import tree_order
from services.runtime.scoring.judge import Judge, JudgeResult

Rows = Callable[[tuple[str, dict[str, Any]]], list[dict[str, Any]]]


class Level(StrEnum):
    """What one judgement is about."""

    trace = "trace"
    session = "session"


# One thing judged: a trace by its trace id, or a session by its session id.
Target = tuple[Level, str]

DEFAULT_RUBRICS = {Level.trace: "trace-quality@v1", Level.session: "session-quality@v1"}

# Traces or sessions one run judges at most: each is a model call, and a run prints one table.
MAX_JUDGED = 200
# Turns of a session read at most, half from its start and half from its end.
MAX_TURNS = 50
# The question and the answer are read up to this many characters; a step's input or output shows fewer.
ENDS_MAX = 1500
STEP_TEXT_MAX = 300
DEFAULT_BUDGET = 3000
MIN_BUDGET, MAX_BUDGET = 500, 32_000
# What a verdict keeps of the judge's reply: its first line in the table, more in the stored comment.
REASON_MAX = 160
COMMENT_MAX = 2000


@dataclass(frozen=True)
class Turn:
    """One trace, ready to render: its question and answer kept whole (to ENDS_MAX), its steps one block each."""

    header: str
    question: str
    steps: list[str]
    answer: str

    def text(self, room: int) -> str:
        """The turn in about `room` characters: question, the steps that fit (first and last kept first), answer."""
        ends = f"User question: {self.question}\nFinal answer: {self.answer}"
        steps = fit(self.steps, room - len(self.header) - len(ends) - 2, "step")
        return "\n".join([self.header, f"User question: {self.question}", *steps, f"Final answer: {self.answer}"])


def flat(text: str) -> str:
    # One line per field: the indentation is the tree, and a newline in the app's text would break it.
    return " ".join(text.split())


def cut(text: str, limit: int, total: int | None = None) -> str:
    """`text` to `limit` characters, saying how much there was when anything is left out (`total`: the
    length stored, when the query read only a prefix of it)."""
    total = max(total or 0, len(text))
    if total <= limit:
        return text
    return f"{text[:limit]} [... cut: {limit} of {total} characters shown]"


def stored_length(span: dict[str, Any], field: str) -> int | None:
    """The stored length of the span's input or output when the query read only a prefix of it, else None:
    a whole text may read shorter than stored (an answer taken out of a JSON response) and is not cut."""
    read, stored = span[f"{field}_text"] or "", int(span[f"{field}_chars"] or 0)
    return stored if stored > len(read) else None


def readable_input(text: str) -> str:
    messages = input_messages(text)
    if len(messages) == 1:
        return flat(messages[0]["content"])
    return flat(" | ".join(f"{message['role']}: {message['content']}" for message in messages))


def fit(blocks: list[str], room: int, what: str, *, keep_ends: bool = False) -> list[str]:
    """The blocks that fit in `room` characters (one newline each), taken from both ends towards the middle,
    with a mark where the middle was cut; with `keep_ends`, the first and the last block whatever their size."""
    if sum(len(block) + 1 for block in blocks) <= room:
        return blocks
    mark = f"[... {{}} {what}s cut to fit the judge's budget ...]"
    room -= len(mark) + 8
    front: list[str] = []
    back: list[str] = []
    low, high = 0, len(blocks) - 1
    while low <= high:
        at_front = len(front) <= len(back)
        block = blocks[low] if at_front else blocks[high]
        if len(block) + 1 > room and not (keep_ends and (low == 0 if at_front else high == len(blocks) - 1)):
            break
        room -= len(block) + 1
        if at_front:
            front.append(block)
            low += 1
        else:
            back.insert(0, block)
            high -= 1
    missing = len(blocks) - len(front) - len(back)
    return [*front, mark.format(missing), *back] if missing else blocks


def turn_of(trace_id: str, spans: list[dict[str, Any]]) -> Turn:
    """`spans` (traces.spans_query with text_max=ENDS_MAX, by start) as one turn."""
    placed = tree_order(spans[:MAX_TREE_SPANS])
    order = [p.span for p in placed]
    root = order[0]
    asked = (
        root
        if (root["input_text"] or "").strip()
        else next((s for s in order if (s["input_text"] or "").strip()), None)
    )
    answered = (
        root
        if (root["output_text"] or "").strip()
        else next((s for s in reversed(order) if (s["output_text"] or "").strip()), None)
    )
    question = (
        cut(readable_input(asked["input_text"]), ENDS_MAX, stored_length(asked, "input"))
        if asked
        else "(none recorded)"
    )
    answer = (
        cut(flat(output_text(answered["output_text"])), ENDS_MAX, stored_length(answered, "output"))
        if answered
        else "(none recorded)"
    )
    steps = []
    for p in placed:
        span, indent = p.span, "  " * p.depth
        line = f"{indent}- {flat(span['name'])} [{span['kind']}] {float(span['duration_ms']):.0f} ms {span['status']}"
        if span["error"]:
            line += f", error: {cut(flat(span['error']), STEP_TEXT_MAX)}"
        lines = [line]
        if span is asked:
            lines.append(f"{indent}  input: (the user's question)")
        elif (span["input_text"] or "").strip():
            lines.append(
                f"{indent}  input: {cut(readable_input(span['input_text']), STEP_TEXT_MAX, stored_length(span, 'input'))}"
            )
        if span is answered:
            lines.append(f"{indent}  output: (the final answer)")
        elif (span["output_text"] or "").strip():
            shown = flat(output_text(span["output_text"]))
            lines.append(f"{indent}  output: {cut(shown, STEP_TEXT_MAX, stored_length(span, 'output'))}")
        steps.append("\n".join(lines))
    if len(spans) > MAX_TREE_SPANS:
        steps.append(f"[... more than {MAX_TREE_SPANS} spans: the rest not shown ...]")
    start = min(int(s["start_us"]) for s in spans)
    end = max(int(s["start_us"]) + float(s["duration_ms"]) * 1000 for s in spans)
    errors = sum(s["status"] == "error" for s in spans)
    header = f"Trace {trace_id}: {len(spans)} spans, {(end - start) / 1000:.0f} ms, {errors} in error"
    return Turn(header, question, steps, answer)


def session_transcript(session_id: str, turns: list[Turn], budget: int) -> str:
    """The session's turns in time order; past the budget, every turn's steps go first, then middle turns."""
    header = f"Session {session_id}: {len(turns)} turns"
    room = budget - len(header) - 1
    # Question and answer only: what each turn keeps at least.
    bare = [f"Turn {i}\n{turn.text(0)}" for i, turn in enumerate(turns, 1)]
    if sum(len(block) + 1 for block in bare) > room:
        # The first question and the last answer stay, whatever the budget.
        return "\n".join([header, *fit(bare, room, "turn", keep_ends=True)])
    each = room // max(len(turns), 1) - len("Turn 00\n") - 1
    return "\n".join([header, *(f"Turn {i}\n{turn.text(each)}" for i, turn in enumerate(turns, 1))])


def load_turn(trace_id: str, rows: Rows) -> Turn | None:
    """The trace's turn, or None when no span of it is stored."""
    spans = rows(spans_query(trace_id, limit=MAX_TREE_SPANS + 1, text_max=ENDS_MAX))
    return turn_of(trace_id, spans) if spans else None


def load_session(session_id: str, rows: Rows) -> list[Turn]:
    """The session's turns by start: its first MAX_TURNS/2 and its last MAX_TURNS/2 traces."""
    chosen = TraceFilter(since_ms=0, session=session_id)
    first = rows(traces_query(chosen, MAX_TURNS // 2, oldest_first=True))
    last = rows(traces_query(chosen, MAX_TURNS // 2))
    ids = list(dict.fromkeys(row["trace_id"] for row in [*first, *reversed(last)]))
    return [turn for turn in (load_turn(trace_id, rows) for trace_id in ids) if turn is not None]


@dataclass(frozen=True)
class Verdict:
    """The judge's answer on one trace or session: a 1-5 rating, or the error that stands in for one."""

    level: Level
    target: str
    rating: int | None
    reply: str
    error: str | None = None

    @classmethod
    def of(cls, level: Level, target: str, result: JudgeResult, low: int, high: int) -> Verdict:
        if result.error is not None or result.score is None:
            return cls(level, target, None, result.raw, result.error or "no score")
        # FeedbackCreate takes a whole rating; a judge's 3.5 is stored as 4 (the reply keeps what it said).
        return cls(level, target, int(low + result.score * (high - low) + 0.5), result.raw)

    @property
    def reason(self) -> str:
        text = self.error if self.error is not None else (self.reply.strip().splitlines() or [""])[0]
        return "".join(c if c.isprintable() else "?" for c in text)[:REASON_MAX]

    def feedback(self, rubric: str, model: str) -> dict[str, Any]:
        """The body of POST /feedback/v1/feedback that records this verdict on its trace or session."""
        return {
            "trace_id" if self.level is Level.trace else "session_id": self.target,
            "rating": self.rating,
            "comment": cut(self.reply.strip(), COMMENT_MAX),
            "tags": [rubric],
            "source": "judge",
            "actor": f"judge:{model}"[:256],
        }


def recent_targets(
    level: Level, since_ms: int, service: str | None, name: str | None, limit: int, rows: Rows
) -> list[Target]:
    """The newest traces (or sessions) the filters pick: active since `since_ms`, whose root `service`
    sent, whose root span's name contains `name` (traces only)."""
    if level is Level.trace:
        found = rows(traces_query(TraceFilter(since_ms, service, name_contains=name), limit))
        return [(Level.trace, row["trace_id"]) for row in found]
    found = rows(sessions_query(SessionFilter(since_ms, service), limit))
    return [(Level.session, row["session_id"]) for row in found]


def transcripts_of(targets: Sequence[Target], rows: Rows, budget: int) -> tuple[dict[Target, str], list[Verdict]]:
    """Each target's transcript within `budget` characters, and for each with no span stored a verdict
    that says so (it is reported, not judged)."""
    transcripts: dict[Target, str] = {}
    missing = []
    for level, target in targets:
        if level is Level.trace:
            turn = load_turn(target, rows)
            if turn is not None:
                transcripts[level, target] = turn.text(budget)
        else:
            turns = load_session(target, rows)
            if turns:
                transcripts[level, target] = session_transcript(target, turns, budget)
        if (level, target) not in transcripts:
            missing.append(Verdict(level, target, None, "", "no spans stored"))
    return transcripts, missing


async def judge_all(transcripts: Mapping[Target, str], judges: Mapping[Level, Judge]) -> list[Verdict]:
    """Each transcript graded by its level's judge, in the order given (the order the run prints)."""
    verdicts = []
    for (level, target), transcript in transcripts.items():
        judge = judges[level]
        result = await judge.grade(transcript=transcript)
        verdicts.append(Verdict.of(level, target, result, judge.rubric.low, judge.rubric.high))
    return verdicts
