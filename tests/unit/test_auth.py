"""API keys: hashed at rest under the pepper, legacy rows, expiry, roles, and the `require` dependency's
401/403 answers in OpenAI's error shape."""

from __future__ import annotations

import hashlib
import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import Session

from infra.processes import free_port
from services.runtime.auth import (
    PEPPER_FILE,
    ApiKey,
    Authenticator,
    KeyStore,
    Principal,
    Role,
    create_database_engine,
    key_pepper,
    registry_database_url,
    split_key,
)
from services.runtime.errors import ConfigurationError
from services.runtime.http import DoorError, create_http_app
from services.runtime.running import client_key, record
from services.runtime.settings import FlywheelSettings

pytestmark = pytest.mark.unit


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    engine = create_database_engine(registry_database_url(FlywheelSettings(home=tmp_path)))
    ApiKey.metadata.create_all(engine, tables=[ApiKey.__table__])  # type: ignore[attr-defined]
    return KeyStore(engine)


def client_for(auth: Authenticator, refusals: list | None = None) -> TestClient:
    router = APIRouter()

    def record(request, principal, status, message) -> None:  # noqa: ANN001
        if refusals is not None:
            refusals.append((request.method, principal.name if principal else None, status))

    @router.get("/things")
    def read(principal: Principal = Depends(auth.require(Role.viewer, on_refused=record))) -> dict:
        return {"who": principal.name, "role": principal.role}

    @router.post("/things")
    def write(principal: Principal = Depends(auth.require(Role.operator, on_refused=record))) -> dict:
        return {"who": principal.name}

    return TestClient(create_http_app("test", routers=[router]))


def test_keys_are_hashed_at_rest(keys: KeyStore) -> None:
    key, row = keys.create(principal="alice", role=Role.operator, created_by="test")
    assert key.startswith(f"fw_{row.key_id}_")
    secret = split_key(key)[1]
    with keys._engine.connect() as conn:  # noqa: SLF001 - looking at what is really stored
        stored = " ".join(str(value) for value in conn.execute(text("SELECT * FROM api_key")).one())
    assert secret not in stored and key not in stored
    assert keys.verify(key) == Principal("alice", Role.operator, row.key_id)
    assert keys.verify(key[:-1] + ("a" if key[-1] != "a" else "b")) is None
    assert keys.verify("fw_nosuch_secret") is None


