"""Preference pairs from feedback (`flywheel ops preference-dataset`): the query that reads a model's
answered inferences with the feedback given on them, and the pairs built from those rows.

A pair is one prompt with a better answer (`chosen`) and a worse one (`rejected`):
- correction: a reviewer's correction of an inference against the answer it replaced;
- pairwise: a review queue's decision between two answers to one prompt (a `pairs` queue): the answer
  chosen against the other. An item's decision is its adjudication when it has one, else its reviewers'
  choice when they all made the same one; an item whose reviewers disagree and that no one has adjudicated
  yet gives no pair, nor does a tie (it prefers neither). Provenance names the item and the feedback ids of
  the choices behind the decision;
- thumbs: an answer given thumbs up against one given thumbs down, both to the same rendered prompt;
- rating: an answer rated at least a whole point higher (mean of its ratings, 1 to 5) than another to
  the same rendered prompt.
"The same rendered prompt" is the same `input_text` (the prompt as sent to the model, after templates)
of the same model, whichever version answered. Texts are used as the sink stored them (redacted).

Every value reaches the engine as a bound parameter; the LIMIT is a whole number this module bounds.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from itertools import product
from typing import Any

ROLES = ("system", "user", "assistant")
# Inferences with feedback read at most, newest first. Each row carries a prompt and an answer, so the
# read also stays under the query door's caps (QueryLimits), which refuse it, with the cap named, past them.
MAX_INFERENCES = 5000
MAX_PAIRS = 10_000
# Pairs of one kind from one prompt at most: a popular prompt with many rated answers would otherwise
# fill the dataset with its own combinations (n up x m down of them).
PER_PROMPT = 4
# Answers to one prompt paired at most, newest first: the combinations grow as their square.
ANSWERS_PER_PROMPT = 50
# Feedback ids listed per answer in a pair's provenance at most; the counts behind a verdict stay exact.
IDS_SHOWN = 20
# A whole point on the 1-5 scale: a smaller gap in two means is as likely noise as a preference.
RATING_GAP = 1.0


class PairKind(StrEnum):
    correction = "correction"
    pairwise = "pairwise"
    thumbs = "thumbs"
    rating = "rating"


# Reviewer corrections only, as automatic retraining takes them (services/monitor/store.py): any app may
# send an end user's correction, and a correction becomes what the model is taught to say. Thumbs and
# ratings count from every source: they choose between answers the model gave, they write none.
_CORRECTED = "f.source = 'reviewer' AND f.correction IS NOT NULL AND trimBoth(f.correction) != ''"
# A reviewer's pairwise choice (only the review door publishes one: the sink refuses it on feedback.received).
_CHOSE = "f.source = 'reviewer' AND f.item_id IS NOT NULL AND (f.preferred_over IS NOT NULL OR f.tied_with IS NOT NULL)"
_FEEDBACK_COLUMNS = "feedback_id, inference_id, thumbs, rating, correction, source, occurred_at, item_id, tags, preferred_over, tied_with"
FEEDBACK_SQL = (
    "SELECT i.inference_id AS inference_id, i.adapter_version AS adapter_version, i.prompt_version AS prompt_version, "
    "i.input_messages AS input_messages, i.input_text AS input_text, i.output_text AS output_text, "
    "v.thumbs_up AS thumbs_up, v.thumbs_down AS thumbs_down, v.up_ids AS up_ids, v.down_ids AS down_ids, "
    "v.rating_mean AS rating_mean, v.rating_ids AS rating_ids, v.correction AS correction, v.correction_id AS correction_id, "
    "v.choices AS choices "
    "FROM (SELECT * FROM inference_log FINAL WHERE model_name = {model:String} "
    "AND status = 'ok' AND trimBoth(input_text) != '' AND trimBoth(output_text) != '') AS i "
    "INNER JOIN ("
    "SELECT f.inference_id AS inference_id, "
    "countIf(f.thumbs = 'up') AS thumbs_up, countIf(f.thumbs = 'down') AS thumbs_down, "
    f"arraySlice(arraySort(groupArrayIf(f.feedback_id, f.thumbs = 'up')), 1, {IDS_SHOWN}) AS up_ids, "
    f"arraySlice(arraySort(groupArrayIf(f.feedback_id, f.thumbs = 'down')), 1, {IDS_SHOWN}) AS down_ids, "
    "avg(f.rating) AS rating_mean, "
    f"arraySlice(arraySort(groupArrayIf(f.feedback_id, f.rating IS NOT NULL)), 1, {IDS_SHOWN}) AS rating_ids, "
    # The newest reviewer correction, as span datasets take it: a later one revises an earlier one.
    f"argMaxIf(trimBoth(assumeNotNull(f.correction)), f.occurred_at, {_CORRECTED}) AS correction, "
    f"argMaxIf(f.feedback_id, f.occurred_at, {_CORRECTED}) AS correction_id, "
    # Each choice as [feedback id, item, the other answer, tie, adjudication] ('1' or '0'), for build_pairs to
    # decide items by: an array of strings, which every backend returns alike (a tuple comes back as a tuple
    # from a server and as a JSON object from chDB).
    "groupArrayIf([f.feedback_id, assumeNotNull(f.item_id), ifNull(f.preferred_over, assumeNotNull(f.tied_with)), "
    f"toString(f.tied_with IS NOT NULL), toString(has(f.tags, 'adjudication'))], {_CHOSE}) AS choices "
    # The model's inference ids first: inference_log is ordered by model, so feedback on other models'
    # answers is skipped before it is merged and grouped.
    f"FROM (SELECT {_FEEDBACK_COLUMNS} FROM feedback FINAL WHERE inference_id != '' AND inference_id IN "
    "(SELECT inference_id FROM inference_log WHERE model_name = {model:String}) "
    # The answer a choice passed over has no feedback of its own, yet its text is the pair's `rejected`: it
    # is read as a row with no verdict (no thumbs, rating, correction or choice), which no other kind counts.
    "UNION ALL SELECT '', assumeNotNull(preferred_over), NULL, NULL, NULL, source, occurred_at, NULL, [], NULL, NULL "
    "FROM feedback FINAL WHERE preferred_over IS NOT NULL AND source = 'reviewer' AND preferred_over IN "
    "(SELECT inference_id FROM inference_log WHERE model_name = {model:String})) AS f GROUP BY f.inference_id"
    ") AS v ON i.inference_id = v.inference_id "
    f"ORDER BY i.occurred_at DESC, i.inference_id LIMIT {MAX_INFERENCES + 1}"
)


def feedback_query(model_name: str) -> tuple[str, dict[str, Any]]:
    """The model's answered inferences that have feedback, newest first, one row each (FINAL: a redelivered
    event is one row); one more than MAX_INFERENCES, so a caller sees when some were left unread."""
    return FEEDBACK_SQL, {"model": model_name}


def prompt_of(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation the inference answered: its chat messages when every one is a known role with
    text and the last is the user's, else its rendered prompt as one user turn."""
    try:
        parsed = json.loads(row["input_messages"] or "[]")
    except ValueError:
        parsed = None
    if isinstance(parsed, list) and parsed:
        messages = [
            {"role": m["role"], "content": m["content"]}
            for m in parsed
            if isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        ]
        if len(messages) == len(parsed) and messages[-1]["role"] == "user":
            return messages
    return [{"role": "user", "content": row["input_text"]}]


