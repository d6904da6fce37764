"""API keys with roles, and the FastAPI dependency every service's door authenticates with.

Keys look like `fw_<key id>_<secret>` and travel as `Authorization: Bearer <key>`. At rest only the
key id, a random per-key salt and HMAC-SHA256(pepper, salt + secret) are kept. The pepper is a
server-side secret (FLYWHEEL_KEY_PEPPER) outside the database, so a leaked table alone cannot even
be used to test guesses of an operator-chosen bootstrap key; the generated secrets are 256-bit
random, so a slow password hash would buy nothing. Rows written before migration 0004 hold
sha256(salt + secret): they still verify, and are rewritten under the pepper the first time they do.

Without FLYWHEEL_KEY_PEPPER, a pepper is generated once into a 0600 file beside the SQLite registry
database (development); with a server database (PostgreSQL, production) the setting is required,
because every registry replica must hash alike.

Where keys are checked (docs/decisions/0001-key-checks.md): the registry owns the table. A process
that runs the registry checks keys against its own store; any other process asks the registry's door
(FLYWHEEL_REGISTRY_URL, else the registry recorded as running under FLYWHEEL_HOME) who a presented key belongs to
(`GET /registry/v1/keys/self`, authenticated by that very key), so it holds no credential of its
own for this and never opens the registry's database. Answers are cached for a few seconds, so a
revoked key stops working everywhere within `cache_ttl_s`.

Roles: admin (everything, key management), operator (mutations: register, promote, train), approver
(production promotions), reviewer (review corrections), app (call the gateway, send feedback and
events; reads nothing) and viewer (read). Every role but app also grants viewer.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from sqlalchemy import Connection, DateTime, Engine, create_engine, event, func, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col

from contracts.http import Role
from services.runtime.doors import bearer_header
from services.runtime.errors import ConfigurationError
from services.runtime.http import DoorError
from services.runtime.running import ADMIN_KEY_FILE, door_of
from services.runtime.settings import FlywheelSettings

log = logging.getLogger("flywheel.auth")

KEY_PREFIX = "fw"
PEPPER_FILE = "key-pepper"
MIN_BOOTSTRAP_KEY_CHARS = 32
# last_used_at is a hint for finding idle keys, not an access log: one write a minute per key at most.
LAST_USED_RESOLUTION = timedelta(seconds=60)


# What each role may act as: a door that requires the role on the right admits the role on the left.
# An app key reads nothing: one app's key must not read every app's logs, prompts or models.
GRANTS: dict[Role, frozenset[Role]] = {
    Role.admin: frozenset(Role),
    Role.operator: frozenset({Role.operator, Role.viewer}),
    Role.approver: frozenset({Role.approver, Role.viewer}),
    Role.reviewer: frozenset({Role.reviewer, Role.viewer}),
    Role.app: frozenset({Role.app}),
    Role.viewer: frozenset({Role.viewer}),
}


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    key_id: str = Field(primary_key=True, max_length=64)
    principal: str = Field(index=True, max_length=256)
    role: str = Field(max_length=16)
    salt: str = Field(max_length=64)
    # Rows from before migration 0004: sha256(salt + secret); cleared when the row is rewritten under the pepper.
    secret_sha256: str | None = Field(default=None, max_length=64)
    secret_hmac: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(sa_type=DateTime(timezone=True))
    created_by: str = Field(max_length=256)
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    last_used_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    rotated_from: str | None = Field(default=None, max_length=64)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the name recorded in audit logs, the role, and which key they used."""

    name: str
    role: Role
    key_id: str
    expires_at: datetime | None = field(default=None, compare=False)

    def may(self, role: Role) -> bool:
        return role in GRANTS[self.role]


class KeyRefused(Exception):
    """A presented key that does not authenticate; the message says why (unknown, revoked, expired)."""

    def __init__(self, message: str, code: str = "invalid_api_key") -> None:
        super().__init__(message)
        self.code = code


class KeysUnavailable(Exception):
    """Keys cannot be checked right now (database or registry unreachable); the message says what to do."""


def _utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def reveal(value: SecretStr | str | None) -> str | None:
    """The plain value of a secret setting (settings copied in tests may hold a plain str)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def generate_key() -> tuple[str, str, str]:
    """A new key: (the full key to hand out once, its key id, its secret)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}_{key_id}_{secret}", key_id, secret


