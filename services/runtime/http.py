"""What every process's HTTP app has: /healthz, /readyz, /metrics, errors in one shape, no tracebacks.

Services include their own APIRouter under `/<service>/v1/...`; `flywheel up` mounts all of them on
one app built here, `flywheel run X` mounts one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.http import ErrorDetail, ErrorResponse, HealthStatus

log = logging.getLogger("flywheel.http")

ReadinessCheck = Callable[[], Awaitable[None]]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class DoorError(Exception):
    """An error a door answers with: status, message, and the OpenAI-style type/param/code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=error_type or _ERROR_TYPES.get(status, "server_error"), param=param, code=code)


def error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status, headers=headers)


def create_http_app(title: str, *, readiness: dict[str, ReadinessCheck] | None = None, routers: Sequence = (), lifespan=None) -> FastAPI:
    """A FastAPI app with the common endpoints and error handling; `routers` are the services' doors."""
    app = FastAPI(title=title, lifespan=lifespan)
    checks = dict(readiness or {})

    @app.get("/healthz", response_model=HealthStatus, tags=["ops"])
    async def healthz() -> HealthStatus:
        return HealthStatus(status="ok", service=title)

    @app.get("/readyz", response_model=HealthStatus, tags=["ops"], responses={503: {"model": HealthStatus}})
    async def readyz() -> Response:
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                await check()
                results[name] = "ok"
            except Exception as error:  # noqa: BLE001 - a failing check is reported, not raised
                results[name] = f"{type(error).__name__}: {error}"
        ready = all(value == "ok" for value in results.values())
        body = HealthStatus(status="ok" if ready else "unavailable", service=title, checks=results)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(DoorError)
    async def door_error(_: Request, error: DoorError) -> JSONResponse:
        return error_response(error.status, error.detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, ErrorDetail(message=str(error.detail), type=_ERROR_TYPES.get(error.status_code, "server_error")), headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = f"{'.'.join(location) or 'body'}: {first.get('msg', 'invalid request')}"
        if len(error.errors()) > 1:
            message += f" (+{len(error.errors()) - 1} more)"
        return error_response(422, ErrorDetail(message=message, type="invalid_request_error", param=".".join(location) or None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, ErrorDetail(message="internal error; the server log has the details", type="server_error"))

    for router in routers:
        app.include_router(router)
    return app