def _answer(row: dict[str, Any], feedback_ids: list[str]) -> dict[str, Any]:
    return {
        "inference_id": row["inference_id"],
        "adapter_version": row["adapter_version"],
        "prompt_version": row["prompt_version"],
        "feedback_ids": feedback_ids,
    }


@dataclass(frozen=True)
class Pair:
    prompt_key: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    kind: PairKind
    provenance: dict[str, Any]

    def record(self, model_name: str) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "provenance": {"kind": self.kind.value, "model_name": model_name, **self.provenance},
        }


def _corrections(rows: list[dict[str, Any]]) -> Iterator[Pair]:
    for row in rows:
        if row["correction_id"]:
            yield Pair(
                row["input_text"],
                prompt_of(row),
                row["correction"],
                row["output_text"],
                PairKind.correction,
                {"chosen": {"feedback_ids": [row["correction_id"]]}, "rejected": _answer(row, [])},
            )


@dataclass(frozen=True)
class Choice:
    """One reviewer's pairwise choice on a review item, as the feedback on `chosen` records it."""

    feedback_id: str
    chosen: str  # inference id: the answer chosen, or for a tie the answer the feedback is on
    other: str
    tie: bool
    adjudication: bool


def _pairwise(rows: list[dict[str, Any]]) -> Iterator[Pair]:
    """Each decided item's chosen answer against the other (the rows of one prompt hold both answers)."""
    answers = {row["inference_id"]: row for row in rows}
    items: dict[str, list[Choice]] = {}
    for row in rows:
        for feedback_id, item_id, other, tie, adjudication in row["choices"]:
            items.setdefault(item_id, []).append(
                Choice(feedback_id, row["inference_id"], other, tie == "1", adjudication == "1")
            )
    for item_id, choices in items.items():
        decided = decision(choices)
        if not decided or decided[0].tie or decided[0].other not in answers:
            continue
        chosen, rejected = answers[decided[0].chosen], answers[decided[0].other]
        yield Pair(
            chosen["input_text"],
            prompt_of(chosen),
            chosen["output_text"],
            rejected["output_text"],
            PairKind.pairwise,
            {
                "item_id": item_id,
                "chosen": _answer(chosen, sorted(choice.feedback_id for choice in decided)),
                "rejected": _answer(rejected, []),
            },
        )


