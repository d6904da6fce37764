"""/readyz answers within its bound whatever hangs behind a check, and names what is not ready."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from services.runtime.http import READINESS_CHECK_TIMEOUT_S, create_http_app

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_a_hanging_check_makes_the_probe_unready_within_its_bound_and_the_others_are_still_reported() -> None:
    async def fine() -> None:
        return None

    async def hangs() -> None:
        await asyncio.sleep(3600)

    async def fails() -> None:
        raise RuntimeError("Triton is not running")

    app = create_http_app("readiness-test", readiness={"kafka": fine, "serving.triton": hangs, "other": fails})
    with TestClient(app) as client:
        response = client.get(
            "/readyz"
        )  # without the bound this would wait an hour (the test's timeout fails it first)
    assert response.status_code == 503
    assert response.json()["checks"] == {
        "kafka": "ok",
        "serving.triton": f"TimeoutError: no answer within {READINESS_CHECK_TIMEOUT_S} s",
        "other": "RuntimeError: Triton is not running",
    }


def test_every_check_ok_is_ready() -> None:
    async def fine() -> None:
        return None

    with TestClient(create_http_app("readiness-test", readiness={"a": fine, "b": fine})) as client:
        response = client.get("/readyz")
    assert response.status_code == 200 and response.json()["status"] == "ok"
