"""LLM-as-judge: a versioned rubric prompt sent to any OpenAI-compatible endpoint, the score parsed robustly.

Rubrics are code, named `name@vN`: a changed rubric is a new version, so a score always says which
prompt produced it and old scores stay comparable with each other. The judge answers with a 1-5
score; `parse_judge_score` accepts JSON (`{"score": 4}`), "Score: 4", "4/5" or a lone digit, and
refuses anything else rather than guess. A failing call or an unparseable answer is an error on
that example (recorded), never a default score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from string import Formatter
from typing import Any

_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_LABELLED = re.compile(r"(?:score|rating)\s*[:=]?\s*\**\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)
_OUT_OF = re.compile(r"\b([0-9]+(?:\.[0-9]+)?)\s*(?:/|out of)\s*([0-9]+)\b", re.IGNORECASE)
_LONE = re.compile(r"^\W*([0-9]+(?:\.[0-9]+)?)\W*$")


QA_FIELDS = ("question", "answer", "reference")
TRANSCRIPT_FIELDS = ("transcript",)


class RubricFieldError(ValueError):
    """A rubric was given other fields than its template declares."""


@dataclass(frozen=True)
class Rubric:
    name: str
    version: int
    system: str
    user: str  # a format string over exactly `fields`
    low: int = 1
    high: int = 5
    # Worked examples (the fields' values, the judge's reply), sent as earlier chat turns.
    examples: tuple[tuple[Mapping[str, str], str], ...] = ()
    fields: tuple[str, ...] = QA_FIELDS

    def __post_init__(self) -> None:
        used = {field for _, field, _, _ in Formatter().parse(self.user) if field is not None}
        if used != set(self.fields):
            raise RubricFieldError(
                f"{self.key}: the template uses {sorted(used)}, the rubric declares {sorted(self.fields)}"
            )
        for values, _ in self.examples:
            self._check(values)

    def _check(self, values: Mapping[str, str]) -> None:
        # A QA rubric given a transcript (or the other way round) would grade a prompt with holes in it.
        if set(values) != set(self.fields):
            missing, unexpected = set(self.fields) - set(values), set(values) - set(self.fields)
            raise RubricFieldError(
                f"rubric {self.key} takes {', '.join(self.fields)}"
                + (f"; missing {', '.join(sorted(missing))}" if missing else "")
                + (f"; not {', '.join(sorted(unexpected))}" if unexpected else "")
            )

    def messages(self, **values: str) -> list[dict[str, str]]:
        self._check(values)
        turns = [{"role": "system", "content": self.system}]
        for example, reply in self.examples:
            turns += [
                {"role": "user", "content": self.user.format(**example)},
                {"role": "assistant", "content": reply},
            ]
        return [*turns, {"role": "user", "content": self.user.format(**values)}]

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def grades_transcripts(self) -> bool:
        return self.fields == TRANSCRIPT_FIELDS


RUBRICS: dict[str, Rubric] = {
    rubric.key: rubric
    for rubric in (
        Rubric(
            name="correctness",
            version=1,
            system=(
                "You grade answers of a customer-support assistant. Compare the answer with the reference answer. "
                "Score 5: same facts as the reference, nothing wrong added. 4: correct but missing a minor detail. "
                "3: partly correct. 2: mostly wrong or unhelpful. 1: wrong, invented or unsafe. "
                'Reply with JSON only: {"score": <1-5>, "reason": "<one sentence>"}.'
            ),
            user="Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}",
        ),
        # v1's instructions alone get no score out of small judges (SmolLM2-135M answers the question
        # instead); three worked examples as earlier turns make them reply in the format. The score
        # such a judge gives is still weak evidence: prefer a large judge model where one is served.
        Rubric(
            name="correctness",
            version=2,
            system=(
                "You grade answers against a reference answer. 5: same facts as the reference. 4: correct but missing a "
                "minor detail. 3: partly correct. 2: mostly wrong or unhelpful. 1: wrong, invented or unsafe. Reply with 'Score: N' only."
            ),
            user="Question: {question}\nReference answer: {reference}\nAnswer to grade: {answer}",
            examples=(
                (
                    {
                        "question": "How long is the warranty?",
                        "reference": "The warranty lasts 2 years.",
                        "answer": "You get a 2-year warranty.",
                    },
                    "Score: 5",
                ),
                (
                    {
                        "question": "What does the red light mean?",
                        "reference": "A red light means the battery is below 10%.",
                        "answer": "The red light means the hub is updating.",
                    },
                    "Score: 1",
                ),
                (
                    {
                        "question": "How do I pair the remote?",
                        "reference": "Hold Pair for 3 seconds, then press any key on the remote.",
                        "answer": "Hold Pair for a few seconds.",
                    },
                    "Score: 3",
                ),
            ),
        ),
        # Transcripts (services/monitor/trace_judging.py): a trace's steps or a session's turns as text. Worked
        # examples for the same reason as correctness@v2, kept short: they share the judge's prompt budget
        # (the gateway takes 1,536 prompt tokens by default) with the transcript under judgement.
        Rubric(
            name="trace-quality",
            version=1,
            system=(
                "You grade one run of an assistant's pipeline from its trace: the user's question, each step "
                "(retrieval, tool call, model call) with its input and output, and the final answer. 5: the answer "
                "is correct, helpful and follows from the retrieved context and tool results, no step wasted or "
                "failed. 4: good with a wasted or redundant step. 3: partly supported or a failed step worked around. "
                "2: the answer ignores or contradicts the context or tool results. 1: wrong, invented or unsafe, or "
                "the pipeline failed. Reply with 'Score: N' and one short reason."
            ),
            user="Trace:\n{transcript}",
            fields=TRANSCRIPT_FIELDS,
            examples=(
                (
                    {
                        "transcript": "User question: How long is the warranty?\n"
                        "- retrieve [retrieval] ok\n  output: The X200 has a two-year warranty.\n"
                        "- chat [llm] ok\n  output: Two years.\n"
                        "Final answer: The X200 is under warranty for two years."
                    },
                    "Score: 5. The answer follows from the retrieved passage.",
                ),
                (
                    {
                        "transcript": "User question: Where is order 1182?\n"
                        "- lookup_order [tool] error: timeout\n"
                        "- chat [llm] ok\n  output: Your order was delivered yesterday.\n"
                        "Final answer: Your order was delivered yesterday."
                    },
                    "Score: 1. The tool failed and the answer is invented.",
                ),
            ),
        ),
        Rubric(
            name="session-quality",
            version=1,
            system=(
                "You grade a whole conversation between a user and an assistant, turn by turn. 5: the user's need "
                "was resolved, answers were consistent, nothing asked twice. 4: resolved with a detour. 3: partly "
                "resolved, or the user had to repeat a question. 2: mostly unresolved or contradictory. 1: not "
                "resolved, wrong or unsafe. Reply with 'Score: N' and one short reason."
            ),
            user="Conversation:\n{transcript}",
            fields=TRANSCRIPT_FIELDS,
            examples=(
                (
                    {
                        "transcript": "Turn 1\nUser question: Can I return the X200?\n"
                        "Final answer: Yes, returns are free for 30 days.\n"
                        "Turn 2\nUser question: How do I start a return?\n"
                        "Final answer: Open Orders and press Return."
                    },
                    "Score: 5. The user's need was resolved consistently.",
                ),
                (
                    {
                        "transcript": "Turn 1\nUser question: Where is order 1182?\n"
                        "Final answer: I cannot help with that.\n"
                        "Turn 2\nUser question: Where is order 1182?\n"
                        "Final answer: Returns are free for 30 days."
                    },
                    "Score: 1. The user asked twice and never got an answer.",
                ),
            ),
        ),
    )
}


class JudgeParseError(ValueError):
    """The judge's reply holds no score in the rubric's range."""


def parse_judge_score(reply: str, *, low: int = 1, high: int = 5) -> float:
    """The score in the judge's reply, checked against [low, high]."""
    candidates: list[float] = []
    for blob in _JSON_OBJECT.findall(reply):
        try:
            parsed = json.loads(blob)
        except ValueError:
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("score"), int | float | str):
            try:
                candidates.append(float(parsed["score"]))
            except ValueError:
                continue
    if not candidates and (match := _LABELLED.search(reply)):
        candidates.append(float(match.group(1)))
    if not candidates and (match := _OUT_OF.search(reply)) and int(match.group(2)) == high:
        candidates.append(float(match.group(1)))
    if not candidates and (match := _LONE.match(reply.strip())):
        candidates.append(float(match.group(1)))
    if not candidates:
        raise JudgeParseError(f"no score in the judge's reply: {reply[:200]!r}")
    score = candidates[0]
    if not low <= score <= high:
        raise JudgeParseError(f"judge score {score:g} is outside {low}-{high}: {reply[:200]!r}")
    return score