def decision(choices: list[Choice]) -> list[Choice]:
    """The choices that decide an item: its adjudication (an item is adjudicated once), else its reviews
    when they all chose the same (the same answer, or a tie); none while its reviewers disagree and no one
    has adjudicated it."""
    adjudicated = [choice for choice in choices if choice.adjudication]
    if adjudicated:
        return adjudicated[:1]
    if len({"tie" if choice.tie else choice.chosen for choice in choices}) == 1:
        return choices
    return []


def _thumbs(rows: list[dict[str, Any]]) -> Iterator[Pair]:
    # An answer given both thumbs up and thumbs down says nothing either way, and is left out.
    liked = [row for row in rows if row["thumbs_up"] and not row["thumbs_down"]][:ANSWERS_PER_PROMPT]
    disliked = [row for row in rows if row["thumbs_down"] and not row["thumbs_up"]][:ANSWERS_PER_PROMPT]
    for up, down in product(liked, disliked):
        yield Pair(
            up["input_text"],
            prompt_of(up),
            up["output_text"],
            down["output_text"],
            PairKind.thumbs,
            {"chosen": _answer(up, list(up["up_ids"])), "rejected": _answer(down, list(down["down_ids"]))},
        )


def _ratings(rows: list[dict[str, Any]]) -> Iterator[Pair]:
    rated = [row for row in rows if row["rating_ids"]][:ANSWERS_PER_PROMPT]
    combinations = [
        (high, low) for high, low in product(rated, rated) if high["rating_mean"] - low["rating_mean"] >= RATING_GAP
    ]
    # Widest gaps first: under the per-prompt bound they are the clearest preferences.
    combinations.sort(key=lambda pair: pair[1]["rating_mean"] - pair[0]["rating_mean"])
    for high, low in combinations:
        provenance = {
            "chosen": {**_answer(high, list(high["rating_ids"])), "mean_rating": high["rating_mean"]},
            "rejected": {**_answer(low, list(low["rating_ids"])), "mean_rating": low["rating_mean"]},
        }
        yield Pair(
            high["input_text"], prompt_of(high), high["output_text"], low["output_text"], PairKind.rating, provenance
        )


@dataclass(frozen=True)
class Built:
    """The pairs built from a model's feedback, and what was left out, by reason."""

    model_name: str
    pairs: list[Pair]
    same_text: int  # both answers the same text: nothing to prefer
    contradicted: int  # the same two answers preferred both ways (by different feedback)

    def counts(self) -> dict[PairKind, int]:
        counted = Counter(pair.kind for pair in self.pairs)
        return {kind: counted[kind] for kind in PairKind}

    def jsonl(self) -> str:
        return "".join(json.dumps(pair.record(self.model_name), ensure_ascii=False) + "\n" for pair in self.pairs)


def build_pairs(model_name: str, rows: list[dict[str, Any]], *, limit: int = MAX_PAIRS) -> Built:
    """Pairs from the rows of feedback_query, de-duplicated by (prompt, chosen, rejected): corrections first,
    then pairwise choices, thumbs, ratings, each prompt's in the order its answers came (newest first), at most
    PER_PROMPT of a kind per prompt (corrections and pairwise choices are not bounded: each is a reviewer's own work); then
    `limit` pairs at most."""
    prompts: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        prompts.setdefault(row["input_text"], []).append(row)
    candidates: list[Pair] = []
    same_text = 0
    for kind, pairs_of in (
        (PairKind.correction, _corrections),
        (PairKind.pairwise, _pairwise),
        (PairKind.thumbs, _thumbs),
        (PairKind.rating, _ratings),
    ):
        for answers in prompts.values():
            taken: set[tuple[str, str]] = set()
            for pair in pairs_of(answers):
                if kind not in (PairKind.correction, PairKind.pairwise) and len(taken) == PER_PROMPT:
                    break
                if pair.chosen.strip() == pair.rejected.strip():
                    same_text += 1
                    continue
                if (pair.chosen, pair.rejected) not in taken:
                    taken.add((pair.chosen, pair.rejected))
                    candidates.append(pair)
    texts = {(pair.prompt_key, pair.chosen, pair.rejected) for pair in candidates}
    pairs, seen, contradicted = [], set(), 0
    for pair in candidates:
        key = (pair.prompt_key, pair.chosen, pair.rejected)
        if (pair.prompt_key, pair.rejected, pair.chosen) in texts:
            contradicted += 1
            continue
        if key not in seen:
            seen.add(key)
            pairs.append(pair)
    return Built(model_name, pairs[:limit], same_text, contradicted)