def test_roles_and_errors_at_the_door(keys: KeyStore) -> None:
    viewer, _ = keys.create(principal="vic", role=Role.viewer, created_by="test")
    operator, _ = keys.create(principal="olga", role=Role.operator, created_by="test")
    refusals: list = []
    client = client_for(Authenticator(keys), refusals)

    missing = client.post("/things")
    assert missing.status_code == 401
    assert missing.json()["error"] == {
        "message": "missing API key: send `Authorization: Bearer <key>`",
        "type": "authentication_error",
        "param": None,
        "code": "missing_api_key",
    }
    bad = client.get("/things", headers={"Authorization": "Bearer fw_abc_def"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"

    assert client.get("/things", headers={"Authorization": f"Bearer {viewer}"}).json() == {
        "who": "vic",
        "role": "viewer",
    }
    refused = client.post("/things", headers={"Authorization": f"Bearer {viewer}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert "vic has role viewer; this needs operator" in refused.json()["error"]["message"]
    assert client.post("/things", headers={"Authorization": f"Bearer {operator}"}).json() == {"who": "olga"}
    assert refusals == [("POST", None, 401), ("GET", None, 401), ("POST", "vic", 403)]


def test_authorise_gives_doors_outside_fastapi_the_same_answers(keys: KeyStore) -> None:
    viewer, _ = keys.create(principal="vic", role=Role.viewer, created_by="test")
    auth = Authenticator(keys)
    assert auth.authorise(viewer, Role.viewer).name == "vic"
    with pytest.raises(DoorError) as below:
        auth.authorise(viewer, Role.operator)
    assert (below.value.status, below.value.detail.code) == (403, "insufficient_role")
    assert below.value.detail.message == "vic has role viewer; this needs operator or higher"
    for key, code in ((None, "missing_api_key"), ("fw_abc_def", "invalid_api_key")):
        with pytest.raises(DoorError) as refused:
            auth.authorise(key, Role.viewer)
        assert (refused.value.status, refused.value.detail.code) == (401, code)


def test_role_grants() -> None:
    admin = Principal("a", Role.admin, "k")
    assert all(admin.may(role) for role in Role)
    assert Principal("o", Role.operator, "k").may(Role.viewer)
    assert not Principal("o", Role.operator, "k").may(Role.admin)
    app = Principal("p", Role.app, "k")
    assert app.may(Role.app) and not app.may(Role.viewer) and not app.may(Role.operator)
    for role in (Role.approver, Role.reviewer):
        assert Principal("r", role, "k").may(role) and Principal("r", role, "k").may(Role.viewer)
        assert not Principal("r", role, "k").may(Role.operator)
    assert not Principal("r", Role.reviewer, "k").may(Role.approver)


def test_bootstrap_admin_only_when_none_exists(keys: KeyStore) -> None:
    chosen = "any-long-operator-chosen-secret-value"
    assert keys.ensure_bootstrap_admin(chosen)
    assert keys.verify(chosen) is not None and keys.verify(chosen).role is Role.admin  # type: ignore[union-attr]
    assert not keys.ensure_bootstrap_admin("another-secret-value-here-long-enough")
    assert keys.verify("another-secret-value-here-long-enough") is None


def test_revocation_and_cache(keys: KeyStore) -> None:
    key, row = keys.create(principal="eve", role=Role.app, created_by="test")
    auth = Authenticator(keys, cache_ttl_s=60)
    assert auth.authenticate(key).name == "eve"
    assert keys.revoke(row.key_id)
    assert auth.authenticate(key).name == "eve"  # cached until the TTL or forget()
    auth.forget()
    with pytest.raises(Exception, match="invalid API key"):
        auth.authenticate(key)


def test_unmigrated_database_is_a_503_not_a_traceback(tmp_path: Path) -> None:
    auth = Authenticator(KeyStore(create_database_engine(f"sqlite:///{tmp_path}/empty.db")))
    response = client_for(auth).get("/things", headers={"Authorization": "Bearer fw_a_b"})
    assert response.status_code == 503
    assert "registry database" in response.json()["error"]["message"]


def test_a_short_bootstrap_key_is_refused_saying_what_to_set(keys: KeyStore) -> None:
    with pytest.raises(
        ConfigurationError, match=r"FLYWHEEL_BOOTSTRAP_ADMIN_KEY is 31 characters; set it to at least 32"
    ):
        keys.ensure_bootstrap_admin("x" * 31)
    assert not keys.has_active_admin()


def test_the_development_pepper_is_one_private_file_beside_the_database(tmp_path: Path) -> None:
    settings = FlywheelSettings(home=tmp_path)
    first = key_pepper(settings)
    path = tmp_path / "registry" / PEPPER_FILE
    assert path.read_bytes() == first and len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_pepper(settings) == first  # read back, not regenerated
    assert key_pepper(FlywheelSettings(home=tmp_path, key_pepper="p" * 40)) == b"p" * 40
    with pytest.raises(ConfigurationError, match="FLYWHEEL_KEY_PEPPER is required with a postgresql"):
        key_pepper(FlywheelSettings(home=tmp_path, database_url="postgresql://db/registry"))
    with pytest.raises(ConfigurationError, match="FLYWHEEL_KEY_PEPPER is 5 characters"):
        key_pepper(FlywheelSettings(home=tmp_path, key_pepper="short"))


def test_a_legacy_sha256_row_verifies_once_and_is_rewritten_under_the_pepper(keys: KeyStore) -> None:
    key_id, secret = "0123456789ab", secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    legacy = hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()
    with Session(keys._engine) as session:  # noqa: SLF001 - a row as written before migration 0004
        session.add(
            ApiKey(
                key_id=key_id,
                principal="old",
                role="viewer",
                salt=salt,
                secret_sha256=legacy,
                created_at=datetime.now(UTC),
                created_by="test",
            )
        )
        session.commit()
    key = f"fw_{key_id}_{secret}"
    assert keys.verify(key) == Principal("old", Role.viewer, key_id)
    with Session(keys._engine) as session:  # noqa: SLF001
        row = session.get(ApiKey, key_id)
    assert row.secret_sha256 is None and row.secret_hmac not in (None, legacy) and row.last_used_at is not None  # type: ignore[union-attr]
    assert keys.verify(key) is not None and keys.verify(key[:-1] + ("a" if key[-1] != "a" else "b")) is None


def test_an_expired_key_is_a_401_that_says_so(keys: KeyStore) -> None:
    key, row = keys.create(
        principal="tess", role=Role.viewer, created_by="test", expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    response = client_for(Authenticator(keys)).get("/things", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 401
    assert (
        response.json()["error"]["code"] == "expired_api_key"
        and f"API key {row.key_id} expired at" in response.json()["error"]["message"]
    )


def test_without_a_registry_to_ask_a_door_says_what_to_start_and_never_opens_the_database(tmp_path: Path) -> None:
    # The registry's database is on this host and holds the key, but no registry runs in this process
    # or under this home and FLYWHEEL_REGISTRY_URL is unset: the key is not checked against the file.
    settings = FlywheelSettings(home=tmp_path / "home")
    engine = create_database_engine(registry_database_url(settings))
    ApiKey.metadata.create_all(engine, tables=[ApiKey.__table__])  # type: ignore[attr-defined]
    key = KeyStore(engine).create(principal="tess", role=Role.viewer, created_by="test")[0]
    engine.dispose()
    client = client_for(Authenticator.for_settings(settings))
    response = client.get("/things", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert (
        "start the registry (`flywheel run registry` with the same FLYWHEEL_HOME)" in message
        and "FLYWHEEL_REGISTRY_URL" in message
    )


def test_a_registry_recorded_under_the_home_is_asked(tmp_path: Path) -> None:
    # A record of this very process claiming a registry door where nothing listens: the door is asked (and named).
    url = f"http://127.0.0.1:{free_port()}"
    record(tmp_path, ["registry"], url)
    response = client_for(Authenticator.for_settings(FlywheelSettings(home=tmp_path))).get(
        "/things", headers={"Authorization": "Bearer fw_a_b"}
    )
    assert response.status_code == 503
    assert f"the registry at {url} did not answer" in response.json()["error"]["message"]


def test_an_unreachable_registry_is_a_503_naming_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = client_for(Authenticator.for_settings(FlywheelSettings(home=tmp_path, registry_url=url)))
    response = client.get("/things", headers={"Authorization": "Bearer fw_a_b"})
    assert response.status_code == 503
    assert (
        f"the registry at {url} did not answer" in response.json()["error"]["message"]
        and "FLYWHEEL_REGISTRY_URL" in response.json()["error"]["message"]
    )


def test_a_fresh_development_home_gets_an_admin_key_in_an_owner_only_file_once(
    keys: KeyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = keys.ensure_development_admin(tmp_path)
    assert written == tmp_path / "admin.key" and stat.S_IMODE(written.stat().st_mode) == 0o600
    key = written.read_text().strip()
    principal = keys.verify(key)
    assert principal is not None and principal.role is Role.admin
    assert keys.ensure_development_admin(tmp_path) is None, "a second admin key was made though one exists"
    assert written.read_text().strip() == key

    monkeypatch.delenv("FLYWHEEL_API_KEY", raising=False)
    assert client_key(tmp_path) == key
    monkeypatch.setenv("FLYWHEEL_API_KEY", "fw_set_explicitly")
    assert client_key(tmp_path) == "fw_set_explicitly"
    monkeypatch.delenv("FLYWHEEL_API_KEY")
    written.chmod(0o644)  # readable by others: not trusted as this user's key
    assert client_key(tmp_path) is None
