"""The runtime's console (services/runtime/console/) on its own, over HTTP through the app `build_process`
would make: sign-in sends the browser only to a page on this server, the session cookie is named after
the port the browser reached, a console address with no page answers with a page (other 404s stay the
doors' JSON), and every page carries headers that keep scripts and framing out."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from contracts.http import Role
from services.registry.store import RegistryStore
from services.runtime.auth import Authenticator, KeyStore
from services.runtime.console import Console, ConsoleUser, Section, cookie_name, local_path
from services.runtime.http import create_http_app

pytestmark = pytest.mark.integration
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[tuple[FastAPI, str]]:
    store = RegistryStore(f"sqlite:///{tmp_path / 'keys.db'}")
    store.migrate()
    auth = Authenticator(KeyStore(store.engine))
    key, _ = auth.keys.create(principal="ops-viewer", role=Role.viewer, created_by="test")
    console = Console(auth)
    console.add(Section("registry", "Models", "/registry/console/models"))
    app = create_http_app("console-test")

    @app.get("/registry/console/models")
    async def models(request: Request, user: ConsoleUser = Depends(console.viewer)) -> object:
        return console.page(request, console.templates("services.runtime.console"), "index.html", user, title="Models")

    console.install(app)
    yield app, key
    store.close()


async def sign_in(client: httpx.AsyncClient, key: str, next_path: str) -> httpx.Response:
    form = await client.get("/console/login")
    token = CSRF.search(form.text)[1]  # type: ignore[index]
    return await client.post("/console/login", data={"csrf_token": token, "api_key": key, "next": next_path})


@pytest.mark.parametrize(
    "hostile",
    ["//evil.example/console", "https://evil.example/console", "/\\evil.example/console", "/registry/v1/keys", ""],
)
async def test_after_sign_in_the_browser_goes_only_to_a_console_page_here(
    door: tuple[FastAPI, str], hostile: str
) -> None:
    app, key = door
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://flywheel:8081") as client:
        signed_in = await sign_in(client, key, hostile)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/console"
    assert local_path("/registry/console/models?from=1") == "/registry/console/models?from=1"


async def test_the_session_cookie_is_named_after_the_port_so_consoles_on_one_host_keep_their_own(
    door: tuple[FastAPI, str],
) -> None:
    app, key = door
    for port in (8081, 8083):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=f"http://flywheel:{port}"
        ) as client:
            signed_in = await sign_in(client, key, "/registry/console/models")
            assert signed_in.status_code == 303
            assert list(client.cookies) == [cookie_name(port)] == [f"flywheel_console_{port}"]
            page = await client.get("/registry/console/models")
            assert page.status_code == 200 and "signed in as ops-viewer" in page.text


async def test_a_console_address_without_a_page_answers_with_a_page_and_other_404s_stay_json(
    door: tuple[FastAPI, str],
) -> None:
    app, _ = door
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://flywheel") as client:
        missing = await client.get("/registry/console/no-such-page")
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
        assert "there is no console page at this address" in missing.text and "Traceback" not in missing.text
        door_404 = await client.get("/registry/v1/no-such-door")
        assert door_404.status_code == 404 and door_404.headers["content-type"].startswith("application/json")


async def test_every_page_keeps_scripts_framing_and_caches_out(door: tuple[FastAPI, str]) -> None:
    app, key = door
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://flywheel") as client:
        await sign_in(client, key, "/registry/console/models")
        for page in (await client.get("/registry/console/models"), await client.get("/console/login")):
            policy = page.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "script-src" not in policy
            assert "frame-ancestors 'none'" in policy and page.headers["x-frame-options"] == "DENY"
            assert page.headers["cache-control"] == "no-store" and page.headers["x-content-type-options"] == "nosniff"
