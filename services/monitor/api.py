"""The monitor's door: alerts (list, acknowledge, resolve), the metrics summary, read-only SQL, and the console.

A browser cannot send `Authorization: Bearer`, so the console has a sign-in form: the API key is
checked like any bearer key and kept in an HttpOnly, SameSite=Strict cookie whose path is the console
alone. The key is re-verified on every page, so revoking it ends the session within the key cache's
few seconds; and since the cookie is never sent to the API routes, it cannot be used to change
anything (no cross-site request can acknowledge an alert through it).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Query
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import Field

from contracts.events import AlertRaised, AlertState
from contracts.http import QueryRequest, QueryResult, Request, Role
from services.monitor.console import render_console, render_login
from services.monitor.service import Monitor
from services.runtime.auth import Authenticator, Principal
from services.runtime.clickhouse import ClickHouseError
from services.runtime.http import DoorError

CONSOLE = "/monitor/console"
COOKIE = "flywheel_console"
# A sign-in form holds one key; anything longer is not a key.
LOGIN_BODY_LIMIT = 4096
DRIFT_KINDS = ("psi", "embedding", "unsafe", "hallucination")


class AlertNote(Request):
    note: str | None = Field(default=None, max_length=2000, description="Why, in words.")


def build_router(monitor: Monitor, auth: Authenticator, *, console_hours: int, lineage: Any = None, session_s: int = 8 * 3600) -> APIRouter:
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
        latest = await asyncio.to_thread(monitor.store.evaluations, since, None, 200)
        return {"since": since, "bucket_s": bucket_s, "buckets": rows, "evaluations": latest}

    @router.post("/v1/query", response_model=QueryResult)
    async def query(body: QueryRequest, _: Principal = Depends(reader)) -> QueryResult:
        try:
            return await asyncio.to_thread(monitor.store.read_only_query, body.sql, body.parameters, body.max_rows)
        except ClickHouseError as error:
            status = 403 if error.code == 164 else 400
            raise DoorError(status, f"ClickHouse refused the query: {error}", param="sql", code=error.name or "query_failed") from None

    def viewer(key: str | None) -> Principal | None:
        """The principal of a key good for reading, or None; a registry database that cannot be read stays a 503."""
        try:
            principal = auth.authenticate(key)
        except DoorError as error:
            if error.status == 503:
                raise
            return None
        return principal if principal.may(Role.viewer) else None

    @router.get("/console", response_class=HTMLResponse, responses={303: {"description": "Not signed in: to the sign-in page."}})
    async def console(request: HttpRequest) -> Any:
        header = request.headers.get("authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else request.cookies.get(COOKIE)
        principal = await asyncio.to_thread(viewer, key) if key else None
        if principal is None:
            return RedirectResponse(f"{CONSOLE}/login", status_code=303)
        since = datetime.now(UTC) - timedelta(hours=console_hours)
        bucket_s = max(60, console_hours * 3600 // 48)
        rows = await asyncio.to_thread(monitor.store.summary, since, bucket_s)
        alerts = await asyncio.to_thread(monitor.store.alerts, None, 50)
        evaluations = await asyncio.to_thread(monitor.store.evaluations, since, DRIFT_KINDS)
        production = await lineage() if lineage is not None else None
        canaries = await asyncio.to_thread(monitor.watched_canaries)
        page = render_console(rows, alerts, evaluations, production, canaries=canaries, generated_at=datetime.now(UTC), signed_in=principal.name)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @router.get("/console/login", response_class=HTMLResponse)
    async def login_page() -> HTMLResponse:
        return HTMLResponse(render_login())

    @router.post("/console/login", response_class=HTMLResponse, responses={303: {"description": "Signed in: to the console, with the session cookie."}})
    async def login(request: HttpRequest) -> Any:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > LOGIN_BODY_LIMIT:
                return HTMLResponse(render_login(f"the form was larger than {LOGIN_BODY_LIMIT} bytes; paste only the API key"), status_code=413)
        key = (parse_qs(body.decode("utf-8", "replace")).get("api_key") or [""])[0].strip()
        if not key:
            return HTMLResponse(render_login("enter an API key (fw_...) in the field api_key"), status_code=400)
        try:
            principal = await asyncio.to_thread(auth.authenticate, key)
        except DoorError as error:
            return HTMLResponse(render_login(error.detail.message), status_code=error.status)
        if not principal.may(Role.viewer):
            return HTMLResponse(render_login(f"{principal.name} has role {principal.role.value}; the console needs viewer or higher"), status_code=403)
        response = RedirectResponse(CONSOLE, status_code=303)
        response.set_cookie(COOKIE, key, max_age=session_s, path=CONSOLE, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @router.post("/console/logout", responses={303: {"description": "Signed out: to the sign-in page."}})
    async def logout() -> RedirectResponse:
        response = RedirectResponse(f"{CONSOLE}/login", status_code=303)
        response.delete_cookie(COOKIE, path=CONSOLE, httponly=True, samesite="strict")
        return response

    return router