def split_key(key: str) -> tuple[str, str]:
    """(key id, secret) of a presented key. A key not in the fw_ form (a bootstrap key an operator
    chose) is identified by a digest of itself, so any string can serve as the bootstrap key."""
    parts = key.split("_", 2)
    if len(parts) == 3 and parts[0] == KEY_PREFIX and parts[1] and parts[2]:
        return parts[1], parts[2]
    return "x" + hashlib.sha256(key.encode()).hexdigest()[:23], key


def hash_secret(secret: str, salt: str, pepper: bytes) -> str:
    """HMAC-SHA256 under the server's pepper of salt + secret: what is stored."""
    return hmac.new(pepper, bytes.fromhex(salt) + secret.encode(), hashlib.sha256).hexdigest()


def legacy_hash(secret: str, salt: str) -> str:
    """sha256(salt + secret): how rows were hashed before migration 0004."""
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def development_pepper(database_url: str) -> bytes:
    """The pepper kept in a 0600 file beside a SQLite registry database, generated on first use.

    A server database is shared by replicas on other hosts, which could not share such a file: there
    FLYWHEEL_KEY_PEPPER is required.
    """
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
        raise ConfigurationError(
            f"FLYWHEEL_KEY_PEPPER is required with a {url.drivername} registry database: set it to a random secret of 32+ characters "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`), the same on every registry replica"
        )
    path = Path(url.database).resolve().parent / PEPPER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: of two processes starting together, one writes the pepper and the other reads it.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            pepper = path.read_bytes()
            if pepper:
                return pepper
            time.sleep(0.02)  # the creator is between open and write
        raise ConfigurationError(
            f"{path} is empty: delete it (keys hashed under it stop working) or set FLYWHEEL_KEY_PEPPER"
        ) from None
    pepper = secrets.token_urlsafe(48).encode()
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pepper)
    log.info("generated an API key pepper in %s (development); set FLYWHEEL_KEY_PEPPER in production", path)
    return pepper


def key_pepper(settings: FlywheelSettings) -> bytes:
    """The pepper keys are hashed under: FLYWHEEL_KEY_PEPPER, else the development file beside the SQLite database."""
    configured = reveal(settings.key_pepper)
    if configured:
        if len(configured) < 32:
            raise ConfigurationError(
                f"FLYWHEEL_KEY_PEPPER is {len(configured)} characters; set it to a random secret of at least 32"
            )
        return configured.encode()
    return development_pepper(registry_database_url(settings))


def check_bootstrap_key(key: SecretStr | str | None) -> str | None:
    """The bootstrap admin key, refused (one line, saying what to set) when shorter than 32 characters."""
    value = reveal(key)
    if value is not None and len(value) < MIN_BOOTSTRAP_KEY_CHARS:
        raise ConfigurationError(
            f"FLYWHEEL_BOOTSTRAP_ADMIN_KEY is {len(value)} characters; set it to at least {MIN_BOOTSTRAP_KEY_CHARS} random characters "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`) or unset it"
        )
    return value or None


def add_key(
    session: Session,
    key: str,
    *,
    principal: str,
    role: Role,
    created_by: str,
    pepper: bytes,
    expires_at: datetime | None = None,
    rotated_from: str | None = None,
) -> ApiKey:
    """Stage a key row in the caller's transaction (so the registry audits it atomically)."""
    key_id, secret = split_key(key)
    salt = secrets.token_hex(16)
    row = ApiKey(
        key_id=key_id,
        principal=principal,
        role=Role(role).value,
        salt=salt,
        secret_hmac=hash_secret(secret, salt, pepper),
        created_at=datetime.now(UTC),
        created_by=created_by,
        expires_at=expires_at,
        rotated_from=rotated_from,
    )
    session.add(row)
    return row


def registry_database_url(settings: FlywheelSettings) -> str:
    """The registry database: FLYWHEEL_DATABASE_URL, or SQLite at <FLYWHEEL_HOME>/registry/registry.db."""
    if settings.database_url:
        return settings.database_url
    return f"sqlite:///{(Path(settings.home) / 'registry' / 'registry.db').resolve()}"


