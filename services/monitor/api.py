"""The monitor's door: alerts (list, acknowledge, resolve), the metrics summary, read-only SQL, and the console.

The query door (`POST /v1/query`, viewer or above) runs what the query guard accepts: one SELECT over
Flywheel's tables and views, allowed functions only, under the caps (time, rows, bytes, memory). A query
the guard cannot parse is a 400 `query_invalid`; one it parses and refuses (a write, a table function,
`file()`, `system.*`, SETTINGS, ...) is a 403 `query_refused`, since the SQL is understood and simply not
permitted at this door; one the engine stops at a cap is a 400 `query_over_limit` naming the cap.

The console page (`/monitor/console`) is a section of the runtime's console: it signs in there, and
shows alerts, per-version charts, drift, canaries under watch and the production adapter's lineage. An
operator acknowledges or resolves an alert from it with a form, which changes the alert exactly as the
JSON door does, in the signed-in principal's name. The traces and sessions pages beside it
(`/monitor/console/traces`, `/monitor/console/sessions`) are trace_pages.py's.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import Field, TypeAdapter

from contracts.events import AlertRaised, AlertState
from contracts.http import QueryRequest, QueryResult, Request, Role
from contracts.ids import AlertId
from services.monitor.console import DRIFT_KINDS, page_context
from services.monitor.guard_pages import create_guard_pages
from services.monitor.service import Monitor
from services.monitor.trace_pages import create_trace_pages
from services.runtime.auth import Authenticator, Principal
from services.runtime.clickhouse import ClickHouseError
from services.runtime.clickhouse.query_guard import QueryLimits, QueryOverLimit, QueryRefused
from services.runtime.console import Console, ConsoleRefused, ConsoleUser, checked
from services.runtime.http import DoorError

CONSOLE = "/monitor/console"
NOTE_MAX_LENGTH = 2000
_ALERT_ID = TypeAdapter(AlertId)
# What the console's alert form may ask for, by the value of its `state` button.
_CONSOLE_STATES = {state.value: state for state in (AlertState.acknowledged, AlertState.resolved)}


class AlertNote(Request):
    note: str | None = Field(default=None, max_length=NOTE_MAX_LENGTH, description="Why, in words.")


def create_router(
    monitor: Monitor,
    auth: Authenticator,
    *,
    console: Console,
    console_hours: int,
    lineage: Any = None,
    query_limits: QueryLimits | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/monitor", tags=["monitor"])
    limits = query_limits or QueryLimits()
    templates = console.templates("services.monitor")
    reader = auth.require(Role.viewer)
    writer = auth.require(Role.operator)

    @router.get("/v1/alerts")
    async def list_alerts(
        state: AlertState | None = None, limit: int = Query(200, ge=1, le=5000), _: Principal = Depends(reader)
    ) -> list[dict]:
        return await asyncio.to_thread(monitor.store.alerts, state.value if state else None, limit)

    async def change(alert_id: str, state: AlertState, who: Principal, body: AlertNote | None) -> AlertRaised:
        alert = await monitor.alerts.set_state(alert_id, state, who.name, body.note if body else None)
        if alert is None:
            raise DoorError(404, f"no alert {alert_id!r}", param="alert_id", code="alert_not_found")
        return alert

    @router.post("/v1/alerts/{alert_id}/ack", response_model=AlertRaised)
    async def acknowledge(
        alert_id: AlertId, body: AlertNote | None = None, who: Principal = Depends(writer)
    ) -> AlertRaised:
        return await change(alert_id, AlertState.acknowledged, who, body)

    @router.post("/v1/alerts/{alert_id}/resolve", response_model=AlertRaised)
    async def resolve(
        alert_id: AlertId, body: AlertNote | None = None, who: Principal = Depends(writer)
    ) -> AlertRaised:
        return await change(alert_id, AlertState.resolved, who, body)

    @router.get("/v1/metrics/summary")
    async def summary(
        hours: int = Query(24, ge=1, le=24 * 90),
        bucket_s: int = Query(3600, ge=10, le=86400),
        _: Principal = Depends(reader),
    ) -> dict:
        since = datetime.now(UTC) - timedelta(hours=hours)
        rows = await asyncio.to_thread(monitor.store.summary, since, bucket_s)
        latest = await asyncio.to_thread(monitor.store.evaluations, since, None, 200)
        return {"since": since, "bucket_s": bucket_s, "buckets": rows, "evaluations": latest}

    @router.post("/v1/query", response_model=QueryResult)
    async def query(body: QueryRequest, _: Principal = Depends(reader)) -> QueryResult:
        try:
            return await asyncio.to_thread(
                monitor.store.read_only_query, body.sql, body.parameters, body.max_rows, limits
            )
        except QueryRefused as refused:
            raise DoorError(refused.status, str(refused), param="sql", code=refused.code) from None
        except QueryOverLimit as over:
            raise DoorError(400, str(over), param="sql", code="query_over_limit") from None
        except ClickHouseError as error:
            status = 403 if error.code == 164 else 400
            raise DoorError(
                status, f"ClickHouse refused the query: {error}", param="sql", code=error.name or "query_failed"
            ) from None

    # The console's pages are for people, not API clients: like the runtime's console, not in the OpenAPI document.
    @router.get("/console", response_class=HTMLResponse, include_in_schema=False)
    async def console_page(request: HttpRequest, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        now = datetime.now(UTC)
        since = now - timedelta(hours=console_hours)
        bucket_s = max(60, console_hours * 3600 // 48)
        rows = await asyncio.to_thread(monitor.store.summary, since, bucket_s)
        alerts = await asyncio.to_thread(monitor.store.alerts, None, 50)
        evaluations = await asyncio.to_thread(monitor.store.evaluations, since, DRIFT_KINDS)
        production = await lineage(user.key) if lineage is not None else None
        canaries = await asyncio.to_thread(monitor.canaries.watched)
        context = await asyncio.to_thread(
            page_context,
            rows,
            alerts,
            evaluations,
            production,
            canaries=canaries,
            generated_at=now,
            since=since,
        )
        return console.page(
            request,
            templates,
            "console.html",
            user,
            title="Monitor",
            may_change=user.csrf is not None and user.principal.may(Role.operator),
            note_max_length=NOTE_MAX_LENGTH,
            **context,
        )

    router.include_router(create_trace_pages(monitor.store, console, limits))
    router.include_router(create_guard_pages(monitor.store, console, limits))

    @router.post("/console/alerts/{alert_id}", include_in_schema=False)
    async def change_from_console(
        request: HttpRequest, alert_id: str, user: ConsoleUser = Depends(console.viewer)
    ) -> RedirectResponse:
        fields = await console.form(request, user, Role.operator)
        alert_id = checked(_ALERT_ID, alert_id, "no such alert: an alert id is letters, digits, '.', '_' and '-'", user)
        state = _CONSOLE_STATES.get(fields.get("state", ""))
        if state is None:
            raise ConsoleRefused(400, "the form names no change: acknowledged or resolved; nothing was changed", user)
        note = fields.get("note", "").strip() or None
        if note is not None and len(note) > NOTE_MAX_LENGTH:
            raise ConsoleRefused(
                400, f"the note is longer than {NOTE_MAX_LENGTH} characters; nothing was changed", user
            )
        if await monitor.alerts.set_state(alert_id, state, user.principal.name, note) is None:
            raise ConsoleRefused(404, f"no alert {alert_id!r}", user)
        return RedirectResponse(CONSOLE, status_code=303)

    # The console's sign-in and sign-out were the monitor's own until every service shared the runtime's;
    # bookmarks and scripts that use the old addresses are sent on, method and form kept (307).
    @router.api_route("/console/login", methods=["GET", "POST"], include_in_schema=False)
    async def old_login() -> RedirectResponse:
        return RedirectResponse(f"/console/login?next={quote(CONSOLE, safe='')}", status_code=307)

    @router.api_route("/console/logout", methods=["GET", "POST"], include_in_schema=False)
    async def old_logout() -> RedirectResponse:
        return RedirectResponse("/console/logout", status_code=307)

    return router
