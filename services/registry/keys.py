"""API keys: created (the secret returned once, stored hashed under the pepper), rotated with an optional
grace period for the old key, listed without their secrets, revoked. Every change is audited."""

from __future__ import annotations

from datetime import timedelta

from contracts.http import ApiKeyView
from services.registry import store
from services.registry.changes import Changes, aware, iso
from services.registry.errors import NotFound
from services.registry.models import utcnow
from services.runtime.auth import ApiKey, Role, add_key, development_pepper, generate_key


class Keys:
    """The registry's API keys, managed by admins."""

    def __init__(self, changes: Changes, *, key_pepper: bytes | None = None) -> None:
        self.changes = changes
        self._key_pepper = key_pepper

    @property
    def key_pepper(self) -> bytes:
        """FLYWHEEL_KEY_PEPPER as given, else the development pepper beside the SQLite database."""
        if self._key_pepper is None:
            self._key_pepper = development_pepper(self.changes.store.url)
        return self._key_pepper

    def create_api_key(self, actor: str, *, principal: str, role: Role, ttl_s: int | None = None) -> tuple[str, ApiKey]:
        """A new API key (returned once, stored hashed under the pepper), expiring after `ttl_s` when given; audited."""
        key, _, _ = generate_key()
        expires_at = utcnow() + timedelta(seconds=ttl_s) if ttl_s else None
        with self.changes.change(actor, "key.create", "key", principal) as session:
            row = add_key(
                session,
                key,
                principal=principal,
                role=role,
                created_by=actor,
                pepper=self.key_pepper,
                expires_at=expires_at,
            )
            self.changes.record(
                session,
                actor,
                "key.create",
                "key",
                row.key_id,
                after={"principal": principal, "role": Role(role).value, "expires_at": iso(expires_at)},
            )
        return key, row

    def rotate_api_key(
        self, actor: str, key_id: str, *, grace_s: int = 0, ttl_s: int | None = None
    ) -> tuple[str, ApiKey]:
        """A new key for the same principal and role; the old one is revoked now, or expires after `grace_s`."""
        key, _, _ = generate_key()
        now = utcnow()
        with self.changes.change(actor, "key.rotate", "key", key_id) as session:
            old = session.get(ApiKey, key_id)
            if (
                old is None
                or old.revoked_at is not None
                or (old.expires_at is not None and aware(old.expires_at) <= now)
            ):
                raise NotFound(f"no active key {key_id}", param="key_id", code="key_not_found")
            expires_at = now + timedelta(seconds=ttl_s) if ttl_s else None
            row = add_key(
                session,
                key,
                principal=old.principal,
                role=Role(old.role),
                created_by=actor,
                pepper=self.key_pepper,
                expires_at=expires_at,
                rotated_from=old.key_id,
            )
            if grace_s:
                old_expiry = now + timedelta(seconds=grace_s)
                old.expires_at = min(old_expiry, aware(old.expires_at)) if old.expires_at else old_expiry
            else:
                old.revoked_at = now
            session.add(old)
            self.changes.record(
                session,
                actor,
                "key.rotate",
                "key",
                key_id,
                before={"principal": old.principal, "role": old.role},
                after={
                    "new_key_id": row.key_id,
                    "old_expires_at": iso(old.expires_at),
                    "old_revoked": old.revoked_at is not None,
                },
            )
        return key, row

    def list_api_keys(
        self, *, principal: str | None = None, cursor: str | None = None, limit: int = 100
    ) -> list[ApiKeyView]:
        """Keys (never their secrets), by principal when given, ordered by key id."""
        with self.changes.store.reading() as session:
            return [
                ApiKeyView.model_validate(row) for row in session.scalars(store.keys_query(principal, cursor, limit))
            ]

    def revoke_api_key(self, actor: str, key_id: str) -> None:
        """Revoke a key by id."""
        with self.changes.change(actor, "key.revoke", "key", key_id) as session:
            row = session.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                raise NotFound(f"no active key {key_id}", param="key_id", code="key_not_found")
            row.revoked_at = utcnow()
            session.add(row)
            self.changes.record(
                session, actor, "key.revoke", "key", key_id, before={"principal": row.principal, "role": row.role}
            )
