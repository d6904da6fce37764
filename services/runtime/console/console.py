"""The console every service's pages share: one sign-in, one layout with navigation, CSRF on every form.

A browser cannot send `Authorization: Bearer`, so a person signs in once with an API key in a form at
`/console/login`. The key is checked like any bearer key and stays on the server; the browser gets a
random session id in an HttpOnly, SameSite=Strict cookie (Secure over https, or when
FLYWHEEL_CONSOLE_SECURE_COOKIE says TLS terminates in front). Every page re-checks the session's key
through the authenticator, so revoking a key ends its sessions within the key cache's few seconds.

Each service serves its own pages under its prefix (`/registry/console/...`, `/monitor/console`, ...)
from its own Jinja templates, which extend this package's `layout.html`; it declares the pages that
belong in the navigation as `Section`s. Jinja escapes everything a template shows (autoescape), so a
model name, a prompt or a dataset row is text, never markup.

A page that changes something is a form post: it needs a session (a bearer header cannot post a form),
the session's CSRF token in the form, and the role the matching JSON door needs. Anything else is refused
with a page that says why, and nothing changes.

Sessions live in this process's memory: a restart signs everyone out, and a process runs one console,
for the services it runs (`flywheel up`: all of them). Replicas behind one address need sticky sessions.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote

import jinja2
from pydantic import TypeAdapter, ValidationError
from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.http import Role
from services.runtime.auth import Authenticator, Principal
from services.runtime.console.sessions import ConsoleSessions, same_token
from services.runtime.http import DoorError

T = TypeVar("T")
PREFIX = "/console"
COOKIE = "flywheel_console"
# The sign-in form's CSRF token, paired with the same value in the form (there is no session yet).
LOGIN_CSRF_COOKIE = "flywheel_console_login"
_LOGIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
# A console form holds a key, a label or a note; anything longer is not one of them.
FORM_BODY_LIMIT = 16 * 1024
# Where a sign-in may send the browser afterwards: a path on this server, never another origin.
_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9/_.~%:@!$&'()*+,;=?-]{0,500}")
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    # No script runs on a console page; styles are inline and charts are inline SVG.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class Section:
    """A page in the console's navigation: its title, its absolute path, and the service it belongs to."""

    service: str
    title: str
    path: str


@dataclass(frozen=True)
class ConsoleUser:
    """Who is looking at a page: the principal, the session's CSRF token (None when the page was
    fetched with a bearer header: there is no session, so no form can be posted), and the key the page
    is viewed with, so a page can ask another service's door on the viewer's behalf and show only what
    the viewer may read."""

    principal: Principal
    csrf: str | None
    key: str | None = field(default=None, repr=False)


