"""The evaluator's door: request an evaluation (operator), read one or list them (viewer)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Query

from contracts.events import EvaluationRequested
from contracts.http import ErrorResponse, EvaluationCreate, EvaluationList, EvaluationStatus, Role
from contracts.ids import EvaluationId
from services.evaluator.service import new_evaluation_id, queue_evaluation
from services.evaluator.store import EvaluationRecord, EvaluatorStore
from services.runtime.auth import Authenticator, Principal
from services.runtime.http import DoorError


def _view(record: EvaluationRecord) -> EvaluationStatus:
    return EvaluationStatus(
        evaluation_id=record.evaluation_id,
        status=record.status,
        request=record.request,
        result=record.result,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def create_router(store: EvaluatorStore, auth: Authenticator, publish: Callable[..., Awaitable[object]]) -> APIRouter:
    router = APIRouter(
        prefix="/evaluator/v1",
        tags=["evaluator"],
        responses={status: {"model": ErrorResponse} for status in (401, 403, 404, 422)},
    )
    reader = auth.require(Role.viewer)
    writer = auth.require(Role.operator)

    @router.post("/evaluations", status_code=202, response_model=EvaluationStatus)
    async def request_evaluation(body: EvaluationCreate, principal: Principal = Depends(writer)) -> EvaluationStatus:
        """Queue an evaluation; it runs on the evaluator's consumer and its result is published as evaluation.completed."""
        request = EvaluationRequested(
            evaluation_id=new_evaluation_id(),
            candidate=body.candidate,
            baseline=body.baseline,
            golden=body.golden,
            metric_suite=body.metric_suite,
            requested_by=principal.name,
        )
        await queue_evaluation(store, publish, request)
        record = await asyncio.to_thread(store.evaluation, request.evaluation_id)
        assert record is not None
        return _view(record)

    @router.get("/evaluations/{evaluation_id}", response_model=EvaluationStatus)
    async def get_evaluation(evaluation_id: EvaluationId, _: Principal = Depends(reader)) -> EvaluationStatus:
        """One evaluation: its status, and its verdict, metrics and report once finished."""
        record = await asyncio.to_thread(store.evaluation, evaluation_id)
        if record is None:
            raise DoorError(404, f"no evaluation {evaluation_id!r}", code="not_found", param="evaluation_id")
        return _view(record)

    @router.get("/evaluations", response_model=EvaluationList)
    async def list_evaluations(
        model_name: str | None = Query(default=None, description="Only evaluations of this model's candidates."),
        limit: int = Query(default=50, ge=1, le=500, description="At most this many, newest first."),
        _: Principal = Depends(reader),
    ) -> EvaluationList:
        records = await asyncio.to_thread(store.evaluations, model_name=model_name, limit=limit)
        return EvaluationList(data=[_view(record) for record in records])

    return router
