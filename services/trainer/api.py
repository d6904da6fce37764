"""The trainer's HTTP door: /trainer/v1/training-jobs."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Query, Response

from contracts.events import TrainingRequested
from contracts.http import ErrorResponse, Role, TrainingJobCreate, TrainingJobView
from contracts.ids import JobId
from services.runtime.auth import Authenticator, Principal
from services.runtime.http import DoorError
from services.trainer.service import Trainer
from services.trainer.store import JobRecord


def view(job: JobRecord) -> TrainingJobView:
    return TrainingJobView(
        job_id=job.job_id,
        model_name=job.model_name,
        dataset=job.dataset,
        start_adapter_version=job.start_adapter_version,
        preference_dataset=job.preference_dataset,
        status=job.status,  # type: ignore[arg-type]
        step=job.step,
        total_steps=job.total_steps,
        loss=job.loss,
        error=job.error,
    )


def create_router(trainer: Trainer, auth: Authenticator) -> APIRouter:
    router = APIRouter(
        prefix="/trainer/v1",
        tags=["trainer"],
        responses={status: {"model": ErrorResponse} for status in (401, 403, 404, 422)},
    )
    reader = auth.require(Role.viewer)
    writer = auth.require(Role.operator)

    @router.post("/training-jobs", status_code=202, response_model=TrainingJobView)
    async def create_job(
        body: TrainingJobCreate, response: Response, principal: Principal = Depends(writer)
    ) -> TrainingJobView:
        request = TrainingRequested(
            job_id=body.job_id or str(uuid.uuid4()),
            model_name=body.model_name,
            dataset=body.dataset,
            hyperparameters=body.hyperparameters,
            start_adapter_version=body.start_adapter_version,
            preference_dataset=body.preference_dataset,
            requested_by=principal.name,
        )
        job, created = trainer.submit(request)
        if not created:
            response.status_code = 200
        return view(job)

    @router.get("/training-jobs", response_model=list[TrainingJobView])
    async def list_jobs(
        limit: int = Query(100, ge=1, le=1000), _: Principal = Depends(reader)
    ) -> list[TrainingJobView]:
        return [view(job) for job in trainer.list(limit)]

    @router.get("/training-jobs/{job_id}", response_model=TrainingJobView)
    async def get_job(job_id: JobId, _: Principal = Depends(reader)) -> TrainingJobView:
        job = trainer.get(job_id)
        if job is None:
            raise DoorError(404, f"no training job {job_id}", param="job_id", code="job_not_found")
        return view(job)

    @router.post("/training-jobs/{job_id}/cancel", response_model=TrainingJobView)
    async def cancel_job(job_id: JobId, _: Principal = Depends(writer)) -> TrainingJobView:
        job = await trainer.cancel(job_id)
        if job is None:
            raise DoorError(404, f"no training job {job_id}", param="job_id", code="job_not_found")
        return view(job)

    return router
