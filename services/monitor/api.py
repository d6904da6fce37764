"""The monitor's door: alerts (list, acknowledge, resolve), the metrics summary, read-only SQL, and the console."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse
from pydantic import Field

from contracts.events import AlertRaised, AlertState
from contracts.http import QueryRequest, QueryResult, Request, Role
from services.monitor.console import render_console
from services.monitor.service import Monitor
from services.runtime.auth import Authenticator, Principal
from services.runtime.clickhouse import ClickHouseError
from services.runtime.http import DoorError


class AlertNote(Request):
    note: str | None = Field(default=None, max_length=2000, description="Why, in words.")


def build_router(monitor: Monitor, auth: Authenticator, *, console_hours: int, lineage: Any = None) -> APIRouter:
    router = APIRouter(prefix="/monitor", tags=["monitor"])
    reader = auth.require(Role.viewer)
    writer = auth.require(Role.operator)

    @router.get("/v1/alerts")
    async def list_alerts(state: AlertState | None = None, limit: int = Query(200, ge=1, le=5000), _: Principal = Depends(reader)) -> list[dict]:
        return await asyncio.to_thread(monitor.store.alerts, state.value if state else None, limit)

    async def change(alert_id: str, state: AlertState, who: Principal, body: AlertNote | None) -> AlertRaised:
        alert = await monitor.set_state(alert_id, state, who.name, body.note if body else None)
        if alert is None:
            raise DoorError(404, f"no alert {alert_id!r}", param="alert_id", code="alert_not_found")
        return alert

    @router.post("/v1/alerts/{alert_id}/ack", response_model=AlertRaised)
    async def acknowledge(alert_id: str, body: AlertNote | None = None, who: Principal = Depends(writer)) -> AlertRaised:
        return await change(alert_id, AlertState.acknowledged, who, body)

    @router.post("/v1/alerts/{alert_id}/resolve", response_model=AlertRaised)
    async def resolve(alert_id: str, body: AlertNote | None = None, who: Principal = Depends(writer)) -> AlertRaised:
        return await change(alert_id, AlertState.resolved, who, body)

    @router.get("/v1/metrics/summary")
    async def summary(hours: int = Query(24, ge=1, le=24 * 90), bucket_s: int = Query(3600, ge=10, le=86400), _: Principal = Depends(reader)) -> dict:
        since = datetime.now(UTC) - timedelta(hours=hours)
        rows = await asyncio.to_thread(monitor.store.summary, since, bucket_s)
        latest = [_plain(e) for e in list(monitor.history)[-200:]]
        return {"since": since, "bucket_s": bucket_s, "buckets": rows, "evaluations": latest}

    @router.post("/v1/query", response_model=QueryResult)
    async def query(body: QueryRequest, _: Principal = Depends(reader)) -> QueryResult:
        try:
            return await asyncio.to_thread(monitor.store.read_only_query, body.sql, body.parameters, body.max_rows)
        except ClickHouseError as error:
            status = 403 if error.code == 164 else 400
            raise DoorError(status, f"ClickHouse refused the query: {error}", param="sql", code=error.name or "query_failed") from None

    @router.get("/console", response_class=HTMLResponse)
    async def console(_: Principal = Depends(reader)) -> HTMLResponse:
        since = datetime.now(UTC) - timedelta(hours=console_hours)
        bucket_s = max(60, console_hours * 3600 // 48)
        rows = await asyncio.to_thread(monitor.store.summary, since, bucket_s)
        alerts = await asyncio.to_thread(monitor.store.alerts, None, 50)
        production = await lineage() if lineage is not None else None
        return HTMLResponse(render_console(rows, alerts, list(monitor.history), production, generated_at=datetime.now(UTC)))

    return router


def _plain(evaluation: Any) -> dict:
    return {
        "rule": evaluation.rule.name, "metric": evaluation.rule.metric, "scope": evaluation.scope, "value": evaluation.value,
        "samples": evaluation.samples, "firing": evaluation.firing, "reason": evaluation.reason, "window_end": evaluation.window_end,
    }