class SignInRequired(Exception):
    """No session (or one whose key stopped working): the browser goes to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class ConsoleRefused(Exception):
    """A console request refused with a page that says why (a role too low, a CSRF check, a form too large)."""

    def __init__(self, status: int, message: str, user: ConsoleUser | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.user = user


def checked(kind: TypeAdapter[T], value: str, refusal: str, user: ConsoleUser | None, *, status: int = 404) -> T:
    """`value` from a URL or a query, as the contract's type for it takes it; else a refusal page. An id the
    type refuses names nothing here, so by default it is as unknown (404) as a missing one."""
    try:
        return kind.validate_python(value)
    except ValidationError:
        raise ConsoleRefused(status, refusal, user) from None


def cookie_name(port: int | None) -> str:
    """The session cookie's name for a console reached on `port`. Browsers keep cookies per host, not per
    port: processes on one host (docker-compose's 8081, 8083, 8085) would otherwise overwrite each other's
    sign-in."""
    return COOKIE if port is None else f"{COOKIE}_{port}"


def local_path(candidate: str | None) -> str:
    """`candidate` when it is a path on this server under a console, else the console's index."""
    if candidate and _LOCAL_PATH.fullmatch(candidate) and "/console" in candidate.split("?", 1)[0]:
        return candidate
    return PREFIX


class Console:
    """The console of one process: its sessions, its navigation, its templates and its sign-in door."""

    def __init__(
        self,
        auth: Authenticator,
        *,
        session_s: int = 8 * 3600,
        secure_cookie: bool = False,
        sessions: ConsoleSessions | None = None,
    ) -> None:
        self.auth = auth
        self.session_s = session_s
        self.secure_cookie = secure_cookie
        self.sessions = sessions if sessions is not None else ConsoleSessions(session_s)
        self.sections: list[Section] = []
        self._environments: dict[str, jinja2.Environment] = {}

    def add(self, *sections: Section) -> None:
        """Put pages in the navigation (each service adds its own when it is built)."""
        self.sections.extend(section for section in sections if section not in self.sections)

    def templates(self, package: str) -> jinja2.Environment:
        """Jinja templates of `package` (its `templates/` folder), able to extend this package's `layout.html`."""
        environment = self._environments.get(package)
        if environment is None:
            environment = jinja2.Environment(
                loader=jinja2.ChoiceLoader(
                    [jinja2.PackageLoader(package, "templates"), jinja2.PackageLoader(__package__ or "", "templates")]
                ),
                autoescape=True,
                undefined=jinja2.StrictUndefined,
                trim_blocks=True,
                lstrip_blocks=True,
            )
            environment.filters["q"] = lambda value: quote(str(value), safe="")
            self._environments[package] = environment
        return environment

    # -- who is asking -------------------------------------------------------------------------------

    def _principal(self, key: str | None) -> Principal | None:
        """The principal of a key good for reading, or None; a key database that cannot be read stays a 503."""
        try:
            principal = self.auth.authenticate(key)
        except DoorError as error:
            if error.status == 503:
                raise
            return None
        return principal if principal.may(Role.viewer) else None

    async def viewer(self, request: HttpRequest) -> ConsoleUser:
        """The signed-in viewer (or above) of this request, by session cookie or bearer header; otherwise
        SignInRequired, which sends the browser to the sign-in page and back here afterwards."""
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer "):
            principal = await asyncio.to_thread(self._principal, header.removeprefix("Bearer ").strip())
            if principal is not None:
                return ConsoleUser(principal, None, header.removeprefix("Bearer ").strip())
        else:
            session_id = request.cookies.get(cookie_name(request.url.port))
            session = self.sessions.get(session_id)
            if session is not None:
                principal = await asyncio.to_thread(self._principal, session.key)
                if principal is not None:
                    return ConsoleUser(principal, session.csrf, session.key)
                self.sessions.close(session_id)  # the key was revoked, expired or lost its role
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(path)

    async def form(
        self, request: HttpRequest, user: ConsoleUser, role: Role, *, limit: int = FORM_BODY_LIMIT
    ) -> dict[str, str]:
        """The fields of a form posted by `user`, once its size, its CSRF token and the user's role are checked.
        A page whose form carries more than a key, a label or a note (a reviewer's correction) names its own
        `limit`, in bytes as posted."""
        fields = await read_form(request, limit)
        if fields is None:
            raise ConsoleRefused(413, f"the form was larger than {limit} bytes; nothing was changed", user)
        if user.csrf is None or not same_token(user.csrf, fields.get("csrf_token")):
            raise ConsoleRefused(
                403,
                "the form did not come from this console (CSRF check); nothing was changed: reload the page and try again",
                user,
            )
        if not user.principal.may(role):
            raise ConsoleRefused(
                403,
                f"{user.principal.name} has role {user.principal.role.value}; this needs {role.value}; nothing was changed",
                user,
            )
        return fields

    # -- pages ---------------------------------------------------------------------------------------

    def page(
        self,
        request: HttpRequest,
        environment: jinja2.Environment,
        template: str,
        user: ConsoleUser | None,
        *,
        title: str,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        """A console page: `template` (which extends layout.html) with the navigation and the sign-in around it."""
        html = environment.get_template(template).render(
            title=title, user=user, nav=self._navigation(request.url.path), path=request.url.path, **context
        )
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def _navigation(self, current: str) -> list[dict[str, Any]]:
        # The section a page is under is the longest path that holds it: /monitor/console/traces/... is
        # Traces, not also Monitor.
        holding = [s.path for s in self.sections if current == s.path or current.startswith(s.path.rstrip("/") + "/")]
        here = max(holding, key=len, default=None)
        by_service: dict[str, list[dict[str, Any]]] = {}
        for section in self.sections:
            by_service.setdefault(section.service, []).append(
                {"title": section.title, "path": section.path, "current": section.path == here}
            )
        return [{"service": service, "pages": pages} for service, pages in by_service.items()]

    def _refused(self, request: HttpRequest, refused: ConsoleRefused) -> HTMLResponse:
        return self.page(
            request,
            self.templates(__package__ or ""),
            "refused.html",
            refused.user,
            title="Refused",
            status=refused.status,
            message=refused.message,
        )

    def install(self, app: FastAPI) -> None:
        """The sign-in door and the handlers that turn SignInRequired and ConsoleRefused into pages."""
        app.include_router(self.router())

        async def sign_in_required(request: HttpRequest, error: Exception) -> Response:
            assert isinstance(error, SignInRequired)
            return RedirectResponse(f"{PREFIX}/login?next={quote(error.next_path, safe='')}", status_code=303)

        async def refused(request: HttpRequest, error: Exception) -> Response:
            assert isinstance(error, ConsoleRefused)
            return self._refused(request, error)

        # A console address that matches no page answers with a page too; every other 404 stays the door's JSON.
        answer_otherwise = app.exception_handlers.get(StarletteHTTPException, http_exception_handler)

        async def not_a_page(request: HttpRequest, error: Exception) -> Response:
            assert isinstance(error, StarletteHTTPException)
            if error.status_code == 404 and request.method == "GET" and "/console" in request.url.path:
                return self._refused(request, ConsoleRefused(404, "there is no console page at this address"))
            answered = answer_otherwise(request, error)
            return await answered if inspect.isawaitable(answered) else answered

        app.add_exception_handler(SignInRequired, sign_in_required)
        app.add_exception_handler(ConsoleRefused, refused)
        app.add_exception_handler(StarletteHTTPException, not_a_page)

    # -- sign-in door --------------------------------------------------------------------------------

    def _secure(self, request: HttpRequest) -> bool:
        return self.secure_cookie or request.url.scheme == "https"

    def _login_form(
        self, request: HttpRequest, error: str | None = None, status: int = 200, next_path: str | None = None
    ) -> HTMLResponse:
        """The sign-in page with its CSRF token in the form and in a cookie: the browser's token when it
        has one (so a mistyped key can simply be retried), else a fresh one."""
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
        if not _LOGIN_TOKEN.fullmatch(token):
            token = secrets.token_urlsafe(32)
        response = self.page(
            request,
            self.templates(__package__ or ""),
            "login.html",
            None,
            title="Sign in",
            status=status,
            error=error,
            login_csrf=token,
            next_path=local_path(next_path),
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE,
            token,
            max_age=3600,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=self._secure(request),
        )
        return response

    def router(self) -> APIRouter:
        router = APIRouter(prefix=PREFIX, tags=["console"], include_in_schema=False)

        @router.get("", response_class=HTMLResponse)
        async def index(request: HttpRequest) -> HTMLResponse:
            user = await self.viewer(request)
            return self.page(request, self.templates(__package__ or ""), "index.html", user, title="Console")

        @router.get("/login", response_class=HTMLResponse)
        async def login_page(request: HttpRequest, next: str | None = None) -> HTMLResponse:  # noqa: A002 - the query parameter's name
            return self._login_form(request, next_path=next)

        @router.post("/login", response_class=HTMLResponse)
        async def login(request: HttpRequest) -> Response:
            fields = await read_form(request)
            if fields is None:
                return self._login_form(
                    request, f"the form was larger than {FORM_BODY_LIMIT} bytes; paste only the API key", 413
                )
            next_path = fields.get("next")
            if not same_token(request.cookies.get(LOGIN_CSRF_COOKIE), fields.get("csrf_token")):
                return self._login_form(
                    request,
                    "the sign-in form expired or did not come from this console (CSRF check): sign in again from this page",
                    403,
                    next_path,
                )
            key = fields.get("api_key", "").strip()
            if not key:
                return self._login_form(request, "enter an API key (fw_...) in the field api_key", 400, next_path)
            try:
                principal = await asyncio.to_thread(self.auth.authenticate, key)
            except DoorError as error:
                return self._login_form(request, error.detail.message, error.status, next_path)
            if not principal.may(Role.viewer):
                return self._login_form(
                    request,
                    f"{principal.name} has role {principal.role.value}; the console needs viewer or higher",
                    403,
                    next_path,
                )
            session_id, _ = self.sessions.open(principal.name, principal.key_id, key)
            response = RedirectResponse(local_path(next_path), status_code=303)
            response.set_cookie(
                cookie_name(request.url.port),
                session_id,
                max_age=self.session_s,
                path="/",
                httponly=True,
                samesite="strict",
                secure=self._secure(request),
            )
            response.delete_cookie(
                LOGIN_CSRF_COOKIE, path=PREFIX, httponly=True, samesite="strict", secure=self._secure(request)
            )
            return response

        @router.post("/logout")
        async def logout(request: HttpRequest) -> Response:
            fields = await read_form(request)
            session_id = request.cookies.get(cookie_name(request.url.port))
            session = self.sessions.get(session_id)
            if session is not None and not same_token(session.csrf, (fields or {}).get("csrf_token")):
                return self._login_form(
                    request, "sign-out refused: the form did not come from this console (CSRF check)", 403
                )
            self.sessions.close(session_id)
            response = RedirectResponse(f"{PREFIX}/login", status_code=303)
            response.delete_cookie(
                cookie_name(request.url.port), path="/", httponly=True, samesite="strict", secure=self._secure(request)
            )
            return response

        return router


async def read_form(request: HttpRequest, limit: int = FORM_BODY_LIMIT) -> dict[str, str] | None:
    """A posted form's fields (the first value of each), or None when it is larger than `limit` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            return None
    return {name: values[0] for name, values in parse_qs(body.decode("utf-8", "replace")).items()}