def create_database_engine(url: str) -> Engine:
    """An engine for the registry database; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(connection: sqlite3.Connection, _record: object) -> None:  # SQLAlchemy's DBAPI hook
            # SQLAlchemy issues BEGIN itself (below), so pysqlite must not open transactions on its own.
            connection.isolation_level = None
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=30000")

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Connection) -> None:
            # A deferred transaction that reads and then writes fails at once with "database is
            # locked" under concurrency; taking the write lock at BEGIN makes writers queue instead.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class KeyStore:
    """Key lookups and management over the registry database."""

    def __init__(self, engine: Engine, pepper: bytes | None = None) -> None:
        self._engine = engine
        self._pepper = pepper

    @property
    def pepper(self) -> bytes:
        if self._pepper is None:
            self._pepper = development_pepper(self._engine.url.render_as_string(hide_password=False))
        return self._pepper

    def check(self, key: str) -> Principal:
        """The principal a key belongs to; KeyRefused saying why it does not authenticate."""
        key_id, secret = split_key(key)
        with Session(self._engine) as session:
            row = session.get(ApiKey, key_id)
        if row is None:
            raise KeyRefused("invalid API key: unknown, wrong or revoked")
        legacy = row.secret_hmac is None
        expected = legacy_hash(secret, row.salt) if legacy else hash_secret(secret, row.salt, self.pepper)
        stored = (row.secret_sha256 if legacy else row.secret_hmac) or ""  # a row without its digest matches nothing
        if not hmac.compare_digest(stored, expected):
            raise KeyRefused("invalid API key: unknown, wrong or revoked")
        now = datetime.now(UTC)
        if row.revoked_at is not None:
            raise KeyRefused("invalid API key: unknown, wrong or revoked")
        if row.expires_at is not None and _utc(row.expires_at) <= now:
            raise KeyRefused(
                f"API key {row.key_id} expired at {_utc(row.expires_at).isoformat(timespec='seconds')}; ask an admin for a new one",
                code="expired_api_key",
            )
        if legacy or row.last_used_at is None or _utc(row.last_used_at) <= now - LAST_USED_RESOLUTION:
            self._touch(row, secret, now, legacy=legacy)
        expires = _utc(row.expires_at) if row.expires_at else None
        return Principal(name=row.principal, role=Role(row.role), key_id=row.key_id, expires_at=expires)

    def _touch(self, row: ApiKey, secret: str, now: datetime, *, legacy: bool) -> None:
        """Record use (at most once a minute), and rewrite a legacy row under the pepper."""
        values: dict[str, Any] = {"last_used_at": now}
        if legacy:
            values |= {"secret_hmac": hash_secret(secret, row.salt, self.pepper), "secret_sha256": None}
        stale = or_(col(ApiKey.last_used_at).is_(None), col(ApiKey.last_used_at) <= now - LAST_USED_RESOLUTION)
        try:
            with self._engine.begin() as conn:
                # The condition makes concurrent checks of one key write once, not once each.
                conn.execute(
                    update(ApiKey)
                    .where(col(ApiKey.key_id) == row.key_id, or_(stale, col(ApiKey.secret_hmac).is_(None)))
                    .values(**values)
                )
        except SQLAlchemyError as error:
            log.warning("could not record the use of key %s: %s", row.key_id, error)

    def verify(self, key: str) -> Principal | None:
        """The principal a key belongs to, or None for an unknown, wrong, revoked or expired key."""
        try:
            return self.check(key)
        except KeyRefused:
            return None

    def create(
        self, *, principal: str, role: Role, created_by: str, expires_at: datetime | None = None
    ) -> tuple[str, ApiKey]:
        """A new key for `principal`; the full key is returned once and never stored."""
        key, _, _ = generate_key()
        with Session(self._engine) as session:
            row = add_key(
                session,
                key,
                principal=principal,
                role=role,
                created_by=created_by,
                pepper=self.pepper,
                expires_at=expires_at,
            )
            session.commit()
            session.refresh(row)
        return key, row

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by id; False when no such active key exists."""
        with Session(self._engine) as session:
            row = session.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = datetime.now(UTC)
            session.commit()
        return True

    def has_active_admin(self) -> bool:
        now = datetime.now(UTC)
        with Session(self._engine) as session:
            count = session.scalar(
                select(func.count())
                .select_from(ApiKey)
                .where(
                    col(ApiKey.role) == Role.admin.value,
                    col(ApiKey.revoked_at).is_(None),
                    or_(col(ApiKey.expires_at).is_(None), col(ApiKey.expires_at) > now),
                )
            )
        return bool(count)

    def ensure_bootstrap_admin(self, key: SecretStr | str | None) -> bool:
        """Create the admin key FLYWHEEL_BOOTSTRAP_ADMIN_KEY names when no active admin exists; True if created."""
        value = check_bootstrap_key(key)
        if not value or self.has_active_admin():
            return False
        try:
            with Session(self._engine) as session:
                add_key(
                    session,
                    value,
                    principal="bootstrap-admin",
                    role=Role.admin,
                    created_by="bootstrap",
                    pepper=self.pepper,
                )
                session.commit()
        except IntegrityError:
            return False  # another process bootstrapped the same key first
        return True

    def ensure_development_admin(self, home: Path) -> Path | None:
        """On a development home (SQLite registry under FLYWHEEL_HOME) with no admin and no bootstrap key
        set, create an admin key and write it to `home/admin.key` (0600); the file's path if created.

        So `flywheel up` on a fresh home needs nothing set by hand, and the commands beside it read the
        key from that file (services/runtime/running.py `client_key`). Never with a server database."""
        if self.has_active_admin():
            return None
        path = home / ADMIN_KEY_FILE
        key, _, _ = generate_key()
        home.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(key + "\n")
        try:
            with Session(self._engine) as session:
                add_key(
                    session, key, principal="local-admin", role=Role.admin, created_by="bootstrap", pepper=self.pepper
                )
                session.commit()
        except IntegrityError:
            partial.unlink(missing_ok=True)
            return None
        partial.replace(path)  # only a key the registry holds is ever in admin.key
        return path


