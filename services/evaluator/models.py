"""The evaluator door's answers. Internal until contracts/http.py adopts them for clients."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from contracts.events import EvaluationCompleted


class EvaluationStatus(BaseModel):
    evaluation_id: str = Field(description="Evaluation id.")
    status: str = Field(description="queued, running, completed or failed.")
    request: dict[str, Any] = Field(description="What was asked: candidate, baseline, golden set, suite.")
    result: EvaluationCompleted | None = Field(default=None, description="The evaluation.completed payload, once finished.")
    created_at: str = Field(description="When it was requested (UTC, ISO 8601).")
    updated_at: str = Field(description="When its status last changed (UTC, ISO 8601).")


class EvaluationList(BaseModel):
    data: list[EvaluationStatus] = Field(description="Evaluations, newest first.")
