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
from dataclasses import dataclass
from typing import Any

_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_LABELLED = re.compile(r"(?:score|rating)\s*[:=]?\s*\**\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)
_OUT_OF = re.compile(r"\b([0-9]+(?:\.[0-9]+)?)\s*(?:/|out of)\s*([0-9]+)\b", re.IGNORECASE)
_LONE = re.compile(r"^\W*([0-9]+(?:\.[0-9]+)?)\W*$")


@dataclass(frozen=True)
class Rubric:
    name: str
    version: int
    system: str
    user: str  # format string with {question}, {answer}, {reference}
    low: int = 1
    high: int = 5
    # Worked examples (question, reference, answer, the judge's reply), sent as earlier chat turns.
    examples: tuple[tuple[str, str, str, str], ...] = ()

    def messages(self, *, question: str, answer: str, reference: str) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system}]
        for q, r, a, reply in self.examples:
            turns += [
                {"role": "user", "content": self.user.format(question=q, answer=a, reference=r)},
                {"role": "assistant", "content": reply},
            ]
        return [
            *turns,
            {"role": "user", "content": self.user.format(question=question, answer=answer, reference=reference)},
        ]

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"


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
                ("How long is the warranty?", "The warranty lasts 2 years.", "You get a 2-year warranty.", "Score: 5"),
                (
                    "What does the red light mean?",
                    "A red light means the battery is below 10%.",
                    "The red light means the hub is updating.",
                    "Score: 1",
                ),
                (
                    "How do I pair the remote?",
                    "Hold Pair for 3 seconds, then press any key on the remote.",
                    "Hold Pair for a few seconds.",
                    "Score: 3",
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


class Judge:
    """Grades one answer at a time through `client.chat.completions.create` (openai.AsyncOpenAI or compatible)."""

    def __init__(self, client: Any, *, model: str, rubric: str = "correctness@v1", max_tokens: int = 128) -> None:
        if rubric not in RUBRICS:
            raise ValueError(f"unknown rubric {rubric!r}: choose one of {', '.join(RUBRICS)}")
        self.rubric = RUBRICS[rubric]
        self._client = client
        self._model = model
        self._max_tokens = max_tokens

    async def grade(self, *, question: str, answer: str, reference: str) -> JudgeResult:
        rubric = self.rubric
        raw = ""
        try:
            response = await self._client.chat.completions.create(
                model=self._model,
                messages=rubric.messages(question=question, answer=answer, reference=reference),
                temperature=0.0,
                max_tokens=self._max_tokens,
            )
            raw = response.choices[0].message.content or ""
            score = parse_judge_score(raw, low=rubric.low, high=rubric.high)
        except Exception as error:  # noqa: BLE001 - one example's failure is recorded on that example
            return JudgeResult(None, raw, f"{type(error).__name__}: {error}")
        return JudgeResult((score - rubric.low) / (rubric.high - rubric.low), raw)
