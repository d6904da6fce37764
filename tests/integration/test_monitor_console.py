"""The monitor's console page, a section of the runtime's console, in a real headless Chromium driven over the
DevTools protocol against a real HTTP server: a browser cannot send a bearer key, so it signs in with the
console's form and comes back to the monitor's page; the key stays on the server and the browser holds only a
session id, in an HttpOnly cookie scripts cannot read; the drift charts come from evaluations stored in
ClickHouse by an earlier monitor (as after a restart); signing out (the layout's form, with the session's CSRF
token) ends the session on the server. Without a browser: every form is refused without its CSRF token,
revoking the key ends the session, the cookie is Secure over https or when TLS terminates in front, the
monitor's old sign-in addresses still lead to the sign-in, and only an operator's form changes an alert."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI

from contracts.envelope import wrap
from contracts.events import (
    AlertRaised,
    FeedbackReceived,
    InferenceLogged,
    Severity,
    Stage,
    StageChanged,
    Thumbs,
)
from contracts.http import Role
from services.runtime.privacy import Redactor
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.monitor.canary import CanaryPolicy
from services.monitor.api import create_router as monitor_router
from services.monitor.rules import parse_rules
from services.monitor.retraining import RetrainingPolicy
from services.monitor.service import Monitor
from services.monitor.store import MonitorStore
from services.registry.store import RegistryStore
from services.runtime.auth import Authenticator, KeyStore, split_key
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.console import Console, Section
from services.runtime.console.console import COOKIE, cookie_name
from services.runtime.http import DoorError, error_response
from services.runtime.registry_client import RegistryClient
from tests.conftest import REPO, require
from tests.monitor_support import RegistryDoorFixture, clickhouse, monitor_store, seed_two_versions  # noqa: F401 - fixtures
from tests.support import served
from tests.browser import chromium

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
SIGN_IN = "/console/login?next=%2Fmonitor%2Fconsole"

MODEL = "smollm2"
RULES = [
    {
        "name": "thumbs-down",
        "version": 1,
        "metric": "thumbs_down_rate",
        "threshold": 0.3,
        "window_s": 600,
        "min_samples": 10,
    },
    {
        "name": "prompt-tokens-drift",
        "version": 1,
        "metric": "prompt_tokens_psi",
        "threshold": 0.25,
        "window_s": 600,
        "baseline_window_s": 1200,
        "min_samples": 10,
    },
    {
        "name": "unsafe",
        "version": 1,
        "metric": "unsafe_rate",
        "threshold": 0.2,
        "window_s": 600,
        "min_samples": 10,
        "quality": False,
    },
]


def seed_history(clickhouse: ClickHouseStore) -> None:
    """Fifty minutes of traffic: prompts grow longer after minute 30 (drift) and answers turn bad after minute 40."""
    sink = Sink(FeedbackStore(lambda: clickhouse), Redactor())
    base = datetime.now(UTC) - timedelta(minutes=50)
    for minute in range(0, 50, 2):
        at = base + timedelta(minutes=minute)
        inferences, feedback = [], []
        for i in range(12):
            inference_id = f"inf-{uuid.uuid4().hex[:10]}"
            degraded = minute >= 40
            inferences.append(
                InferenceLogged(
                    inference_id=inference_id,
                    model_name=MODEL,
                    adapter_version=1,
                    input_text=f"question {i}",
                    output_text="Go away, idiot." if degraded and i % 2 else "Hold the button for 10 s.",
                    prompt_tokens=(20 if minute < 30 else 200) + i,
                    completion_tokens=8,
                    latency_total_ms=300.0 + 10 * i,
                )
            )
            feedback.append(
                FeedbackReceived(
                    inference_id=inference_id,
                    thumbs=Thumbs.down if degraded or i % 10 == 0 else Thumbs.up,
                    rating=2 if degraded else 5,
                )
            )
        sink.store_inferences([wrap(e, producer="test").model_copy(update={"occurred_at": at}) for e in inferences])
        sink.store_feedback([wrap(e, producer="test").model_copy(update={"occurred_at": at}) for e in feedback])


def monitor_app(tmp_path: Path, monitor: Monitor, **console_options: Any) -> tuple[FastAPI, str]:
    app, key, _ = monitor_app_with_auth(tmp_path, monitor, **console_options)
    return app, key


def monitor_app_with_auth(
    tmp_path: Path, monitor: Monitor, **console_options: Any
) -> tuple[FastAPI, str, Authenticator]:
    """The monitor's door and the runtime's console on one app, as build_process serves them; a viewer's key."""
    store = RegistryStore(f"sqlite:///{tmp_path / 'keys.db'}")
    store.migrate()
    auth = Authenticator(KeyStore(store.engine))
    key, _ = auth.keys.create(principal="ops-viewer", role=Role.viewer, created_by="test")
    app = FastAPI()

    @app.exception_handler(DoorError)
    async def _door_error(_request, error: DoorError):  # noqa: ANN202
        return error_response(error.status, error.detail)

    console = Console(auth, **console_options)
    console.add(Section("monitor", "Monitor", "/monitor/console"))
    app.include_router(monitor_router(monitor, auth, console=console, console_hours=1))
    console.install(app)
    return app, key, auth


