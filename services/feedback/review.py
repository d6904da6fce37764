"""Review queues: people judge the model's answers on a rubric, and each judgement is feedback.

A queue is defined by an operator (a sampling rule over one model's stored calls, a registry rubric
version, how many reviewers each item needs, how long a claim lasts) and versioned. A fill reads the
calls the rule matches from ClickHouse, scores the answers' groundedness in their prompts with MiniLM
when the rule or the order needs it (the live watcher's score, so the least confident answers come
first), and adds them one per prompt. Reviewers claim items under a lease, score them, correct them or
skip them with a reason; each review is published as `feedback.reviewed` naming the queue, the item,
the rubric version and the scores, with the reviewer's authenticated principal as its actor. When an
item's reviewers disagree it goes to adjudication, which one other reviewer settles.

A `pairs` rule makes pairwise items instead: two answers to one prompt side by side (which two, and in
which order, services/feedback/review_pairs.py says). Reviewers pick one (`first`, `second`) or call a
`tie`, and the choice is the item's one judgement: nominal, as agreement and adjudication count it. The
pick is published on the chosen answer naming the other as `preferred_over`; a tie on the first answer
shown naming the other as `tied_with`, which prefers neither, so preference datasets take no pair from it.

A rule whose `target` is trace or session makes items of whole traces or sessions: a share of them, those
with negative feedback, or those with an error span (services/feedback/store.py says which). The item shows
the trace's spans as a tree, or the session's turns; its review is published on the trace or the session,
and agreement and adjudication count it as they count an inference's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable
from datetime import UTC, datetime
from typing import Any

from contracts.envelope import Envelope
from contracts.events import FeedbackReceived, FeedbackReviewed, FeedbackSource, Thumbs
from contracts.http import (
    ReviewAccepted,
    ReviewAgreement,
    ReviewChoice,
    ReviewFillResult,
    ReviewItemView,
    ReviewOrder,
    ReviewQueueCounts,
    ReviewQueueCreate,
    ReviewQueueView,
    ReviewRule,
    ReviewSelect,
    ReviewSkip,
    ReviewSpan,
    ReviewSubmit,
    ReviewTarget,
    ReviewTurn,
    RubricDimension,
    RubricScale,
    RubricVersionView,
)
from services.feedback.review_store import (
    ADJUDICATION,
    DONE,
    Candidate,
    ItemRecord,
    QueueRecord,
    ReviewRecord,
    ReviewStore,
)
from services.feedback.review_pairs import answer_pairs
from services.feedback.store import FeedbackStore
from services.runtime.agreement import Scale, agreement, in_conflict
from services.runtime.errors import Conflict, Invalid, NotFound
from services.runtime.privacy import Redactor
from services.runtime.scoring import Embedder, score_groundedness
from services.runtime.span_tree import tree_order

log = logging.getLogger("flywheel.feedback.review")

# Calls one fill reads at most: scoring them with MiniLM takes about 2 ms each on one core.
MAX_CANDIDATES = 2000
# A claim on a queue with nothing left to give fills it first, at most this often.
REFILL_AFTER_S = 60.0
# Ratings more than a step apart are a disagreement; 4 and 5 are not.
RATING_SPREAD = 1.0
_FEEDBACK_IDS = uuid.UUID("0d3c8a52-5a8e-4d0c-9c36-3b1f7f2a6a10")
_SCALES = {RubricScale.thumbs: Scale.nominal, RubricScale.label: Scale.nominal, RubricScale.rating: Scale.ordinal}
# Spans an item shows at most: a reviewer reads a tree, not a log (the trace page shows the rest).
MAX_ITEM_SPANS = 200
# The selections that read one answer (its groundedness, or a judge's verdict on it) or pair answers.
INFERENCE_ONLY = (ReviewSelect.low_groundedness, ReviewSelect.judge_disagreement, ReviewSelect.pairs)
# What a pairwise item is judged on, in place of its rubric's dimensions (whose instructions say what to
# compare by): agreement and adjudication count it as they count a label.
CHOICE = RubricDimension(
    name="choice",
    description="Which answer is better: the first shown, the second, or neither (tie).",
    scale=RubricScale.label,
    labels=[choice.value for choice in ReviewChoice],
)

Publish = Callable[[FeedbackReceived], Awaitable[Envelope[FeedbackReceived]]]


class ReviewQueues:
    """The review queues' use cases; the door (services/feedback/review_api.py) authenticates callers."""

    def __init__(
        self,
        store: ReviewStore,
        feedback: Callable[[], FeedbackStore],
        publish: Publish,
        redactor: Redactor,
        embedder: Callable[[], Embedder],
        *,
        refill_after_s: float = REFILL_AFTER_S,
    ) -> None:
        self._store = store
        self._feedback = feedback
        self._publish = publish
        self._redactor = redactor
        self._embedder = embedder
        self._refill_after_s = refill_after_s
        self._fills: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # ------------------------------------------------------------------------------------- queues

    async def define(self, request: ReviewQueueCreate, rubric: RubricVersionView, caller: str) -> ReviewQueueView:
        check_rule(request.rule)
        definition = request.model_dump(mode="json", exclude={"name", "rubric", "rubric_version"})
        record = await asyncio.to_thread(
            self._store.define, request.name, definition, rubric.model_dump(mode="json"), caller
        )
        log.info("review queue defined", extra={"queue": record.name, "version": record.version, "by": caller})
        return await asyncio.to_thread(self._view, record)

    async def view(self, name: str) -> ReviewQueueView:
        return await asyncio.to_thread(self._view, self._queue(name))

    async def views(self) -> list[ReviewQueueView]:
        return await asyncio.to_thread(lambda: [self._view(record) for record in self._store.queues()])

    def _queue(self, name: str) -> QueueRecord:
        record = self._store.queue(name)
        if record is None:
            raise NotFound(
                f"no review queue named {name!r}: define it with POST /feedback/v1/review/queues", param="name"
            )
        return record

    def _view(self, record: QueueRecord) -> ReviewQueueView:
        return ReviewQueueView(
            name=record.name,
            version=record.version,
            rule=ReviewRule.model_validate(record.definition["rule"]),
            rubric=RubricVersionView.model_validate(record.rubric),
            reviewers_per_item=record.definition["reviewers_per_item"],
            lease_seconds=record.definition["lease_seconds"],
            max_items=record.definition["max_items"],
            created_at=record.created_at,
            created_by=record.created_by,
            counts=ReviewQueueCounts(**self._store.counts(record.name)),
            agreement=self._agreement(record),
        )

    def _agreement(self, record: QueueRecord) -> list[ReviewAgreement]:
        reviews = self._store.reviewed_items(record.name)
        measured = []
        for dimension in _judged(record):
            scale = _SCALES[dimension.scale]
            units: dict[Hashable, dict[str, float | str]] = defaultdict(dict)
            for item_id, reviewer, given, choice in reviews:
                scores = _judgements(given, choice)
                if dimension.name in scores:
                    value = scores[dimension.name]
                    units[item_id][reviewer] = int(value) if dimension.scale is RubricScale.rating else value
            result = agreement(dimension.name, units, scale, conflict_spread=RATING_SPREAD)
            measured.append(
                ReviewAgreement(
                    dimension=dimension.name,
                    level=scale.value,
                    items=result.units,
                    alpha=result.alpha,
                    kappa=result.kappa,
                    alpha_without=result.alpha_without,
                )
            )
        return measured

    # -------------------------------------------------------------------------------------- fills

    async def fill(self, name: str) -> ReviewFillResult:
        """Add what the queue's rule matches now (at most `max_items`), one item per prompt."""
        record = await asyncio.to_thread(self._queue, name)
        async with self._fills[name]:
            return await asyncio.to_thread(self._fill, record)

    def _fill(self, record: QueueRecord) -> ReviewFillResult:
        rule = ReviewRule.model_validate(record.definition["rule"])
        started = time.perf_counter()
        if rule.target is not ReviewTarget.inference:
            found = self._feedback().review_trace_candidates(
                rule.target,
                model_name=rule.model_name,
                hours=rule.window_hours,
                share=rule.share,
                select=rule.select,
                limit=MAX_CANDIDATES,
            )
            # Each trace or session is its own "prompt": the one-per-prompt rule keeps it once in the queue.
            return self._add(
                record,
                [
                    Candidate(row["target_id"], row["target_id"], _utc(row["began_at"]), None, None, rule.target.value)
                    for row in found
                ],
                started,
            )
        assert rule.model_name is not None, "check_rule requires it of an inference rule"
        rows = self._feedback().review_candidates(
            rule.model_name,
            hours=rule.window_hours,
            share=rule.share,
            route=rule.route.value if rule.route else None,
            select=rule.select,
            limit=MAX_CANDIDATES,
        )
        if rule.select is ReviewSelect.pairs:
            # Nothing is scored: groundedness ranks one answer, not a choice between two.
            candidates = [
                Candidate(pair.first, _prompt_key(pair.prompt), _utc(pair.occurred_at), None, pair.second)
                for pair in answer_pairs(rows)
            ]
            return self._add(record, candidates, started)
        scores: list[float | None] = [None] * len(rows)
        if rows and (rule.select is ReviewSelect.low_groundedness or rule.order is ReviewOrder.uncertainty):
            # The live watcher's measure (services/monitor): the prompt is the context an answer should stay in.
            scored = score_groundedness(
                [row["output_text"] for row in rows], [row["input_text"] for row in rows], self._embedder()
            )
            scores = [score.score for score in scored]
        candidates = [
            Candidate(
                row["inference_id"],
                _prompt_key(row["input_text"]),
                _utc(row["occurred_at"]),
                score,
                confidence=row["mean_token_logprob"],
            )
            for row, score in zip(rows, scores, strict=True)
            if rule.select is not ReviewSelect.low_groundedness or (score is not None and score < rule.floor)
        ]
        # The fill keeps one answer per prompt, the first in this order: under an uncertainty order, the least sure.
        if rule.order is ReviewOrder.uncertainty:
            candidates.sort(key=lambda candidate: (candidate.groundedness is None, candidate.groundedness or 0.0))
        elif rule.order is ReviewOrder.least_confident:
            candidates.sort(key=lambda candidate: (candidate.confidence is None, candidate.confidence or 0.0))
        return self._add(record, candidates, started)

    def _add(self, record: QueueRecord, candidates: list[Candidate], started: float) -> ReviewFillResult:
        added, already, duplicates = self._store.add(record, candidates, record.definition["max_items"])
        log.info(
            "review queue filled",
            extra={
                "queue": record.name,
                "considered": len(candidates),
                "added": added,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        return ReviewFillResult(
            queue=record.name,
            considered=len(candidates),
            added=added,
            already_queued=already,
            duplicate_prompts=duplicates,
        )

    # -------------------------------------------------------------------------------- claim, review

    async def claim(self, name: str, reviewer: str) -> ReviewItemView | None:
        """The next item for `reviewer`, leased to them; None when the queue has nothing left for them (a
        queue that has nothing and was not filled lately is filled first)."""
        record = await asyncio.to_thread(self._queue, name)
        filled = False
        while True:
            claimed = await asyncio.to_thread(self._next_item, record, reviewer)
            if claimed is not None:
                return claimed
            last = await asyncio.to_thread(self._store.last_fill, name)
            if filled or (last is not None and (datetime.now(UTC) - last).total_seconds() < self._refill_after_s):
                return None
            await self.fill(name)
            filled = True

    def _next_item(self, record: QueueRecord, reviewer: str) -> ReviewItemView | None:
        """Claim the next item and show it; an item whose inference is gone is retired, not shown, and the
        one after it claimed (else the reviewer would be handed an error until its lease lapsed)."""
        order = ReviewRule.model_validate(record.definition["rule"]).order
        retired = 0
        try:
            while (claimed := self._store.claim(record, reviewer, order=order)) is not None:
                item, expires = claimed
                view = self._item_view(item, expires)
                if view is not None:
                    return view
                self._store.retire(item)
                retired += 1
            return None
        finally:
            if retired:
                log.info(
                    "review items retired: what they review is no longer stored",
                    extra={"queue": record.name, "items": retired},
                )

    def _item_view(self, item: ItemRecord, expires: datetime) -> ReviewItemView | None:
        """What the reviewer sees of the item; None when its inference (trace, session) is no longer stored
        (the sink stored it before it was queued, so only a TTL or a deletion removed it)."""
        record = self._queue_version(item)
        if item.target != ReviewTarget.inference:
            return self._trace_item_view(item, record, expires)
        call = self._feedback().inference_for_review(item.inference_id)
        if call is None:
            return None
        second = None
        if item.second_inference_id is not None:
            second = self._feedback().inference_for_review(item.second_inference_id)
            if second is None:
                return None
        return ReviewItemView(
            item_id=item.item_id,
            queue=item.queue,
            queue_version=item.queue_version,
            stage="adjudication" if item.stage == ADJUDICATION else "review",
            inference_id=item.inference_id,
            model_name=call["model_name"],
            adapter_version=call["adapter_version"],
            route=call["route"],
            messages=_messages(call["input_messages"], call["input_text"]),
            answer=call["output_text"],
            trace_id=call["trace_id"],
            # The trace when there is one: a traced call shows the steps around its answer.
            spans=self._spans(call["trace_id"]) if call["trace_id"] else [],
            second_inference_id=item.second_inference_id,
            second_adapter_version=second["adapter_version"] if second else None,
            second_route=second["route"] if second else None,
            second_answer=second["output_text"] if second else None,
            groundedness=item.groundedness,
            mean_token_logprob=item.confidence,
            rubric=RubricVersionView.model_validate(record.rubric),
            reviews=self._disputed(item),
            reviews_needed=self._needed(item, record),
            lease_expires_at=expires,
        )

    def _trace_item_view(self, item: ItemRecord, record: QueueRecord, expires: datetime) -> ReviewItemView | None:
        """A trace item's spans as a tree, or a session item's turns; None when no span of it is stored any more."""
        common: dict[str, Any] = {
            "item_id": item.item_id,
            "queue": item.queue,
            "queue_version": item.queue_version,
            "stage": "adjudication" if item.stage == ADJUDICATION else "review",
            "target": item.target,
            "inference_id": None,
            "route": None,
            "rubric": RubricVersionView.model_validate(record.rubric),
            "reviews": self._disputed(item),
            "reviews_needed": self._needed(item, record),
            "lease_expires_at": expires,
        }
        if item.target == ReviewTarget.trace:
            rows = self._feedback().trace_for_review(item.inference_id, limit=MAX_ITEM_SPANS)
            if not rows:
                return None
            spans = _tree(rows)
            root = spans[0]
            return ReviewItemView(
                **common,
                model_name=next((row["model_name"] for row in rows if row["model_name"]), None),
                adapter_version=next((row["adapter_version"] for row in rows if row["model_name"]), None),
                messages=[{"role": "user", "content": root.input}],
                answer=root.output,
                trace_id=item.inference_id,
                session_id=next((row["session_id"] for row in rows if row["session_id"]), None),
                spans=spans,
            )
        turns = self._feedback().session_for_review(item.inference_id)
        if not turns:
            return None
        messages = []
        for turn in turns:
            messages += [
                {"role": "user", "content": turn["turn_input"]},
                {"role": "assistant", "content": turn["turn_output"]},
            ]
        return ReviewItemView(
            **common,
            model_name=next((turn["turn_model"] for turn in turns if turn["turn_model"]), None),
            # The last turn's answer is the item's `answer`; the conversation before it is its messages.
            messages=messages[:-1],
            answer=turns[-1]["turn_output"],
            session_id=item.inference_id,
            turns=[
                ReviewTurn(
                    trace_id=turn["trace_id"],
                    name=turn["turn_name"],
                    input=turn["turn_input"],
                    output=turn["turn_output"],
                    status=turn["turn_status"],
                    started_at=_utc(turn["turn_start"]),
                )
                for turn in turns
            ],
        )

    def _spans(self, trace_id: str) -> list[ReviewSpan]:
        return _tree(self._feedback().trace_for_review(trace_id, limit=MAX_ITEM_SPANS))

    def _disputed(self, item: ItemRecord) -> list[dict[str, Any]]:
        """For an adjudication, the reviews that disagree."""
        if item.stage != ADJUDICATION:
            return []
        return [
            {
                "reviewer": review.reviewer,
                "scores": review.scores,
                "correction": review.correction,
                **({"choice": review.choice} if review.choice else {}),
            }
            for review in self._store.reviews(item.item_id)
        ]

    def _needed(self, item: ItemRecord, record: QueueRecord) -> int:
        if item.stage == ADJUDICATION:
            return 1
        return max(record.definition["reviewers_per_item"] - len(self._store.reviews(item.item_id)), 1)

    async def held(self, item_id: str, reviewer: str) -> ReviewItemView:
        """The item `reviewer` holds a live claim on, as the claim gave it, without claiming anything (the
        console's item page, which a reload must not turn into a new claim)."""
        return await asyncio.to_thread(self._held_view, item_id, reviewer)

    def _held_view(self, item_id: str, reviewer: str) -> ReviewItemView:
        item, expires = self._held(item_id, reviewer)
        view = self._item_view(item, expires)
        if view is None:
            self._store.retire(item)
            raise NotFound(
                f"{item.target} {item.inference_id} of item {item_id} is no longer stored: the item is retired; "
                f"claim the next one with POST /feedback/v1/review/queues/{item.queue}/claim",
                param="item_id",
            )
        return view

    def _queue_version(self, item: ItemRecord) -> QueueRecord:
        record = self._store.queue_version(item.queue, item.queue_version)
        assert record is not None, "an item names the queue version it was added under"
        return record

    async def submit(self, item_id: str, reviewer: str, review: ReviewSubmit) -> ReviewAccepted:
        """Publish the review as feedback.reviewed and record it; the item moves on when it has all its
        reviews (done, or adjudication when they disagree) or when an adjudicator decided it."""
        item, _ = await asyncio.to_thread(self._held, item_id, reviewer)
        record = await asyncio.to_thread(self._queue_version, item)
        dimensions = _judged(record)
        choice = _checked_choice(item, review)
        if review.correction is not None and item.target != ReviewTarget.inference:
            raise Invalid(
                f"correction: item {item.item_id} reviews a whole {item.target}, which has no one answer to correct; "
                "score it on its rubric, and say what went wrong in comment",
                param="correction",
            )
        scores = _checked_scores(review.scores, dimensions) if choice is None else {}
        rubric = RubricVersionView.model_validate(record.rubric)
        # The same id however often a review is retried: the sink folds a repeat of one feedback id.
        feedback_id = str(uuid.uuid5(_FEEDBACK_IDS, f"{item.item_id}/{reviewer}/{item.stage}"))
        target, other = (
            (item.second_inference_id, item.inference_id)
            if choice is ReviewChoice.second
            else (item.inference_id, item.second_inference_id)
        )
        on = {ReviewTarget.trace: "trace_id", ReviewTarget.session: "session_id"}.get(
            ReviewTarget(item.target), "inference_id"
        )
        event = FeedbackReviewed(
            feedback_id=feedback_id,
            **{on: target},
            preferred_over=other if choice in (ReviewChoice.first, ReviewChoice.second) else None,
            tied_with=other if choice is ReviewChoice.tie else None,
            thumbs=_first(scores, dimensions, RubricScale.thumbs, Thumbs),
            rating=_first(scores, dimensions, RubricScale.rating, int),
            comment=review.comment,
            correction=review.correction,
            tags=["adjudication"] if item.stage == ADJUDICATION else [],
            source=FeedbackSource.reviewer,
            actor=reviewer,
            queue=item.queue,
            item_id=item.item_id,
            rubric=f"{rubric.name}:v{rubric.version}",
            scores=scores,
        )
        # Published before it is recorded: a broker that does not take it leaves the lease and nothing else.
        await self._publish(self._redactor.scrub_feedback(event))
        this = ReviewRecord(
            reviewer, item.stage, scores, review.correction, review.comment, feedback_id, choice and choice.value
        )
        # An adjudication is decided by its one review; a review by the queue's count of reviewers.
        needed = 1 if item.stage == ADJUDICATION else record.definition["reviewers_per_item"]

        def decide(reviews: list[ReviewRecord]) -> str | None:
            if len(reviews) < needed:
                return None
            return ADJUDICATION if _disagree(reviews, dimensions) else DONE

        stage = await asyncio.to_thread(self._store.review, item, this, decide)
        if stage == ADJUDICATION:
            log.info("review item in conflict", extra={"queue": item.queue, "item_id": item.item_id})
        return ReviewAccepted(item_id=item.item_id, feedback_id=feedback_id, stage=stage or "waiting")

    async def skip(self, item_id: str, reviewer: str, request: ReviewSkip) -> None:
        """Pass the item on: it is not offered to this reviewer again, and the reason is kept."""
        item, _ = await asyncio.to_thread(self._held, item_id, reviewer)
        await asyncio.to_thread(self._store.skip, item, reviewer, request.reason)

    def _held(self, item_id: str, reviewer: str) -> tuple[ItemRecord, datetime]:
        """The item and when `reviewer`'s live lease on it lapses; Conflict when they hold none."""
        item = self._store.item(item_id)
        if item is None:
            raise NotFound(f"no review item {item_id!r}", param="item_id")
        expires = None if item.stage == DONE else self._store.lease_expires_at(item.item_id, reviewer, item.stage)
        if expires is None:
            raise Conflict(
                f"{reviewer} holds no live claim on item {item_id} (never claimed, lapsed, or already reviewed): "
                f"claim the next item with POST /feedback/v1/review/queues/{item.queue}/claim",
                param="item_id",
                code="not_claimed",
            )
        return item, expires


def check_rule(rule: ReviewRule) -> None:
    """Invalid, naming the field, for a rule that cannot select anything: what only an inference rule may ask
    of a trace or session rule, and what only a trace or session rule may ask of an inference rule."""
    if rule.target is ReviewTarget.inference:
        if rule.model_name is None:
            raise Invalid(
                "rule.model_name: an inference rule samples one model's answers: name the model",
                param="rule.model_name",
            )
        if rule.select is ReviewSelect.errored:
            raise Invalid(
                "rule.select: errored selects traces or sessions with an error span (a failed call has no answer "
                "to review): set rule.target to trace or session, or select traffic, thumbs_down, low_groundedness, "
                "judge_disagreement or pairs",
                param="rule.select",
            )
        return
    if rule.select in INFERENCE_ONLY:
        raise Invalid(
            f"rule.select: {rule.select.value} reads single answers, not a whole {rule.target.value}; a "
            f"{rule.target.value} rule selects traffic, thumbs_down or errored",
            param="rule.select",
        )
    if rule.route is not None:
        raise Invalid(
            f"rule.route: a {rule.target.value} is not served on one route; leave route out of a {rule.target.value} rule",
            param="rule.route",
        )


def _tree(rows: list[dict[str, Any]]) -> list[ReviewSpan]:
    """A trace's spans (ordered by start, at most MAX_ITEM_SPANS of them) as the tree shows them, depth first."""
    return [
        ReviewSpan(
            span_id=placed.span["span_id"],
            parent_span_id=placed.span["parent_span_id"],
            depth=placed.depth,
            name=placed.span["name"],
            kind=placed.span["kind"],
            input=placed.span["input_text"],
            output=placed.span["output_text"],
            status=placed.span["status"],
            error=placed.span["error"],
            duration_ms=float(placed.span["duration_ms"]),
        )
        for placed in tree_order(rows)
    ]


def _dimensions(record: QueueRecord) -> list[RubricDimension]:
    return [RubricDimension.model_validate(dimension) for dimension in record.rubric["dimensions"]]


def _judged(record: QueueRecord) -> list[RubricDimension]:
    """What the queue's reviewers judge: the rubric's dimensions, or a pairwise queue's choice."""
    return [CHOICE] if record.definition["rule"]["select"] == ReviewSelect.pairs else _dimensions(record)


def _judgements(scores: dict[str, str], choice: str | None) -> dict[str, str]:
    """A review's judgements by what was judged: its scores, or its pairwise choice."""
    return {CHOICE.name: choice} if choice is not None else scores


def _checked_choice(item: ItemRecord, review: ReviewSubmit) -> ReviewChoice | None:
    """A pairwise item's choice (None for an item of one answer); Invalid naming the field at fault."""
    if item.second_inference_id is None:
        if review.choice is not None:
            raise Invalid(
                f"choice: item {item.item_id} shows one answer, so there is nothing to choose between; "
                "score it on its rubric instead",
                param="choice",
            )
        return None
    if review.choice is None:
        raise Invalid(
            f"choice: item {item.item_id} shows two answers to one prompt: send choice first, second or tie",
            param="choice",
        )
    for field in ("scores", "correction"):
        if getattr(review, field):
            raise Invalid(
                f"{field}: item {item.item_id} is judged by its choice alone (the rubric's instructions say what to "
                f"compare by); send choice without {field}",
                param=field,
            )
    return review.choice


def _prompt_key(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode(), digest_size=16).hexdigest()


def _checked_scores(scores: dict[str, str], dimensions: list[RubricDimension]) -> dict[str, str]:
    """Every dimension scored on its scale, and nothing else; Invalid naming the first score at fault."""
    known = {dimension.name: dimension for dimension in dimensions}
    for name in scores:
        if name not in known:
            raise Invalid(
                f"scores.{name}: the rubric has no such dimension; it has {', '.join(known)}", param=f"scores.{name}"
            )
    checked = {}
    for dimension in dimensions:
        value = scores.get(dimension.name)
        if value is None:
            raise Invalid(
                f"scores.{dimension.name}: score every dimension of the rubric ({', '.join(known)})",
                param=f"scores.{dimension.name}",
            )
        allowed = {
            RubricScale.thumbs: ["up", "down"],
            RubricScale.rating: ["1", "2", "3", "4", "5"],
            RubricScale.label: dimension.labels,
        }[dimension.scale]
        if value not in allowed:
            raise Invalid(
                f"scores.{dimension.name}: {value[:64]!r} is not on its {dimension.scale.value} scale; send one of {', '.join(allowed)}",
                param=f"scores.{dimension.name}",
            )
        checked[dimension.name] = value
    return checked


def _first(scores: dict[str, str], dimensions: list[RubricDimension], scale: RubricScale, kind: Any) -> Any:
    """The first dimension of `scale`, as feedback's own thumbs or rating: what the monitor's quality rules,
    retraining and preference pairs already read."""
    for dimension in dimensions:
        if dimension.scale is scale:
            return kind(scores[dimension.name])
    return None


def _disagree(reviews: list[ReviewRecord], dimensions: list[RubricDimension]) -> bool:
    """Whether the reviews conflict on any dimension, as agreement counts a conflict."""
    return any(
        in_conflict(
            [
                judged[dimension.name]
                for judged in (_judgements(review.scores, review.choice) for review in reviews)
                if dimension.name in judged
            ],
            _SCALES[dimension.scale],
            RATING_SPREAD,
        )
        for dimension in dimensions
    )


def _messages(input_messages: str, input_text: str) -> list[dict[str, str]]:
    try:
        messages = json.loads(input_messages)
    except (TypeError, ValueError):
        messages = None
    if isinstance(messages, list) and messages:
        return [{"role": str(turn.get("role", "")), "content": str(turn.get("content", ""))} for turn in messages]
    return [{"role": "user", "content": input_text}]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
