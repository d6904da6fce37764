"""The feedback door: `POST /feedback/v1/feedback` takes feedback in, `GET` reads what is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, Depends, Query

from contracts.http import ErrorResponse, FeedbackAccepted, FeedbackCreate, Role
from services.feedback.models import FeedbackList
from services.feedback.service import InvalidFeedback, give_feedback, list_feedback
from services.feedback.store import FeedbackStore
from services.runtime.auth import Authenticator, Principal
from services.runtime.broker import EventBus
from services.runtime.clickhouse import ClickHouseError
from services.runtime.http import DoorError


def create_router(bus: EventBus, store: Callable[[], FeedbackStore], auth: Authenticator) -> APIRouter:
    router = APIRouter(prefix="/feedback/v1", tags=["feedback"], responses={status: {"model": ErrorResponse} for status in (401, 403, 422)})
    reader = auth.require(Role.viewer)
    sender = auth.require(Role.app)

    @router.post("/feedback", status_code=202, response_model=FeedbackAccepted)
    async def post_feedback(request: FeedbackCreate, _: Principal = Depends(sender)) -> FeedbackAccepted:
        """Accept feedback on an inference. 202: it is published now and stored by the sink; feedback on an
        inference not stored yet is kept and joins it when it lands."""
        try:
            return await give_feedback(request, bus.publish)
        except InvalidFeedback as error:
            raise DoorError(422, str(error), param=error.param) from None

    @router.get("/feedback", response_model=FeedbackList)
    async def get_feedback(inference_id: str = Query(min_length=1, max_length=128, description="The inference id."), _: Principal = Depends(reader)) -> FeedbackList:
        """Stored feedback on one inference, and whether the inference is stored yet."""
        try:
            return await asyncio.to_thread(list_feedback, store(), inference_id)
        except InvalidFeedback as error:
            raise DoorError(422, str(error), param=error.param) from None
        except ClickHouseError as error:
            raise DoorError(503, f"ClickHouse cannot answer now: {error}") from None

    return router
