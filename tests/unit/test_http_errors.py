"""The edge answers domain errors in one place (create_http_app): each kind gets its status and the
OpenAI-style error body with the error's own message, param and code. One route class (RefusalRoute)
caps bodies and tells its door of the refusals made before the endpoint ran, and of no other error."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from services.registry.errors import Conflict as RegistryConflict
from services.registry.errors import Forbidden as RegistryForbidden
from services.registry.errors import Invalid as RegistryInvalid
from services.registry.errors import NotFound as RegistryNotFound
from services.registry.errors import TooLarge as RegistryTooLarge
from services.runtime import errors
from services.runtime.http import RateLimited, create_http_app, refusal_route, status_of
from services.serving.gateway import InferenceUnavailable, NotServed, RequestRefused

pytestmark = pytest.mark.unit

KINDS = [
    (errors.DomainError("plain"), 400, "invalid_request_error"),
    (errors.BadRequest("bad"), 400, "invalid_request_error"),
    (errors.Forbidden("no"), 403, "permission_error"),
    (errors.NotFound("gone"), 404, "not_found_error"),
    (errors.Conflict("clash"), 409, "conflict_error"),
    (errors.TooLarge("big"), 413, "invalid_request_error"),
    (errors.Invalid("wrong"), 422, "invalid_request_error"),
    (errors.Unavailable("down"), 503, "service_unavailable"),
]

# What the registry and serving raise, and the statuses their doors answered before the errors lost theirs.
SERVICE_ERRORS = [
    (RegistryNotFound("x"), 404),
    (RegistryConflict("x"), 409),
    (RegistryInvalid("x"), 422),
    (RegistryForbidden("x"), 403),
    (RegistryTooLarge("x"), 413),
    (NotServed("x"), 404),
    (RequestRefused("x"), 400),
    (InferenceUnavailable("x"), 503),
]


class Body(BaseModel):
    count: int


def _door(
    raised: Exception | None = None,
    *,
    refused: list[tuple[str, int, str, bytes]] | None = None,
    max_body_bytes: int | None = None,
) -> httpx.AsyncClient:
    def record(request: Request, path: str, status: int, message: str, body: bytes) -> None:
        assert refused is not None
        refused.append((path, status, message, body))

    def limited() -> None:
        raise RateLimited("slow down", retry_after="3")

    router = APIRouter(
        prefix="/t",
        route_class=refusal_route(max_body_bytes=max_body_bytes, on_refused=record if refused is not None else None),
    )

    @router.post("/things")
    async def things(body: Body) -> dict:
        if raised is not None:
            raise raised
        return {"count": body.count}

    @router.post("/limited", dependencies=[Depends(limited)])
    async def limited_things(body: Body) -> dict:
        return {"count": body.count}

    app = create_http_app("errors-test", routers=[router])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://door")


def test_each_service_error_is_its_kind_and_carries_no_status() -> None:
    for error, status in SERVICE_ERRORS:
        assert status_of(error) == status, type(error).__name__
        assert not hasattr(error, "status"), type(error).__name__


@pytest.mark.parametrize(("error", "status", "error_type"), KINDS, ids=[type(kind[0]).__name__ for kind in KINDS])
async def test_a_domain_error_is_answered_with_its_kinds_status_and_its_own_words(
    error: errors.DomainError, status: int, error_type: str
) -> None:
    error.param, error.code = "count", "its_code"
    async with _door(error) as door:
        answer = await door.post("/t/things", json={"count": 1})
    assert answer.status_code == status
    assert answer.json() == {"error": {"message": str(error), "type": error_type, "param": "count", "code": "its_code"}}


async def test_the_route_tells_its_door_of_a_body_that_does_not_validate() -> None:
    refusals: list[tuple[str, int, str, bytes]] = []
    async with _door(refused=refusals) as door:
        answer = await door.post("/t/things", json={"count": "many"})
    assert answer.status_code == 422
    [(path, status, message, body)] = refusals
    assert (path, status, body) == ("/t/things", 422, b'{"count":"many"}') and message.startswith("count: ")


async def test_the_route_tells_its_door_of_a_rate_limit_answered_429_with_retry_after() -> None:
    refusals: list[tuple[str, int, str, bytes]] = []
    async with _door(refused=refusals) as door:
        answer = await door.post("/t/limited", json={"count": 1})
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "3"
    assert answer.json()["error"] == {
        "message": "slow down",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert refusals == [("/t/limited", 429, "slow down", b'{"count":1}')]


async def test_an_error_of_the_endpoint_itself_is_not_a_refusal_of_the_route() -> None:
    refusals: list[tuple[str, int, str, bytes]] = []
    async with _door(errors.NotFound("no such thing"), refused=refusals) as door:
        answer = await door.post("/t/things", json={"count": 1})
    assert answer.status_code == 404 and refusals == []


async def test_the_route_refuses_a_body_over_its_cap_by_length_and_while_it_streams() -> None:
    async with _door(max_body_bytes=16) as door:
        declared = await door.post(
            "/t/things", content=b'{"count": 1' + b" " * 32 + b"}", headers={"Content-Type": "application/json"}
        )

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"count": 1'
            yield b" " * 32 + b"}"

        streamed = await door.post("/t/things", content=chunks(), headers={"Content-Type": "application/json"})
        small = await door.post("/t/things", json={"count": 2})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200 and small.json() == {"count": 2}
