"""One process running services: the common doors, readiness against the real broker, a service's
handler consuming through the shared runtime, and a clean shutdown."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import APIRouter

from contracts.envelope import Envelope
from contracts.events import InferenceLogged
from contracts.examples import example_events
from services.runtime.http import DoorError
from services.runtime.service import Runtime, Service, build_process
from services.runtime.settings import FlywheelSettings
from tests.integration.test_event_bus import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def echo_service(received: list[Envelope]) -> object:
    def create_app(runtime: Runtime) -> Service:
        api = APIRouter(prefix="/echo/v1")

        @api.get("/items/{item_id}")
        async def item(item_id: int) -> dict:
            if item_id == 404:
                raise DoorError(404, f"item {item_id} does not exist", param="item_id", code="item_not_found")
            if item_id == 500:
                raise RuntimeError("secret internal detail")
            return {"id": item_id}

        async def handle(envelope: Envelope[InferenceLogged]) -> None:
            received.append(envelope)

        runtime.subscribe("echo", InferenceLogged, handle)
        return Service(name="echo", api=api)

    return create_app


async def test_a_process_serves_the_common_doors_and_runs_handlers(settings: FlywheelSettings) -> None:
    received: list[Envelope] = []
    app, runtime = build_process(settings, [echo_service(received)], title="flywheel-test")
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test"
        ) as client:
            assert (await client.get("/healthz")).json() == {
                "status": "ok",
                "service": "flywheel-test",
                "checks": {},
                "running": {},
            }
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"] == {"kafka": "ok"}
            assert "flywheel_consumer_messages_total" in (await client.get("/metrics")).text
            assert "/echo/v1/items/{item_id}" in (await client.get("/openapi.json")).json()["paths"]

            missing = await client.get("/echo/v1/items/404")
            assert missing.status_code == 404
            assert missing.json() == {
                "error": {
                    "message": "item 404 does not exist",
                    "type": "not_found_error",
                    "param": "item_id",
                    "code": "item_not_found",
                }
            }
            invalid = await client.get("/echo/v1/items/not-a-number")
            assert invalid.status_code == 422 and invalid.json()["error"]["param"] == "path.item_id"
            broken = await client.get("/echo/v1/items/500")
            assert broken.status_code == 500
            assert "secret" not in broken.text and "Traceback" not in broken.text

        sent = await runtime.bus("test").publish(example_events()[InferenceLogged])
        await eventually(lambda: len(received) == 1, what="the service's handler")
        assert received[0] == sent


async def test_readiness_reports_an_unreachable_broker(tmp_path) -> None:
    settings = FlywheelSettings(home=tmp_path, kafka_bootstrap="127.0.0.1:1")
    app, _ = build_process(settings, [], title="flywheel-test")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        ready = await asyncio.wait_for(client.get("/readyz"), 60)
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    assert "cannot reach Kafka at 127.0.0.1:1" in ready.json()["checks"]["kafka"]
