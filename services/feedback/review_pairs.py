"""Which two answers a `pairs` review rule puts side by side, and in which order (pure: the fill reads the
calls, this decides).

For each rendered prompt (`input_text`) the first answer is the newest; the second is the newest answer
of another arm (adapter version and route, e.g. a canary against production) whose text differs from it,
else the newest answer of the same arm whose text differs. A prompt without a second, different answer is
not taken: there is nothing to choose between. Answers replayed from the response cache (route `cache`)
repeat another call's answer, so they are never one of the two.

Which answer is shown first is decided per item by a hash of the two inference ids, not by arm or age:
reviewers lean towards the answer they read first, and a fixed order would hand that lean to one arm on
every item. The hash keeps the order the same for every reviewer of an item (so their `first` and
`second` mean the same answers, and agreement can compare them) and on every fill.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# A cache hit repeats an answer another call generated: comparing it with that call compares nothing.
REPLAYED_ROUTE = "cache"


@dataclass(frozen=True)
class AnswerPair:
    prompt: str
    first: str  # inference id shown first
    second: str  # inference id shown beside it
    occurred_at: datetime  # the newer of the two answers


def answer_pairs(rows: list[dict[str, Any]]) -> list[AnswerPair]:
    """One pair per prompt from answered calls (inference_id, input_text, output_text, occurred_at,
    adapter_version, route), in the order of each prompt's newest answer, newest first."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda row: (row["occurred_at"], row["inference_id"]), reverse=True):
        if row["route"] != REPLAYED_ROUTE:
            by_prompt.setdefault(row["input_text"], []).append(row)
    pairs = []
    for prompt, answers in by_prompt.items():
        newest = answers[0]
        different = [row for row in answers[1:] if row["output_text"].strip() != newest["output_text"].strip()]
        other_arm = [row for row in different if _arm(row) != _arm(newest)]
        rival = (other_arm or different or [None])[0]
        if rival is None:
            continue
        first, second = _shown_order(newest["inference_id"], rival["inference_id"])
        pairs.append(AnswerPair(prompt, first, second, newest["occurred_at"]))
    return pairs


def _arm(row: dict[str, Any]) -> tuple[Any, str]:
    return row["adapter_version"], row["route"]


def _shown_order(one: str, other: str) -> tuple[str, str]:
    """The two ids in the order shown: a coin flip from their hash, the same whichever is passed first."""
    low, high = sorted((one, other))
    flip = hashlib.blake2b(f"{low}\n{high}".encode(), digest_size=8).digest()[0] & 1
    return (high, low) if flip else (low, high)