class KeyChecker(Protocol):
    def check(self, key: str) -> Principal: ...


class RegistryKeys:
    """Key checks through the registry's door: the presented key asks who it is (`GET /registry/v1/keys/self`).

    The key authenticates its own question, so the asking service needs no credential of its own,
    and the answer tells it nothing its caller did not already hold.
    """

    def __init__(self, base_url: str, *, transport: Any = None, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._transport = transport
        self._timeout_s = timeout_s

    def check(self, key: str) -> Principal:
        import httpx

        try:
            with httpx.Client(base_url=self.base_url, transport=self._transport, timeout=self._timeout_s) as client:
                response = client.get("/registry/v1/keys/self", headers=bearer_header(key))
        except httpx.HTTPError as error:
            raise KeysUnavailable(
                f"API keys cannot be checked: the registry at {self.base_url} did not answer ({type(error).__name__}); is it running? (FLYWHEEL_REGISTRY_URL)"
            ) from None
        if response.status_code == 401:
            detail = _error_detail(response)
            raise KeyRefused(detail.get("message") or "invalid API key", code=detail.get("code") or "invalid_api_key")
        if response.status_code != 200:
            raise KeysUnavailable(
                f"API keys cannot be checked: the registry at {self.base_url} answered {response.status_code} (FLYWHEEL_REGISTRY_URL)"
            )
        body = response.json()
        expires = body.get("expires_at")
        return Principal(
            name=body["principal"],
            role=Role(body["role"]),
            key_id=body["key_id"],
            expires_at=datetime.fromisoformat(expires) if expires else None,
        )


def _error_detail(response: Any) -> dict[str, Any]:
    try:
        detail = response.json().get("error")
    except ValueError:
        return {}
    return detail if isinstance(detail, dict) else {}


class LocalKeys:
    """Key checks without FLYWHEEL_REGISTRY_URL: the KeyStore of the registry built in this process, else
    the door of a registry recorded under FLYWHEEL_HOME (services/runtime/running.py: `flywheel run
    registry` and `flywheel run serving` side by side in one home find each other). Never the registry's
    database itself: only the registry opens it."""

    _registered: ClassVar[dict[str, KeyStore]] = {}
    _lock = threading.Lock()

    def __init__(self, database_url: str, home: Path) -> None:
        self.database_url = database_url
        self.home = home
        self._door: RegistryKeys | None = None

    @classmethod
    def register(cls, database_url: str, keys: KeyStore) -> None:
        """The registry, built in this process, offers its store to the other doors of the process."""
        with cls._lock:
            cls._registered[database_url] = keys

    def _checker(self) -> KeyChecker:
        registered = self._registered.get(self.database_url)
        if registered is not None:
            return registered
        url = door_of(self.home, "registry")  # looked up each time: the registry may start, stop or move
        if url is None:
            raise KeysUnavailable(
                f"API keys cannot be checked: no registry runs in this process or under {self.home} and FLYWHEEL_REGISTRY_URL is not set; "
                "start the registry (`flywheel run registry` with the same FLYWHEEL_HOME) or set FLYWHEEL_REGISTRY_URL to its door (e.g. http://registry:8080)"
            )
        if self._door is None or self._door.base_url != url:
            self._door = RegistryKeys(url)
        return self._door

    def check(self, key: str) -> Principal:
        return self._checker().check(key)


Refusal = Callable[[Request, Principal | None, int, str], None]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer fw_<id>_<secret>`.")


class Authenticator:
    """Turns `Authorization: Bearer <key>` into a Principal, with a short cache in front of the key checker."""

    _shared: ClassVar[dict[tuple[str, ...], Authenticator]] = {}
    _shared_lock = threading.Lock()

    def __init__(self, keys: KeyChecker, *, cache_ttl_s: float = 5.0) -> None:
        self.keys = keys
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def for_settings(cls, settings: FlywheelSettings) -> Authenticator:
        """The authenticator of a service's door: introspection through FLYWHEEL_REGISTRY_URL when set, else
        the registry of this process or the one recorded under FLYWHEEL_HOME. One per source in a process,
        so services run together share it."""
        if settings.registry_url:
            source: tuple[str, ...] = ("registry", settings.registry_url.rstrip("/"))
        else:
            source = ("local", registry_database_url(settings), str(settings.home.resolve()))
        with cls._shared_lock:
            if source not in cls._shared:
                cls._shared[source] = cls(
                    RegistryKeys(source[1]) if source[0] == "registry" else LocalKeys(source[1], Path(source[2]))
                )
            return cls._shared[source]

    def forget(self) -> None:
        """Drop cached verifications, e.g. after a revocation in this process."""
        self._cache.clear()

    def authenticate(self, key: str | None) -> Principal:
        """The caller's principal; DoorError 401 for a missing, invalid or expired key, 503 when keys cannot be checked."""
        if not key:
            raise DoorError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
        cache_key = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if (
            cached is not None
            and cached[1] > now
            and (cached[0].expires_at is None or cached[0].expires_at > datetime.now(UTC))
        ):
            return cached[0]
        try:
            principal = self.keys.check(key)
        except KeyRefused as refused:
            self._cache.pop(cache_key, None)
            raise DoorError(401, str(refused), code=refused.code) from None
        except KeysUnavailable as unavailable:
            raise DoorError(503, str(unavailable), code="auth_unavailable") from None
        except ConfigurationError as error:
            raise DoorError(503, f"API keys cannot be checked: {error}", code="auth_unavailable") from None
        except SQLAlchemyError:
            raise DoorError(
                503,
                "API keys cannot be checked: the registry database is unreachable or not migrated (start the registry first)",
                code="auth_unavailable",
            ) from None
        if len(self._cache) > 10_000:
            # Bounded: a flood of distinct keys must not grow the cache without end.
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
        self._cache[cache_key] = (principal, now + self._ttl)
        return principal

    def authorise(self, key: str | None, role: Role) -> Principal:
        """The caller's principal if its key is valid and its role grants `role`; DoorError 401/503 as
        `authenticate` says, 403 below the role. For doors that are not FastAPI routes (the OTLP/gRPC intake)."""
        principal = self.authenticate(key)
        if not principal.may(role):
            raise _insufficient_role(principal, role)
        return principal

    def require(self, role: Role | str, *, on_refused: Refusal | None = None) -> Callable[..., Principal]:
        """A FastAPI dependency admitting keys whose role grants `role`: 401 without a valid key, 403 below it.

        `on_refused` sees every refusal before it is answered.
        """
        needed = Role(role)

        def dependency(
            request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
        ) -> Principal:
            try:
                principal = self.authenticate(credentials.credentials if credentials else None)
            except DoorError as error:
                if on_refused is not None and error.status == 401:
                    on_refused(request, None, error.status, error.detail.message)
                raise
            if not principal.may(needed):
                refusal = _insufficient_role(principal, needed)
                if on_refused is not None:
                    on_refused(request, principal, 403, refusal.detail.message)
                raise refusal
            return principal

        return dependency

    def any_key(self) -> Callable[..., Principal]:
        """A FastAPI dependency admitting any valid key, whatever its role (a key asking who it is)."""

        def dependency(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
            return self.authenticate(credentials.credentials if credentials else None)

        return dependency


def _insufficient_role(principal: Principal, needed: Role) -> DoorError:
    return DoorError(
        403,
        f"{principal.name} has role {principal.role.value}; this needs {needed.value} or higher",
        code="insufficient_role",
    )


def require(
    authenticator: Authenticator, role: Role | str, *, on_refused: Refusal | None = None
) -> Callable[..., Principal]:
    """`Depends(require(auth, Role.operator))`: the same as `authenticator.require(role)`."""
    return authenticator.require(role, on_refused=on_refused)