@dataclass(frozen=True)
class JudgeResult:
    score: float | None  # normalised to [0, 1]; None when `error` is set
    raw: str
    error: str | None = None


def judge_client(base_url: str, api_key: str | None) -> Any:
    """An OpenAI-compatible client for a judge endpoint (Flywheel's gateway or any other). One retry: a
    judge run records what fails on the example it failed on rather than stalling every example behind it."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=1)


class Judge:
    """Grades one answer (or one transcript) at a time through `client.chat.completions.create` (openai.AsyncOpenAI or compatible)."""

    def __init__(self, client: Any, *, model: str, rubric: str = "correctness@v1", max_tokens: int = 128) -> None:
        if rubric not in RUBRICS:
            raise ValueError(f"unknown rubric {rubric!r}: choose one of {', '.join(RUBRICS)}")
        self.rubric = RUBRICS[rubric]
        self._client = client
        self._model = model
        self._max_tokens = max_tokens

    async def grade(self, **values: str) -> JudgeResult:
        """The rubric's score for `values`, its declared fields (question, answer, reference; or transcript)."""
        rubric = self.rubric
        messages = rubric.messages(**values)  # wrong fields are the caller's bug, not one example's error
        raw = ""
        try:
            response = await self._client.chat.completions.create(
                model=self._model,
                messages=messages,
                temperature=0.0,
                max_tokens=self._max_tokens,
            )
            raw = response.choices[0].message.content or ""
            score = parse_judge_score(raw, low=rubric.low, high=rubric.high)
        except Exception as error:  # noqa: BLE001 - one example's failure is recorded on that example
            return JudgeResult(None, raw, f"{type(error).__name__}: {error}")
        return JudgeResult((score - rubric.low) / (rubric.high - rubric.low), raw)
