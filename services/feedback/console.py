"""The review queues' pages in the web console, under /feedback/console/review: every queue with its counts
and its reviewers' agreement for anyone signed in, and a reviewer's working page, made to be worked from
the keyboard.

The pages translate like the JSON door (review_api.py): they read and change through ReviewQueues, with
the session's principal as the reviewer, and what the use cases refuse (no live claim, a score off its
scale) comes back as a refusal page with the door's status. A claim, a review and a skip are form posts
(the session's CSRF token, the reviewer role) answered by a redirect to the next item, so reloading a page
neither claims nor reviews anything.

No script runs on a console page (its Content-Security-Policy), so the keyboard is HTML's own: every score
choice, Submit, Skip and Next carries an `accesskey` (Alt+key in Chrome and Edge, Alt+Shift+key in Firefox,
Ctrl+Option+key on a Mac), the first score takes the focus, radio groups answer the arrow keys, and
`required` has the browser ask for a missing score or a skip's reason before anything is posted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import StringConstraints, TypeAdapter, ValidationError

from contracts.http import (
    ReviewAgreement,
    ReviewQueueView,
    ReviewRule,
    ReviewSelect,
    ReviewSkip,
    ReviewSubmit,
    ReviewTarget,
    Role,
    RubricScale,
    RubricVersionView,
)
from contracts.ids import ReviewQueueName
from services.feedback.review import ReviewQueues
from services.runtime.broker import PUBLISH_FAILURES
from services.runtime.console import Console, ConsoleRefused, ConsoleUser, checked
from services.runtime.console.console import FORM_BODY_LIMIT
from services.runtime.errors import DomainError
from services.runtime.http import status_of

T = TypeVar("T")
PREFIX = "/feedback/console/review"
QUEUE_NAME: TypeAdapter[str] = TypeAdapter(ReviewQueueName)
ITEM_ID: TypeAdapter[str] = TypeAdapter(Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")])
# A review form carries a correction (32,000 characters) and a comment (8,000): posted as a form, a character
# takes up to 12 bytes (four UTF-8 bytes, each written %XX), and the rest of the form is under the console's own
# limit. Only this page's review form is allowed that much; every other console form keeps FORM_BODY_LIMIT.
REVIEW_FORM_LIMIT = (32_000 + 8_000) * 12 + FORM_BODY_LIMIT
SCORE_FIELD = "score."

# The page's own keys, the same on every review page, and keys Chrome and Edge keep for themselves on Linux
# and Windows (Alt+D the address bar, Alt+E and Alt+F the menu): a score never gets one of them.
ACTION_KEYS = {"submit": "s", "skip": "k", "reason": "r", "correction": "c", "comment": "m", "next": "n"}
BROWSER_KEYS = frozenset("def")
FREE_KEYS = [key for key in "abcdefghijklmnopqrstuvwxyz1234567890" if key not in BROWSER_KEYS]
# Thumbs up and down on u and j: j is under u on the keyboard, and down in vi.
THUMB_KEYS = {"up": "u", "down": "j"}
# A pairwise item's choice: 1 the left (first) answer, 2 the right (second), t a tie; its rubric's dimensions
# are not scored, so the digits are free.
CHOICE_KEYS = {"first": "1", "second": "2", "tie": "t"}
CHOICE_LABELS = {"first": "answer 1 (left)", "second": "answer 2 (right)", "tie": "tie: neither is better"}
SKIP_REASONS = ("outside my expertise", "cannot judge without more context", "personal data in it", "not an answer")
# What the last post did, as the next page says it (the page takes only these words from its address).
OUTCOMES = {
    "waiting": "Your review was recorded; the item waits for its other reviewers.",
    "adjudication": "Your review was recorded; the reviewers disagreed, so the item goes to adjudication.",
    "done": "Your review was recorded; the item is done.",
    "skipped": "Skipped; the item will not be offered to you again.",
}


def create_console_router(queues: ReviewQueues, console: Console, *, publish_timeout_s: float = 10.0) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["console"], include_in_schema=False)
    templates = console.templates("services.feedback")
    templates.filters["num"] = number

    async def call(user: ConsoleUser, running: Awaitable[T]) -> T:
        """A use case; what it refuses becomes a refusal page with the JSON door's status."""
        try:
            return await running
        except DomainError as error:
            raise ConsoleRefused(status_of(error), str(error), user) from None

    async def next_item(name: str, user: ConsoleUser, outcome: str | None) -> RedirectResponse:
        """Claim the reviewer's next item of the queue and go to it, or back to the queue saying nothing is left."""
        item = await call(user, queues.claim(name, user.principal.name))
        said = f"last={outcome}" if outcome else ""
        if item is None:
            return RedirectResponse(f"{queue_path(name)}?left=none{'&' + said if said else ''}", status_code=303)
        return RedirectResponse(f"{queue_path(name)}/items/{item.item_id}{'?' + said if said else ''}", status_code=303)

    # ------------------------------------------------------------------------------------- queues
    @router.get("", response_class=HTMLResponse)
    async def every_queue(request: Request, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        views = await call(user, queues.views())
        return console.page(
            request,
            templates,
            "review_queues.html",
            user,
            title="Review queues",
            queues=[queue_facts(view) for view in views],
            may_review=may_review(user),
        )

    @router.get("/queues/{name}", response_class=HTMLResponse)
    async def one_queue(request: Request, name: str, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        name = checked(QUEUE_NAME, name, f"no review queue named {name!r}", user)
        view = await call(user, queues.view(name))
        return console.page(
            request,
            templates,
            "review_queue.html",
            user,
            title=f"Review queue {name}",
            queue=queue_facts(view),
            dimensions=view.rubric.dimensions,
            instructions=view.rubric.instructions,
            nothing_left=request.query_params.get("left") == "none",
            outcome=OUTCOMES.get(request.query_params.get("last", "")),
            may_review=may_review(user),
            keys=ACTION_KEYS,
        )

    @router.post("/queues/{name}/claim")
    async def claim(request: Request, name: str, user: ConsoleUser = Depends(console.viewer)) -> RedirectResponse:
        await console.form(request, user, Role.reviewer)
        name = checked(QUEUE_NAME, name, f"no review queue named {name!r}", user)
        return await next_item(name, user, None)

    # -------------------------------------------------------------------------------------- items
    @router.get("/queues/{name}/items/{item_id}", response_class=HTMLResponse)
    async def item_page(
        request: Request, name: str, item_id: str, user: ConsoleUser = Depends(console.viewer)
    ) -> HTMLResponse:
        name = checked(QUEUE_NAME, name, f"no review queue named {name!r}", user)
        item_id = checked(ITEM_ID, item_id, f"no review item {item_id!r}", user)
        if not user.principal.may(Role.reviewer):
            raise ConsoleRefused(
                403, f"{user.principal.name} has role {user.principal.role.value}; reviewing needs reviewer", user
            )
        item = await call(user, queues.held(item_id, user.principal.name))
        if item.queue != name:
            raise ConsoleRefused(404, f"review item {item_id} is not in queue {name}", user)
        pairwise = item.second_answer is not None
        # A whole trace or session has no one answer to correct: its reviewers score it and comment.
        whole = item.target is not ReviewTarget.inference
        dimensions = [pairwise_choice()] if pairwise else keyed(item.rubric)
        return console.page(
            request,
            templates,
            "review_item.html",
            user,
            title=f"Review {name}",
            item=item,
            dimensions=dimensions,
            pairwise=pairwise,
            whole=whole,
            earlier=[earlier_review(review, dimensions) for review in item.reviews],
            outcome=OUTCOMES.get(request.query_params.get("last", "")),
            keys=ACTION_KEYS,
            legend=legend(dimensions, correction=not pairwise and not whole),
            skip_reasons=SKIP_REASONS,
            may_review=user.csrf is not None,
        )

    @router.post("/queues/{name}/items/{item_id}/submit")
    async def submit(
        request: Request, name: str, item_id: str, user: ConsoleUser = Depends(console.viewer)
    ) -> RedirectResponse:
        fields = await console.form(request, user, Role.reviewer, limit=REVIEW_FORM_LIMIT)
        name = checked(QUEUE_NAME, name, f"no review queue named {name!r}", user)
        item_id = checked(ITEM_ID, item_id, f"no review item {item_id!r}", user)
        review = parsed_review(fields, user)
        try:
            accepted = await call(
                user, asyncio.wait_for(queues.submit(item_id, user.principal.name, review), publish_timeout_s)
            )
        except PUBLISH_FAILURES as error:
            raise ConsoleRefused(
                503,
                f"Kafka did not take the review within {publish_timeout_s:g} s ({type(error).__name__}); nothing was "
                "recorded and your claim still holds: go back and submit it again",
                user,
            ) from None
        return await next_item(name, user, accepted.stage)

    @router.post("/queues/{name}/items/{item_id}/skip")
    async def skip(
        request: Request, name: str, item_id: str, user: ConsoleUser = Depends(console.viewer)
    ) -> RedirectResponse:
        fields = await console.form(request, user, Role.reviewer)
        name = checked(QUEUE_NAME, name, f"no review queue named {name!r}", user)
        item_id = checked(ITEM_ID, item_id, f"no review item {item_id!r}", user)
        try:
            reason = ReviewSkip(reason=fields.get("reason", "").strip())
        except ValidationError:
            raise ConsoleRefused(
                422, "reason: say in 1 to 500 characters why you pass the item on; nothing was changed", user
            ) from None
        await call(user, queues.skip(item_id, user.principal.name, reason))
        return await next_item(name, user, "skipped")

    return router


def queue_path(name: str) -> str:
    return f"{PREFIX}/queues/{quote(name, safe='')}"


def may_review(user: ConsoleUser) -> bool:
    """Whether a page offers the claim form: the server checks every post anyway, this spares others a button."""
    return user.csrf is not None and user.principal.may(Role.reviewer)


def parsed_review(fields: dict[str, str], user: ConsoleUser) -> ReviewSubmit:
    """The review form as the JSON door's body; its own checks (every dimension, each on its scale) are the
    use case's. Browsers post a textarea's line breaks as CRLF: kept as the reviewer typed them, LF."""

    def text(name: str) -> str | None:
        return fields.get(name, "").replace("\r\n", "\n").strip() or None

    scores = {name.removeprefix(SCORE_FIELD): value for name, value in fields.items() if name.startswith(SCORE_FIELD)}
    try:
        return ReviewSubmit(
            scores=scores, choice=text("choice"), correction=text("correction"), comment=text("comment")
        )
    except ValidationError as error:
        problem = next(iter(error.errors()), {})
        where = ".".join(str(part) for part in problem.get("loc", ())) or "form"
        raise ConsoleRefused(422, f"{where}: {problem.get('msg', 'invalid')}; nothing was recorded", user) from None


# ----------------------------------------------------------------------------- what pages show


def queue_facts(view: ReviewQueueView) -> dict[str, Any]:
    """A queue as its rows show it: the rule in words, its rubric as name:vN, counts, agreement."""
    return {
        "name": view.name,
        "path": queue_path(view.name),
        "version": view.version,
        "rule": rule_in_words(view.rule),
        "rubric": f"{view.rubric.name}:v{view.rubric.version}",
        "reviewers_per_item": view.reviewers_per_item,
        "lease_seconds": view.lease_seconds,
        "max_items": view.max_items,
        "created_at": view.created_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "created_by": view.created_by,
        "counts": view.counts,
        "agreement": [agreement_facts(measured) for measured in view.agreement],
    }


def agreement_facts(measured: ReviewAgreement) -> dict[str, Any]:
    return {
        "dimension": measured.dimension,
        "level": measured.level,
        "judged": measured.items,
        "alpha": measured.alpha,
        "kappa": measured.kappa,
        "without": sorted(measured.alpha_without.items()),
    }


_ORDER_WORDS = {
    "uncertainty": "the least grounded first",
    "least_confident": "those the model was least sure of first",
    "newest": "newest first",
}


def rule_in_words(rule: ReviewRule) -> str:
    """`{select: low_groundedness, floor: 0.4, ...}` as `answers of support-bot whose groundedness ...`."""
    if rule.target is not ReviewTarget.inference:
        whole = f"{rule.target.value}s" + (f" with a span or call of {rule.model_name}" if rule.model_name else "")
        chosen = {
            ReviewSelect.thumbs_down: f"{whole} given thumbs down or a rating of 1 or 2 (on it, a span or a call of it; by anyone but a reviewer)",
            ReviewSelect.errored: f"{whole} with an error span",
        }.get(rule.select, whole)
        share = f"{rule.share:.0%} of the " if rule.share < 1 else "every one of the "
        return f"{share}{chosen}, in the last {rule.window_hours} h, newest first"
    chosen = {
        ReviewSelect.traffic: f"answers of {rule.model_name}",
        ReviewSelect.thumbs_down: f"answers of {rule.model_name} given thumbs down (by anyone but a reviewer)",
        ReviewSelect.low_groundedness: f"answers of {rule.model_name} whose MiniLM groundedness is under {rule.floor:g}",
        ReviewSelect.judge_disagreement: f"answers of {rule.model_name} on which a judge and an end user disagree",
        ReviewSelect.pairs: f"prompts to {rule.model_name} with two different answers (of two versions or routes where there are), side by side",
    }[rule.select]
    words = [f"{rule.share:.0%} of the " + chosen if rule.share < 1 else "every one of the " + chosen]
    if rule.route is not None:
        words.append(f"served on the {rule.route.value} route")
    words.append(f"in the last {rule.window_hours} h")
    words.append(_ORDER_WORDS[rule.order.value])
    return ", ".join(words)


def number(value: float | None) -> str:
    """An agreement coefficient to three places; none when it is undefined."""
    return "undefined" if value is None else f"{value:.3f}"


def keyed(rubric: RubricVersionView) -> list[dict[str, Any]]:
    """The rubric's dimensions with their choices and a key for each, no two alike on the page: digits for a
    rating, u and j for thumbs, a letter of its own for a label; a key already taken gives way to the next
    free one, and a choice left without a free key has none (Tab and the arrows still reach it)."""
    taken = set(ACTION_KEYS.values())
    free = [key for key in FREE_KEYS if key not in taken]

    def key_for(*wanted: str) -> str | None:
        for key in [*wanted, *free]:
            if key in free:
                free.remove(key)
                return key
        return None

    dimensions = []
    for dimension in rubric.dimensions:
        if dimension.scale is RubricScale.thumbs:
            choices = [(value, value, key_for(THUMB_KEYS[value])) for value in ("up", "down")]
        elif dimension.scale is RubricScale.rating:
            choices = [(str(value), str(value), key_for(str(value))) for value in range(1, 6)]
        else:
            choices = [
                (label, label, key_for(*(char for char in label.lower() if char in FREE_KEYS)))
                for label in dimension.labels
            ]
        dimensions.append(
            {
                "name": dimension.name,
                "field": SCORE_FIELD + dimension.name,
                "description": dimension.description,
                "scale": dimension.scale.value,
                "choices": [{"value": value, "label": label, "key": key} for value, label, key in choices],
            }
        )
    return dimensions


def pairwise_choice() -> dict[str, Any]:
    """A pairwise item's choice, shaped as a keyed dimension, so the page asks for it as it asks for a score."""
    return {
        "name": "choice",
        "field": "choice",
        "description": "Which answer is better, as the instructions say?",
        "scale": "pick one",
        "choices": [{"value": value, "label": CHOICE_LABELS[value], "key": key} for value, key in CHOICE_KEYS.items()],
    }


def legend(dimensions: list[dict[str, Any]], *, correction: bool = True) -> list[tuple[str, str]]:
    """(key, what it does) for every key of the item page, in the page's order."""
    keys = [
        (choice["key"], f"{dimension['name']}: {choice['label']}")
        for dimension in dimensions
        for choice in dimension["choices"]
        if choice["key"]
    ]
    return [
        *keys,
        *([(ACTION_KEYS["correction"], "write a correction")] if correction else []),
        (ACTION_KEYS["comment"], "write a comment"),
        (ACTION_KEYS["submit"], "submit the review and go to the next item"),
        (ACTION_KEYS["reason"], "write why you skip"),
        (ACTION_KEYS["skip"], "skip the item with that reason and go to the next"),
    ]


def earlier_review(review: dict[str, Any], dimensions: list[dict[str, Any]]) -> dict[str, Any]:
    """An earlier reviewer's judgement, shown to an adjudicator in the page's order of what is judged (the
    rubric's dimensions, or a pairwise item's choice)."""
    judged = {**(review.get("scores") or {}), **({"choice": review["choice"]} if review.get("choice") else {})}
    return {
        "reviewer": review.get("reviewer", ""),
        "scores": [judged.get(dimension["name"], "") for dimension in dimensions],
        "correction": review.get("correction"),
    }
