"""The monitor's door: alerts (list, acknowledge, resolve), the metrics summary, read-only SQL, and the console.

The query door (`POST /v1/query`, viewer or above) runs what the query guard accepts: one SELECT over
Flywheel's tables and views, allowed functions only, under the caps (time, rows, bytes, memory). A query
the guard cannot parse is a 400 `query_invalid`; one it parses and refuses (a write, a table function,
`file()`, `system.*`, SETTINGS, ...) is a 403 `query_refused`, since the SQL is understood and simply not
permitted at this door; one the engine stops at a cap is a 400 `query_over_limit` naming the cap.

A browser cannot send `Authorization: Bearer`, so the console has a sign-in form: the API key is
checked like any bearer key and stays on the server; the browser gets a random session id in an
HttpOnly, SameSite=Strict cookie whose path is the console alone (Secure over https, or when
`FLYWHEEL_MONITOR_CONSOLE_SECURE_COOKIE` says TLS terminates in front). Every page re-checks the
session's key through the authenticator, so revoking the key ends the session within the key cache's
few seconds. Every form carries a CSRF token: the sign-in form's is paired with a cookie set with the
form (double submit), the sign-out form's is the session's own.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Query
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import Field

from contracts.events import AlertRaised, AlertState
from contracts.http import QueryRequest, QueryResult, Request, Role
from contracts.ids import AlertId
from services.monitor.console import ConsoleSessions, render_console, render_login, same_token
from services.monitor.service import Monitor
from services.runtime.auth import Authenticator, Principal
from services.runtime.clickhouse import ClickHouseError
from services.runtime.clickhouse.query_guard import QueryLimits, QueryOverLimit, QueryRefused
from services.runtime.http import DoorError

CONSOLE = "/monitor/console"
COOKIE = "flywheel_console"
# The sign-in form's CSRF token, paired with the same value in the form (there is no session yet).
LOGIN_CSRF_COOKIE = "flywheel_console_login"
_LOGIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
# A sign-in form holds one key; anything longer is not a key.
LOGIN_BODY_LIMIT = 4096
DRIFT_KINDS = ("psi", "embedding", "unsafe", "hallucination")


class AlertNote(Request):
    note: str | None = Field(default=None, max_length=2000, description="Why, in words.")


def create_router(
    monitor: Monitor,
    auth: Authenticator,
    *,
    console_hours: int,
    lineage: Any = None,
    session_s: int = 8 * 3600,
    query_limits: QueryLimits | None = None,
    secure_cookie: bool = False,
    sessions: ConsoleSessions | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/monitor", tags=["monitor"])
    limits = query_limits or QueryLimits()
    sessions = sessions if sessions is not None else ConsoleSessions(session_s)
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

    def viewer(key: str | None) -> Principal | None:
        """The principal of a key good for reading, or None; a registry database that cannot be read stays a 503."""
        try:
            principal = auth.authenticate(key)
        except DoorError as error:
            if error.status == 503:
                raise
            return None
        return principal if principal.may(Role.viewer) else None

    def secure(request: HttpRequest) -> bool:
        return secure_cookie or request.url.scheme == "https"

    def login_form(request: HttpRequest, error: str | None = None, status: int = 200) -> HTMLResponse:
        """The sign-in page with its CSRF token in the form and in a cookie: the browser's token when it
        has one (so a mistyped key can simply be retried), else a fresh one."""
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
        if not _LOGIN_TOKEN.fullmatch(token):
            token = secrets.token_urlsafe(32)
        response = HTMLResponse(
            render_login(error, csrf=token), status_code=status, headers={"Cache-Control": "no-store"}
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE,
            token,
            max_age=3600,
            path=CONSOLE,
            httponly=True,
            samesite="strict",
            secure=secure(request),
        )
        return response

    @router.get(
        "/console", response_class=HTMLResponse, responses={303: {"description": "Not signed in: to the sign-in page."}}
    )
    async def console(request: HttpRequest) -> Any:
        header = request.headers.get("authorization", "")
        csrf = None
        if header.startswith("Bearer "):
            principal = await asyncio.to_thread(viewer, header.removeprefix("Bearer ").strip())
        else:
            session_id = request.cookies.get(COOKIE)
            session = sessions.get(session_id)
            principal = await asyncio.to_thread(viewer, session.key) if session is not None else None
            if session is not None and principal is None:
                sessions.close(session_id)  # the key was revoked, expired or lost its role
            csrf = session.csrf if session is not None else None
        if principal is None:
            return RedirectResponse(f"{CONSOLE}/login", status_code=303)
        since = datetime.now(UTC) - timedelta(hours=console_hours)
        bucket_s = max(60, console_hours * 3600 // 48)
        rows = await asyncio.to_thread(monitor.store.summary, since, bucket_s)
        alerts = await asyncio.to_thread(monitor.store.alerts, None, 50)
        evaluations = await asyncio.to_thread(monitor.store.evaluations, since, DRIFT_KINDS)
        production = await lineage() if lineage is not None else None
        canaries = await asyncio.to_thread(monitor.canaries.watched)
        page = render_console(
            rows,
            alerts,
            evaluations,
            production,
            canaries=canaries,
            generated_at=datetime.now(UTC),
            signed_in=principal.name,
            csrf=csrf,
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @router.get("/console/login", response_class=HTMLResponse)
    async def login_page(request: HttpRequest) -> HTMLResponse:
        return login_form(request)

    async def read_form(request: HttpRequest) -> dict[str, str] | None:
        """The posted form's fields, or None when it is larger than a sign-in form can be."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > LOGIN_BODY_LIMIT:
                return None
        return {name: values[0] for name, values in parse_qs(body.decode("utf-8", "replace")).items()}

    @router.post(
        "/console/login",
        response_class=HTMLResponse,
        responses={303: {"description": "Signed in: to the console, with the session cookie."}},
    )
    async def login(request: HttpRequest) -> Any:
        form = await read_form(request)
        if form is None:
            return login_form(
                request, f"the form was larger than {LOGIN_BODY_LIMIT} bytes; paste only the API key", 413
            )
        if not same_token(request.cookies.get(LOGIN_CSRF_COOKIE), form.get("csrf_token")):
            return login_form(
                request,
                "the sign-in form expired or did not come from this console (CSRF check): sign in again from this page",
                403,
            )
        key = form.get("api_key", "").strip()
        if not key:
            return login_form(request, "enter an API key (fw_...) in the field api_key", 400)
        try:
            principal = await asyncio.to_thread(auth.authenticate, key)
        except DoorError as error:
            return login_form(request, error.detail.message, error.status)
        if not principal.may(Role.viewer):
            return login_form(
                request, f"{principal.name} has role {principal.role.value}; the console needs viewer or higher", 403
            )
        session_id, _ = sessions.open(principal.name, principal.key_id, key)
        response = RedirectResponse(CONSOLE, status_code=303)
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=session_s,
            path=CONSOLE,
            httponly=True,
            samesite="strict",
            secure=secure(request),
        )
        response.delete_cookie(
            LOGIN_CSRF_COOKIE, path=CONSOLE, httponly=True, samesite="strict", secure=secure(request)
        )
        return response

    @router.post(
        "/console/logout",
        responses={
            303: {"description": "Signed out: to the sign-in page."},
            403: {"description": "The form's CSRF token is not the session's."},
        },
    )
    async def logout(request: HttpRequest) -> Any:
        form = await read_form(request)
        session_id = request.cookies.get(COOKIE)
        session = sessions.get(session_id)
        if session is not None and not same_token(session.csrf, (form or {}).get("csrf_token")):
            return HTMLResponse(
                render_login("sign-out refused: the form did not come from this console (CSRF check)"), status_code=403
            )
        sessions.close(session_id)
        response = RedirectResponse(f"{CONSOLE}/login", status_code=303)
        response.delete_cookie(COOKIE, path=CONSOLE, httponly=True, samesite="strict", secure=secure(request))
        return response

    return router
