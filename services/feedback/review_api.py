"""The review queues' door, under `/feedback/v1/review`: operators define and fill queues, reviewers claim,
score and skip items, anyone with a viewer's key reads a queue's counts and agreement."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Path, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from contracts.http import (
    ErrorResponse,
    ReviewAccepted,
    ReviewFillResult,
    ReviewItemView,
    ReviewQueueCreate,
    ReviewQueueView,
    ReviewSkip,
    ReviewSubmit,
    Role,
    RubricVersionView,
)
from contracts.ids import NAME_MAX_LENGTH, NAME_PATTERN
from services.feedback.api import broker_refused
from services.feedback.review import ReviewQueues
from services.runtime.auth import Authenticator, Principal
from services.runtime.broker import PUBLISH_FAILURES

# Reads the rubric a queue is defined on from the registry, with the defining operator's own key: the
# feedback service needs no registry key of its own, and reads only what that operator may read.
RubricSource = Callable[[str, str, int | None], Awaitable[RubricVersionView]]

_bearer = HTTPBearer(auto_error=False)
_QUEUE = Path(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH, description="Review queue name.")
_ITEM = Path(pattern=r"^[0-9a-f]{32}$", description="Review item id, as a claim returned it.")


def create_review_router(
    queues: ReviewQueues, auth: Authenticator, rubrics: RubricSource, *, publish_timeout_s: float = 10.0
) -> APIRouter:
    router = APIRouter(
        prefix="/feedback/v1/review",
        tags=["review"],
        responses={status: {"model": ErrorResponse} for status in (401, 403, 404, 409, 422, 503)},
    )
    reader = auth.require(Role.viewer)
    operator = auth.require(Role.operator)
    reviewer = auth.require(Role.reviewer)

    @router.post("/queues", status_code=201, response_model=ReviewQueueView)
    async def define_queue(
        request: ReviewQueueCreate,
        caller: Principal = Depends(operator),
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> ReviewQueueView:
        """Define a review queue, or its next version when the name exists: the rule that fills it, the
        registry rubric (a version, or the latest now) reviewers score on, the reviewers each item needs and
        how long a claim holds. Needs operator; the rubric is read from the registry with the caller's key."""
        assert credentials is not None  # the operator dependency authenticated it
        rubric = await rubrics(credentials.credentials, request.rubric, request.rubric_version)
        return await queues.define(request, rubric, caller.name)

    @router.get("/queues", response_model=list[ReviewQueueView])
    async def list_queues(_: Principal = Depends(reader)) -> list[ReviewQueueView]:
        """Every queue's latest definition, its items by state and the agreement of its reviewers."""
        return await queues.views()

    @router.get("/queues/{name}", response_model=ReviewQueueView)
    async def show_queue(name: str = _QUEUE, _: Principal = Depends(reader)) -> ReviewQueueView:
        """One queue: its definition, its items by state, and Krippendorff's alpha per rubric dimension (with
        Cohen's kappa when exactly two reviewers judged the same items, and alpha without each reviewer)."""
        return await queues.view(name)

    @router.post("/queues/{name}/fill", response_model=ReviewFillResult)
    async def fill_queue(name: str = _QUEUE, _: Principal = Depends(operator)) -> ReviewFillResult:
        """Add what the queue's rule matches now, one item per prompt (a claim on an empty queue also fills
        it, at most once a minute). Needs operator."""
        return await queues.fill(name)

    @router.post(
        "/queues/{name}/claim",
        response_model=ReviewItemView,
        responses={204: {"description": "Nothing is left in the queue for this reviewer."}},
    )
    async def claim_item(name: str = _QUEUE, caller: Principal = Depends(reviewer)) -> ReviewItemView | Response:
        """Lease the next item to the calling reviewer (adjudications first, then in the queue's order: the
        least grounded, the least confident or the newest): its conversation, answer, rubric, and for an adjudication the
        reviews that disagree. Asking again while the lease holds returns the same item. 204 when nothing is
        left for this reviewer. Needs reviewer."""
        item = await queues.claim(name, caller.name)
        return item if item is not None else Response(status_code=204)

    @router.post("/items/{item_id}/submit", response_model=ReviewAccepted)
    async def submit_review(
        review: ReviewSubmit, item_id: str = _ITEM, caller: Principal = Depends(reviewer)
    ) -> ReviewAccepted:
        """Score a claimed item on every rubric dimension, with an optional correction and comment. It is
        published as feedback.reviewed (the queue, item, rubric version and scores, the caller's principal as
        actor); 409 when the caller holds no live claim on it. Needs reviewer."""
        try:
            return await asyncio.wait_for(queues.submit(item_id, caller.name, review), publish_timeout_s)
        except PUBLISH_FAILURES as error:
            raise broker_refused(
                "review", publish_timeout_s, error, "nothing was recorded and the claim still holds: submit it again"
            ) from None

    @router.post("/items/{item_id}/skip", status_code=204)
    async def skip_item(request: ReviewSkip, item_id: str = _ITEM, caller: Principal = Depends(reviewer)) -> Response:
        """Pass a claimed item on with a reason; it is not offered to this reviewer again. Needs reviewer."""
        await queues.skip(item_id, caller.name, request)
        return Response(status_code=204)

    return router
