"""API keys with roles, and the FastAPI dependency every service's door authenticates with.

Keys look like `fw_<key id>_<secret>` and travel as `Authorization: Bearer <key>`. At rest only the
key id, a random per-key salt and sha256(salt + secret) are kept: the secrets are 256-bit random, so
a slow password hash would buy nothing, while a leaked table still reveals no usable key.

Where keys live, and how other processes check them: in the registry database (table `api_key`,
created by the registry's migrations; only the registry writes it). Every service opens that
database read-only for lookups (FLYWHEEL_DATABASE_URL, or the SQLite file under FLYWHEEL_HOME),
through `Authenticator.for_settings`. That keeps one source of truth without a network hop per
request or a registry that must be up for the other doors to answer; results are cached for a few
seconds, so a revoked key stops working everywhere within `cache_ttl_s`.

Roles: admin (everything, key management), operator (mutations: register, promote, train), approver
(production promotions), reviewer (review corrections), app (call the gateway, send feedback and
events; reads nothing) and viewer (read). Every role but app also grants viewer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import DateTime, Engine, create_engine, event, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel

from contracts.http import Role
from services.runtime.http import DoorError
from services.runtime.settings import FlywheelSettings

KEY_PREFIX = "fw"


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
    secret_sha256: str = Field(max_length=64)
    created_at: datetime = Field(sa_type=DateTime(timezone=True))
    created_by: str = Field(max_length=256)
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the name recorded in audit logs, the role, and which key they used."""

    name: str
    role: Role
    key_id: str

    def may(self, role: Role) -> bool:
        return role in GRANTS[self.role]


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


def hash_secret(secret: str, salt: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def add_key(session: Session, key: str, *, principal: str, role: Role, created_by: str) -> ApiKey:
    """Stage a key row in the caller's transaction (so the registry audits it atomically)."""
    key_id, secret = split_key(key)
    salt = secrets.token_hex(16)
    row = ApiKey(key_id=key_id, principal=principal, role=Role(role).value, salt=salt, secret_sha256=hash_secret(secret, salt), created_at=datetime.now(UTC), created_by=created_by)
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
        def _pragmas(connection, _record) -> None:  # noqa: ANN001 - SQLAlchemy's DBAPI hook
            # SQLAlchemy issues BEGIN itself (below), so pysqlite must not open transactions on its own.
            connection.isolation_level = None
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=30000")

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection) -> None:  # noqa: ANN001
            # A deferred transaction that reads and then writes fails at once with "database is
            # locked" under concurrency; taking the write lock at BEGIN makes writers queue instead.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class KeyStore:
    """Key lookups and management over the registry database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def verify(self, key: str) -> Principal | None:
        """The principal a key belongs to, or None for an unknown, wrong or revoked key."""
        key_id, secret = split_key(key)
        with Session(self._engine) as session:
            row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.secret_sha256, hash_secret(secret, row.salt)):
            return None
        return Principal(name=row.principal, role=Role(row.role), key_id=row.key_id)

    def create(self, *, principal: str, role: Role, created_by: str) -> tuple[str, ApiKey]:
        """A new key for `principal`; the full key is returned once and never stored."""
        key, _, _ = generate_key()
        with Session(self._engine) as session:
            row = add_key(session, key, principal=principal, role=role, created_by=created_by)
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
        with Session(self._engine) as session:
            count = session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.role == Role.admin.value, ApiKey.revoked_at.is_(None)))  # type: ignore[union-attr]
        return bool(count)

    def ensure_bootstrap_admin(self, key: str | None) -> bool:
        """Create the admin key FLYWHEEL_BOOTSTRAP_ADMIN_KEY names when no active admin exists; True if created."""
        if not key or self.has_active_admin():
            return False
        try:
            with Session(self._engine) as session:
                add_key(session, key, principal="bootstrap-admin", role=Role.admin, created_by="bootstrap")
                session.commit()
        except IntegrityError:
            return False  # another process bootstrapped the same key first
        return True


Refusal = Callable[[Request, Principal | None, int, str], None]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer fw_<id>_<secret>`.")


class Authenticator:
    """Turns `Authorization: Bearer <key>` into a Principal, with a short cache in front of the database."""

    _shared: dict[str, Authenticator] = {}
    _shared_lock = threading.Lock()

    def __init__(self, keys: KeyStore, *, cache_ttl_s: float = 10.0) -> None:
        self.keys = keys
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def for_settings(cls, settings: FlywheelSettings) -> Authenticator:
        """One authenticator per registry database in a process, so services run together share it."""
        url = registry_database_url(settings)
        with cls._shared_lock:
            if url not in cls._shared:
                cls._shared[url] = cls(KeyStore(create_database_engine(url)))
            return cls._shared[url]

    def forget(self) -> None:
        """Drop cached verifications, e.g. after a revocation in this process."""
        self._cache.clear()

    def authenticate(self, key: str | None) -> Principal:
        """The caller's principal; DoorError 401 for a missing or invalid key."""
        if not key:
            raise DoorError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
        cache_key = hashlib.sha256(key.encode()).hexdigest()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            principal = self.keys.verify(key)
        except SQLAlchemyError:
            raise DoorError(503, "API keys cannot be checked: the registry database is unreachable or not migrated (start the registry first)", code="auth_unavailable") from None
        if principal is None:
            raise DoorError(401, "invalid API key: unknown, wrong or revoked", code="invalid_api_key")
        self._cache[cache_key] = (principal, time.monotonic() + self._ttl)
        return principal

    def require(self, role: Role | str, *, on_refused: Refusal | None = None) -> Callable[..., Principal]:
        """A FastAPI dependency admitting keys whose role grants `role`: 401 without a valid key, 403 below it.

        `on_refused` sees every refusal before it is answered (the registry audits refused mutations with it).
        """
        needed = Role(role)

        def dependency(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
            try:
                principal = self.authenticate(credentials.credentials if credentials else None)
            except DoorError as error:
                if on_refused is not None and error.status == 401:
                    on_refused(request, None, error.status, error.detail.message)
                raise
            if not principal.may(needed):
                message = f"{principal.name} has role {principal.role.value}; this needs {needed.value} or higher"
                if on_refused is not None:
                    on_refused(request, principal, 403, message)
                raise DoorError(403, message, code="insufficient_role")
            return principal

        return dependency


def require(authenticator: Authenticator, role: Role | str, *, on_refused: Refusal | None = None) -> Callable[..., Principal]:
    """`Depends(require(auth, Role.operator))`: the same as `authenticator.require(role)`."""
    return authenticator.require(role, on_refused=on_refused)
