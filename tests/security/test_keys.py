"""API keys against the live registry on real Kafka: stored as HMAC-SHA256 under the server's pepper (not
sha256), expiry, last use, rotation and revocation through the registry's door; revocation honoured
within seconds by another process's service that checks keys through the registry (introspection),
never opening the registry's database; a bootstrap admin key under 32 characters stops the registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import Session

from services.registry.app import create_app
from services.runtime.auth import PEPPER_FILE, ApiKey, create_database_engine, registry_database_url, split_key
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from tests.faults.support import FLYWHEEL, REPO, ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ADMIN = "fw_boot_security-keys-admin-secret-0123456789"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def stored(settings: FlywheelSettings, key_id: str) -> ApiKey:
    engine = create_database_engine(registry_database_url(settings))
    try:
        with Session(engine) as session:
            row = session.get(ApiKey, key_id)
            assert row is not None, f"no row for key {key_id}"
            return row
    finally:
        engine.dispose()


def set_row(settings: FlywheelSettings, key_id: str, **values: object) -> None:
    engine = create_database_engine(registry_database_url(settings))
    try:
        with engine.begin() as conn:
            conn.execute(update(ApiKey).where(ApiKey.key_id == key_id).values(**values))  # type: ignore[arg-type]
    finally:
        engine.dispose()


@pytest.fixture
async def door(settings: FlywheelSettings, topics: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings.model_copy(update={"bootstrap_admin_key": ADMIN})
    app, _ = build_process(settings, [create_app], title="registry-keys")
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://registry", headers=auth(ADMIN)
        ) as client:
            yield client


async def test_a_key_is_stored_as_hmac_under_the_pepper_and_never_as_sha256(
    door: httpx.AsyncClient, settings: FlywheelSettings
) -> None:
    created = await door.post("/registry/v1/keys", json={"principal": "olga", "role": "operator"})
    assert created.status_code == 201, created.text
    key, key_id = created.json()["key"], created.json()["key_id"]
    me = await door.get("/registry/v1/keys/self", headers=auth(key))
    assert me.status_code == 200 and me.json() == {
        "key_id": key_id,
        "principal": "olga",
        "role": "operator",
        "expires_at": None,
    }

    row = stored(settings, key_id)
    secret = split_key(key)[1]
    pepper = (settings.home / "registry" / PEPPER_FILE).read_bytes()
    salted = bytes.fromhex(row.salt) + secret.encode()
    assert row.secret_hmac == hmac.new(pepper, salted, hashlib.sha256).hexdigest()
    assert row.secret_hmac != hashlib.sha256(salted).hexdigest() and row.secret_sha256 is None
    listed = (await door.get("/registry/v1/keys", params={"principal": "olga"})).json()
    assert [(entry["key_id"], entry["role"]) for entry in listed] == [(key_id, "operator")]
    assert not any("secret" in name or "salt" in name for entry in listed for name in entry)


async def test_an_expired_key_is_refused_with_401_saying_it_expired(
    door: httpx.AsyncClient, settings: FlywheelSettings
) -> None:
    created = (await door.post("/registry/v1/keys", json={"principal": "tess", "role": "viewer", "ttl_s": 3600})).json()
    expires = datetime.fromisoformat(created["expires_at"])
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    too_short = await door.post("/registry/v1/keys", json={"principal": "tess", "role": "viewer", "ttl_s": 5})
    assert too_short.status_code == 422 and too_short.json()["error"]["param"] == "ttl_s"
    # The clock moved on: an hour later, in the database's terms.
    set_row(settings, created["key_id"], expires_at=datetime.now(UTC) - timedelta(seconds=1))
    refused = await door.get("/registry/v1/models", headers=auth(created["key"]))
    assert refused.status_code == 401, refused.text
    assert (
        refused.json()["error"]["code"] == "expired_api_key"
        and f"API key {created['key_id']} expired at" in refused.json()["error"]["message"]
    )


async def test_last_used_at_moves_at_most_once_a_minute(door: httpx.AsyncClient, settings: FlywheelSettings) -> None:
    created = (await door.post("/registry/v1/keys", json={"principal": "vic", "role": "viewer"})).json()
    assert stored(settings, created["key_id"]).last_used_at is None
    assert (await door.get("/registry/v1/models", headers=auth(created["key"]))).status_code == 200
    first = stored(settings, created["key_id"]).last_used_at
    assert first is not None
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    set_row(settings, created["key_id"], last_used_at=long_ago)
    await asyncio.sleep(5.5)  # past the door's verification cache
    assert (await door.get("/registry/v1/models", headers=auth(created["key"]))).status_code == 200
    moved = stored(settings, created["key_id"]).last_used_at
    assert moved is not None and moved.replace(tzinfo=UTC) > long_ago + timedelta(minutes=4)
    await asyncio.sleep(5.5)
    assert (await door.get("/registry/v1/models", headers=auth(created["key"]))).status_code == 200
    assert stored(settings, created["key_id"]).last_used_at == moved  # used again within the minute: no write


async def test_rotation_hands_out_a_new_key_and_retires_the_old_one(door: httpx.AsyncClient) -> None:
    old = (await door.post("/registry/v1/keys", json={"principal": "shop", "role": "app"})).json()
    rotated = await door.post(f"/registry/v1/keys/{old['key_id']}/rotate", json={})
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert (new["principal"], new["role"]) == ("shop", "app") and new["key_id"] != old["key_id"]
    assert (await door.get("/registry/v1/keys/self", headers=auth(new["key"]))).json()["principal"] == "shop"
    gone = await door.get("/registry/v1/keys/self", headers=auth(old["key"]))
    assert gone.status_code == 401 and gone.json()["error"]["code"] == "invalid_api_key"

    # With a grace period the old key keeps working, then expires.
    graced = (await door.post(f"/registry/v1/keys/{new['key_id']}/rotate", json={"grace_s": 2})).json()
    assert (await door.get("/registry/v1/keys/self", headers=auth(new["key"]))).status_code == 200
    await asyncio.sleep(2.5)
    expired = await door.get("/registry/v1/keys/self", headers=auth(new["key"]))
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "expired_api_key"
    assert (await door.get("/registry/v1/keys/self", headers=auth(graced["key"]))).status_code == 200
    listed = {
        entry["key_id"]: entry for entry in (await door.get("/registry/v1/keys", params={"principal": "shop"})).json()
    }
    assert (
        listed[graced["key_id"]]["rotated_from"] == new["key_id"]
        and listed[new["key_id"]]["rotated_from"] == old["key_id"]
    )
    actions = [
        entry["action"]
        for entry in (await door.get("/registry/v1/audit", params={"object_type": "key"})).json()["items"]
    ]
    assert actions == ["key.create", "key.rotate", "key.rotate"]
    # Key management is admin's alone.
    refused = await door.post(f"/registry/v1/keys/{graced['key_id']}/rotate", json={}, headers=auth(graced["key"]))
    assert (
        refused.status_code == 403
        and (await door.get("/registry/v1/keys", headers=auth(graced["key"]))).status_code == 403
    )


async def test_revocation_is_honoured_within_seconds_by_another_process_through_introspection(
    tmp_path: Path, kafka_bootstrap: str, topics: str, topic_prefix: str
) -> None:
    registry = ServiceProcess(tmp_path, kafka_bootstrap, topic_prefix, ["registry"], FLYWHEEL_BOOTSTRAP_ADMIN_KEY=ADMIN)
    registry.env.pop("FLYWHEEL_DATABASE_URL", None)
    # Its own home and no database URL: the feedback process cannot open the registry's database.
    feedback = ServiceProcess(tmp_path, kafka_bootstrap, topic_prefix, ["feedback"], FLYWHEEL_REGISTRY_URL=registry.url)
    feedback.env.pop("FLYWHEEL_DATABASE_URL", None)
    registry.start()
    feedback.start()
    try:
        await registry.wait_ready()
        await feedback.wait_ready()
        async with httpx.AsyncClient(timeout=30) as http:
            created = (
                await http.post(
                    f"{registry.url}/registry/v1/keys",
                    json={"principal": "shop-reviewer", "role": "reviewer"},
                    headers=auth(ADMIN),
                )
            ).json()
            reviewer = auth(created["key"])
            door = f"{feedback.url}/feedback/v1/feedback"
            assert (await http.get(door, params={"inference_id": "nothing-yet"}, headers=reviewer)).status_code == 200
            wrong = await http.get(door, params={"inference_id": "x"}, headers=auth("fw_000000000000_wrong"))
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"

            assert (
                await http.delete(f"{registry.url}/registry/v1/keys/{created['key_id']}", headers=auth(ADMIN))
            ).status_code == 204
            revoked_at = time.monotonic()
            while (status := (await http.get(door, params={"inference_id": "x"}, headers=reviewer)).status_code) == 200:
                assert time.monotonic() - revoked_at < 10, "the revoked key still works on the other process after 10 s"
                await asyncio.sleep(0.25)
            assert status == 401
        assert not (feedback.home / "registry").exists(), "the feedback process opened a registry database"
    finally:
        feedback.stop()
        registry.stop()


def test_a_bootstrap_admin_key_under_32_characters_stops_the_registry_with_one_line(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    env = {
        **ServiceProcess(tmp_path, kafka_bootstrap, "short-key-").env,
        "FLYWHEEL_BOOTSTRAP_ADMIN_KEY": "too-short-admin-key",
    }
    result = subprocess.run(
        [*FLYWHEEL, "run", "registry"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "FLYWHEEL_BOOTSTRAP_ADMIN_KEY is 19 characters; set it to at least 32" in output, output
    assert "too-short-admin-key" not in output, "the refused key was printed"


async def test_a_service_beside_the_registry_in_one_home_checks_keys_through_its_recorded_door(
    tmp_path: Path, kafka_bootstrap: str, topics: str, topic_prefix: str
) -> None:
    """`flywheel run registry` and `flywheel run feedback` in two terminals, one home, nothing else set:
    the feedback door finds the registry's door recorded under the home, and says what to start once it is gone."""
    home = tmp_path / "home"
    registry = ServiceProcess(
        tmp_path, kafka_bootstrap, topic_prefix, ["registry"], home=home, FLYWHEEL_BOOTSTRAP_ADMIN_KEY=ADMIN
    )
    feedback = ServiceProcess(tmp_path, kafka_bootstrap, topic_prefix, ["feedback"], home=home)
    for process in (registry, feedback):
        process.env.pop("FLYWHEEL_DATABASE_URL", None)
        process.env.pop("FLYWHEEL_REGISTRY_URL", None)
    registry.start()
    feedback.start()
    try:
        await registry.wait_ready()
        await feedback.wait_ready()
        records = sorted(path.name for path in (home / "run").glob("*.json"))
        assert records == sorted(
            f"{process.process.pid}.json" for process in (registry, feedback) if process.process
        ), records
        door = f"{feedback.url}/feedback/v1/feedback"
        async with httpx.AsyncClient(timeout=30) as http:
            created = (
                await http.post(
                    f"{registry.url}/registry/v1/keys",
                    json={"principal": "shop-reviewer", "role": "reviewer"},
                    headers=auth(ADMIN),
                )
            ).json()
            assert (
                await http.get(door, params={"inference_id": "nothing-yet"}, headers=auth(created["key"]))
            ).status_code == 200
            wrong = await http.get(door, params={"inference_id": "x"}, headers=auth("fw_000000000000_wrong"))
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"

            registry.kill()  # no goodbye: its record stays behind and must be recognised as stale
            registry.process.wait(30)  # type: ignore[union-attr]
            await asyncio.sleep(6)  # past the verification cache
            gone = await http.get(door, params={"inference_id": "x"}, headers=auth(created["key"]))
        assert gone.status_code == 503, gone.text
        assert (
            "start the registry (`flywheel run registry` with the same FLYWHEEL_HOME)"
            in gone.json()["error"]["message"]
        )
        assert not (home / "run" / f"{registry.process.pid}.json").exists(), (
            "the dead registry's record was not removed"
        )  # type: ignore[union-attr]
    finally:
        feedback.stop()
        registry.stop()