async def login_token(client: httpx.AsyncClient) -> str:
    """The sign-in page's CSRF token (its cookie lands in the client's jar)."""
    page = await client.get(SIGN_IN)
    assert page.status_code == 200
    return CSRF_FIELD.search(page.text).group(1)


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    """Sign in through the console's form and follow it back to the monitor's page."""
    token = await login_token(client)
    signed_in = await client.post(
        "/console/login", data={"csrf_token": token, "api_key": key, "next": "/monitor/console"}
    )
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/monitor/console", signed_in.text
    return await client.get("/monitor/console")


async def test_console_sign_in_charts_from_stored_history_and_sign_out_in_headless_chromium(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    require(shutil.which("chromium") is not None, "Debian's chromium is not installed (apt-get install chromium)")
    seed_history(clickhouse)

    async def publish(envelope) -> None:  # noqa: ANN001 - alerts are stored in ClickHouse; Kafka is not part of this test
        return None

    rules = parse_rules(RULES, monitor_store.check_rule)
    earlier = Monitor(
        monitor_store,
        rules,
        publish,
        RegistryClient("http://unused", None),
        policy=RetrainingPolicy(min_corrections=1000),
        state_dir=tmp_path / "a",
    )
    now = datetime.now(UTC)
    for minutes_ago in (24, 18, 12, 6, 0):
        await earlier.tick(now - timedelta(minutes=minutes_ago))
    stored = monitor_store.evaluations(now - timedelta(hours=1), ("psi", "unsafe"))
    assert {row["rule_name"] for row in stored} == {"prompt-tokens-drift", "unsafe"} and len(stored) >= 8
    # A new monitor, as after a restart: what it shows comes from ClickHouse, not the earlier one's memory.
    # Beside it, the registry's real door with v2 declared a canary: v2 has no traffic, so the policy waits.
    door = RegistryDoorFixture(tmp_path)
    seed_two_versions(door, tmp_path)
    door.registry.adapters.transition(
        "alice", model_name=MODEL, version=2, to_stage=Stage.production, canary_percent=10, reason="canary"
    )
    restarted = Monitor(
        monitor_store,
        rules,
        publish,
        door.door(),
        policy=RetrainingPolicy(min_corrections=1000),
        state_dir=tmp_path / "b",
        canary_policy=CanaryPolicy(version=7, min_inferences=50, min_feedback=50, hallucination_sample=0),
    )
    restarted.canaries.watch(
        StageChanged(
            model_name=MODEL,
            adapter_version=2,
            from_stage=Stage.staging,
            to_stage=Stage.production,
            actor="alice",
            canary_percent=10,
        ),
        now,
    )
    [review] = (await restarted.tick(now)).canaries
    assert review.decision.action == "wait" and not review.applied
    door.store.close()
    app, key = monitor_app(tmp_path, restarted)

    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "monitor-console.png"
    shot.unlink(missing_ok=True)
    async with served(app, lifespan="off") as base, chromium(tmp_path / "chromium-profile") as browser:
        await browser.call("Page.enable")
        await browser.call("Page.navigate", url=f"{base}/monitor/console")
        await browser.settled_at("/console/login")

        await browser.submit_key("fw_000000000000_not-a-real-key")
        await browser.settled_at("/console/login")
        assert "invalid API key" in await browser.evaluate("document.querySelector('[role=alert]').innerText")

        await browser.submit_key(key)
        await browser.settled_at("/monitor/console")
        text = await browser.evaluate("document.body.innerText")
        assert "signed in as ops-viewer" in text and "thumbs-down" in text
        assert await browser.evaluate("document.querySelector('nav a.current').getAttribute('href')") == (
            "/monitor/console"
        ), "the monitor's page is in the console's navigation"
        assert await browser.evaluate("document.querySelectorAll('form.alert-state').length") == 0, (
            "a viewer is shown no form that changes an alert"
        )
        canaries = await browser.evaluate(
            "[...document.querySelectorAll('h2')].find(h => h.innerText.startsWith('Canaries')).nextElementSibling.innerText"
        )
        assert (
            f"{MODEL}:v2" in canaries
            and "10%" in canaries
            and "wait" in canaries
            and "canary policy v7" in canaries
            and "not enough data" in canaries
        ), canaries
        assert await browser.evaluate("document.cookie") == "", "the session cookie is HttpOnly: scripts cannot read it"
        [cookie] = [
            c
            for c in (await browser.call("Network.getCookies", urls=[f"{base}/monitor/console"]))["cookies"]
            if c["name"] == cookie_name(urlsplit(base).port)
        ]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
        assert key not in cookie["value"] and len(cookie["value"]) >= 40, (
            "the cookie holds a random session id, never the key"
        )
        assert key not in await browser.evaluate("document.documentElement.outerHTML")
        drift = await browser.evaluate(
            "[...document.querySelectorAll('figure')].find(f => f.querySelector('figcaption').innerText.startsWith('Drift')).innerHTML"
        )
        assert "<svg" in drift and "prompt_tokens_psi" in drift and "unsafe_rate" in drift, (
            "drift charted from stored evaluations"
        )
        assert await browser.evaluate("document.querySelectorAll('svg').length") >= 4
        picture = await browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        shot.write_bytes(base64.b64decode(picture["data"]))

        await browser.evaluate("document.querySelector('form[action=\"/console/logout\"]').submit(); true")
        await browser.settled_at("/console/login")
        await browser.call("Page.navigate", url=f"{base}/monitor/console")
        await browser.settled_at("/console/login")
        # The session ended on the server: the old id, replayed, opens nothing.
        async with httpx.AsyncClient(base_url=base, cookies={cookie["name"]: cookie["value"]}) as replay:
            replayed = await replay.get("/monitor/console")
        assert replayed.status_code == 303 and replayed.headers["location"] == SIGN_IN
    assert shot.stat().st_size > 20_000
    print(f"console screenshot: {shot}")


def quiet_monitor(monitor_store: MonitorStore, tmp_path: Path) -> Monitor:
    """A monitor without rules whose alerts are stored in ClickHouse and published nowhere."""
    return Monitor(
        monitor_store,
        [],
        lambda envelope: asyncio.sleep(0),
        RegistryClient("http://unused", None),
        policy=RetrainingPolicy(),
        state_dir=tmp_path,
    )


def open_alert(monitor_store: MonitorStore, rule_name: str) -> AlertRaised:
    """An open alert in the alert table, as the monitor's tick stores one."""
    now = datetime.now(UTC)
    alert = AlertRaised(
        alert_id=str(uuid.uuid4()),
        rule_name=rule_name,
        rule_version=1,
        severity=Severity.warning,
        model_name=MODEL,
        adapter_version=1,
        metric="thumbs_down_rate",
        value=0.5,
        threshold=0.3,
        window_start=now - timedelta(minutes=10),
        window_end=now,
        message="thumbs_down_rate = 0.5 > 0.3",
    )
    monitor_store.write_alert(wrap(alert, producer="test"))
    return alert


async def test_console_sign_in_refuses_bad_input_without_setting_a_cookie(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    app, key = monitor_app(tmp_path, quiet_monitor(monitor_store, tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://monitor") as client:
        anonymous = await client.get("/monitor/console")
        assert anonymous.status_code == 303 and anonymous.headers["location"] == SIGN_IN
        token = await login_token(client)
        empty = await client.post("/console/login", data={"api_key": "  ", "csrf_token": token})
        wrong = await client.post("/console/login", data={"api_key": "fw_abc_wrong", "csrf_token": token})
        huge = await client.post("/console/login", data={"api_key": "x" * 20_000, "csrf_token": token})
        forged = await client.post("/console/login", data={"api_key": key, "csrf_token": "not-the-forms-token"})
        tokenless = await client.post("/console/login", data={"api_key": key})
        assert (empty.status_code, wrong.status_code, huge.status_code, forged.status_code, tokenless.status_code) == (
            400,
            401,
            413,
            403,
            403,
        )
        assert (
            "enter an API key" in empty.text
            and "invalid API key" in wrong.text
            and "paste only the API key" in huge.text
        )
        assert "CSRF check" in forged.text and "CSRF check" in tokenless.text
        refused = (empty, wrong, huge, forged, tokenless)
        assert all(
            f"{COOKIE}=" not in r.headers.get("set-cookie", "") and "Traceback" not in r.text for r in refused
        ), "a refused sign-in sets no session"
        assert COOKIE not in client.cookies
        bearer = await client.get("/monitor/console", headers={"Authorization": f"Bearer {key}"})
        assert bearer.status_code == 200 and "signed in as ops-viewer" in bearer.text, (
            "API clients keep using the bearer header"
        )
        assert "default-src 'none'" in bearer.headers["content-security-policy"]
        assert bearer.headers["cache-control"] == "no-store"


async def test_console_session_holds_no_key_checks_csrf_and_ends_when_the_key_is_revoked(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    monitor = quiet_monitor(monitor_store, tmp_path)
    app, key, auth = monitor_app_with_auth(tmp_path, monitor)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://monitor") as client:
        signed_in = await client.post(
            "/console/login",
            data={"api_key": key, "csrf_token": await login_token(client), "next": "/monitor/console"},
        )
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/monitor/console"
        session_id = client.cookies[COOKIE]
        session_cookie = next(
            value for value in signed_in.headers.get_list("set-cookie") if value.startswith(f"{COOKIE}=")
        )
        assert key not in session_cookie and key.split("_")[-1] not in session_id and len(session_id) >= 40
        assert "path=/;" in session_cookie.lower(), "one sign-in for every service's pages"
        assert "secure" not in session_cookie.lower(), "plain http without a TLS proxy configured: not Secure"
        page = await client.get("/monitor/console")
        assert page.status_code == 200 and "signed in as ops-viewer" in page.text and key not in page.text
        assert CSRF_FIELD.search(page.text), "the signed-in page carries its sign-out form's CSRF token"

        # A sign-out posted from elsewhere (no token, or another token) is refused and the session stays.
        for forged in ({}, {"csrf_token": "guessed"}, {"csrf_token": await login_token(client)}):
            refused = await client.post("/console/logout", data=forged)
            assert refused.status_code == 403 and "CSRF check" in refused.text, refused.text
        assert (await client.get("/monitor/console")).status_code == 200

        # Revoking the key ends the session at the next page (after the authenticator's short cache).
        key_id, _ = split_key(key)
        assert auth.keys.revoke(key_id)
        auth.forget()
        ended = await client.get("/monitor/console")
        assert ended.status_code == 303 and ended.headers["location"] == SIGN_IN
    # ... and on the server: the same id, replayed by another client, is gone.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://monitor", cookies={COOKIE: session_id}
    ) as replay:
        assert (await replay.get("/monitor/console")).status_code == 303

    # Sign out with the session's own token ends it on the server.
    second, _, second_auth = monitor_app_with_auth(tmp_path / "second", monitor)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://monitor") as client:
        second_key, _ = second_auth.keys.create(principal="ops-viewer-2", role=Role.viewer, created_by="test")
        page = await sign_in(client, second_key)
        session_id = client.cookies[COOKIE]
        out = await client.post("/console/logout", data={"csrf_token": CSRF_FIELD.search(page.text).group(1)})
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=second), base_url="http://monitor", cookies={COOKIE: session_id}
    ) as replay:
        assert (await replay.get("/monitor/console")).status_code == 303, (
            "the id is dead on the server, not only in the browser"
        )


@pytest.mark.parametrize(
    ("base_url", "secure_cookie"),
    [("https://monitor", False), ("http://monitor", True)],
    ids=["over-https", "tls-in-front"],
)
async def test_console_cookies_are_secure_over_tls_or_when_tls_terminates_in_front(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path, base_url: str, secure_cookie: bool
) -> None:
    app, key = monitor_app(tmp_path, quiet_monitor(monitor_store, tmp_path), secure_cookie=secure_cookie)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client:
        form = await client.get(SIGN_IN)
        assert "secure" in form.headers["set-cookie"].lower()
        token = CSRF_FIELD.search(form.text).group(1)
    # A client that sends the (Secure) token cookie back whatever the scheme, as the browser behind a TLS proxy does.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=base_url, cookies={"flywheel_console_login": token}
    ) as client:
        signed_in = await client.post("/console/login", data={"api_key": key, "csrf_token": token})
        assert signed_in.status_code == 303, signed_in.text
        session_cookie = next(
            value for value in signed_in.headers.get_list("set-cookie") if value.startswith(f"{COOKIE}=")
        )
        assert (
            "secure" in session_cookie.lower()
            and "httponly" in session_cookie.lower()
            and "samesite=strict" in session_cookie.lower()
        )


async def test_the_monitors_old_sign_in_and_sign_out_addresses_lead_to_the_consoles(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    app, key = monitor_app(tmp_path, quiet_monitor(monitor_store, tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://monitor") as client:
        bookmark = await client.get("/monitor/console/login")
        assert bookmark.status_code == 307 and bookmark.headers["location"] == SIGN_IN
        page = await client.get("/monitor/console/login", follow_redirects=True)
        assert page.status_code == 200 and page.url.path == "/console/login" and 'name="api_key"' in page.text
        assert 'name="next" value="/monitor/console"' in page.text, "after signing in, back to the monitor's page"

        # A script that posts the sign-in form to the old address: the 307 keeps the method and the form.
        signed_in = await client.post(
            "/monitor/console/login",
            data={"csrf_token": CSRF_FIELD.search(page.text).group(1), "api_key": key, "next": "/monitor/console"},
            follow_redirects=True,
        )
        assert signed_in.status_code == 200 and signed_in.url.path == "/monitor/console", signed_in.text
        assert "signed in as ops-viewer" in signed_in.text
        session_id = client.cookies[COOKIE]

        csrf = CSRF_FIELD.search(signed_in.text).group(1)
        moved = await client.post("/monitor/console/logout", data={"csrf_token": csrf})
        assert moved.status_code == 307 and moved.headers["location"] == "/console/logout"
        out = await client.post("/monitor/console/logout", data={"csrf_token": csrf}, follow_redirects=True)
        assert out.status_code == 200 and out.url.path == "/console/login"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://monitor", cookies={COOKIE: session_id}
    ) as replay:
        assert (await replay.get("/monitor/console")).status_code == 303, "signed out through the old address"


async def test_only_an_operators_form_with_the_sessions_token_changes_an_alert(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    app, viewer_key, auth = monitor_app_with_auth(tmp_path, quiet_monitor(monitor_store, tmp_path))
    operator_key, _ = auth.keys.create(principal="ops-operator", role=Role.operator, created_by="test")
    acknowledged = open_alert(monitor_store, "thumbs-down")
    resolved = open_alert(monitor_store, "error-rate")
    acknowledge_url = f"/monitor/console/alerts/{acknowledged.alert_id}"

    def stored(alert: AlertRaised) -> tuple[str, str]:
        row = monitor_store.alert(alert.alert_id)
        return row["state"], row["message"]

    untouched = ("open", "thumbs_down_rate = 0.5 > 0.3")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as viewer:
        page = await sign_in(viewer, viewer_key)
        assert "thumbs-down" in page.text and "alert-state" not in page.text, "a viewer is shown no alert form"
        # The viewer's own session token: the CSRF check passes, the role does not.
        refused = await viewer.post(
            acknowledge_url, data={"csrf_token": CSRF_FIELD.search(page.text).group(1), "state": "acknowledged"}
        )
        assert refused.status_code == 403 and "this needs operator" in refused.text, refused.text
    assert stored(acknowledged) == untouched

    async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as operator:
        page = await sign_in(operator, operator_key)
        assert page.text.count('class="inline alert-state"') == 2 and "2 open alerts" in page.text
        token = CSRF_FIELD.search(page.text).group(1)
        for forged in ({}, {"csrf_token": "guessed"}, {"csrf_token": await login_token(operator)}):
            refused = await operator.post(acknowledge_url, data={"state": "acknowledged", **forged})
            assert refused.status_code == 403 and "CSRF check" in refused.text, refused.text
        oversized = await operator.post(
            acknowledge_url, data={"csrf_token": token, "state": "acknowledged", "note": "x" * 20_000}
        )
        too_long = await operator.post(
            acknowledge_url, data={"csrf_token": token, "state": "acknowledged", "note": "x" * 2001}
        )
        no_change = await operator.post(acknowledge_url, data={"csrf_token": token, "state": "open"})
        assert (oversized.status_code, too_long.status_code, no_change.status_code) == (413, 400, 400)
        assert "longer than 2000 characters" in too_long.text
        assert stored(acknowledged) == untouched, "nothing refused changed the alert"

        unknown = await operator.post(
            "/monitor/console/alerts/no-such-alert", data={"csrf_token": token, "state": "acknowledged"}
        )
        assert unknown.status_code == 404 and "no alert &#39;no-such-alert&#39;" in unknown.text, unknown.text
        hostile = await operator.post(
            "/monitor/console/alerts/%3Cscript%3Ealert(1)",
            data={"csrf_token": token, "state": "acknowledged"},
        )
        assert hostile.status_code == 404 and "no such alert" in hostile.text and "<script>" not in hostile.text

        done = await operator.post(
            acknowledge_url, data={"csrf_token": token, "state": "acknowledged", "note": "looking into it <b>now</b>"}
        )
        assert done.status_code == 303 and done.headers["location"] == "/monitor/console"
        assert stored(acknowledged) == ("acknowledged", "acknowledged by ops-operator: looking into it <b>now</b>")
        done = await operator.post(
            f"/monitor/console/alerts/{resolved.alert_id}", data={"csrf_token": token, "state": "resolved"}
        )
        assert done.status_code == 303
        assert stored(resolved) == ("resolved", "resolved by ops-operator")

        page = await operator.get("/monitor/console")
        assert "1 open alerts" in page.text and page.text.count('class="inline alert-state"') == 1, (
            "the acknowledged alert can still be resolved; the resolved one has no form"
        )
        assert "looking into it &lt;b&gt;now&lt;/b&gt;" in page.text and "<b>now</b>" not in page.text
        # The JSON door reads the same stored state.
        listed = await operator.get("/monitor/v1/alerts", headers={"Authorization": f"Bearer {operator_key}"})
        assert {(a["alert_id"], a["state"]) for a in listed.json()} == {
            (acknowledged.alert_id, "acknowledged"),
            (resolved.alert_id, "resolved"),
        }

    # A bearer header opens the page but cannot post a form: there is no session, so no CSRF token.
    async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as script:
        bearer = {"Authorization": f"Bearer {operator_key}"}
        page = await script.get("/monitor/console", headers=bearer)
        assert page.status_code == 200 and "alert-state" not in page.text
        refused = await script.post(
            f"/monitor/console/alerts/{acknowledged.alert_id}",
            data={"csrf_token": token, "state": "resolved"},
            headers=bearer,
        )
        assert refused.status_code == 403 and "CSRF check" in refused.text
    assert stored(acknowledged)[0] == "acknowledged"
