"""The feedback door: `POST /feedback/v1/feedback` takes feedback in, `GET` reads what is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, Depends, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from contracts.http import ErrorResponse, FeedbackAccepted, FeedbackCreate, Role
from services.feedback.models import FeedbackList
from services.feedback.service import InvalidFeedback, ReviewerRoleRequired, give_feedback, list_feedback
from services.feedback.store import FeedbackStore
from services.runtime.auth import Authenticator, Principal
from services.runtime.broker import EventBus
from services.runtime.clickhouse import ClickHouseError
from services.runtime.http import DoorError
from services.runtime.privacy import Redactor

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer fw_<id>_<secret>`.")


def feedback_sender(auth: Authenticator) -> Callable[..., Principal]:
    """A dependency admitting the two kinds of callers that send feedback: apps (for their end users)
    and reviewers (corrections); every other role is refused with 403."""

    def sender(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
        principal = auth.authenticate(credentials.credentials if credentials else None)
        if not (principal.may(Role.app) or principal.may(Role.reviewer)):
            raise DoorError(
                403,
                f"{principal.name} has role {principal.role.value}; sending feedback needs app or reviewer",
                code="insufficient_role",
            )
        return principal

    return sender


def create_router(
    bus: EventBus, store: Callable[[], FeedbackStore], auth: Authenticator, redactor: Redactor
) -> APIRouter:
    router = APIRouter(
        prefix="/feedback/v1",
        tags=["feedback"],
        responses={status: {"model": ErrorResponse} for status in (401, 403, 422)},
    )
    reader = auth.require(Role.viewer)
    sender = feedback_sender(auth)

    @router.post("/feedback", status_code=202, response_model=FeedbackAccepted)
    async def post_feedback(request: FeedbackCreate, caller: Principal = Depends(sender)) -> FeedbackAccepted:
        """Accept feedback on an inference. 202: it is published now, personal data scrubbed, and stored by
        the sink; feedback on an inference not stored yet is kept and joins it when it lands. `source:
        reviewer` needs a key whose role grants reviewer (403 otherwise): only reviewers' corrections feed
        automatic retraining."""
        try:
            return await give_feedback(
                request, bus.publish, redactor, caller=caller.name, may_review=caller.may(Role.reviewer)
            )
        except InvalidFeedback as error:
            raise DoorError(422, str(error), param=error.param) from None
        except ReviewerRoleRequired as error:
            raise DoorError(403, str(error), code="reviewer_role_required", param="source") from None

    @router.get("/feedback", response_model=FeedbackList)
    async def get_feedback(
        inference_id: str = Query(min_length=1, max_length=128, description="The inference id."),
        _: Principal = Depends(reader),
    ) -> FeedbackList:
        """Stored feedback on one inference, and whether the inference is stored yet."""
        try:
            return await asyncio.to_thread(list_feedback, store(), inference_id)
        except InvalidFeedback as error:
            raise DoorError(422, str(error), param=error.param) from None
        except ClickHouseError as error:
            raise DoorError(503, f"ClickHouse cannot answer now: {error}") from None

    return router
