"""Guard policies: immutable versions of what a gateway does inline with one model's traffic (an action
per check on each side of a call, how its cache may be used), and which version is active. Activating a
version, on publication or later (a rollback is activating an earlier one), announces it to the gateways
as `guard_policy.activated`.

A policy name is bound to the model of its first version, and a model has one policy name, so "the guard
of model X" is always one history of versions; the database refuses a second name for a model too
(models.GuardPolicyVersion's partial unique index), so two racing first publications cannot both win.
"""

from __future__ import annotations

from sqlmodel import Session

from contracts.events import GuardPolicyActivated, GuardPolicySpec
from contracts.http import GuardPolicyView
from services.registry import store
from services.registry.changes import Changes
from services.registry.errors import Invalid, NotFound
from services.registry.models import GuardPolicyActive, GuardPolicyVersion, utcnow
from services.registry.outbox import stage_event
from services.registry.store import Page


class GuardPolicies:
    """Publishing, activating (and rolling back) and reading guard policy versions."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes

    def publish_policy(
        self, actor: str, *, name: str, model_name: str, spec: GuardPolicySpec, activate: bool = True
    ) -> GuardPolicyView:
        """Store the next immutable version of a guard policy; with `activate`, make it the active one."""
        with self.changes.change(actor, "guard_policy.publish", "guard_policy", name) as session:
            first = store.first_guard_policy_version(session, name)
            if first is not None and first.model_name != model_name:
                holder = store.guard_policy_of_model(session, model_name)
                elsewhere = f"its own policy {holder!r}" if holder else "a policy of another name"
                raise Invalid(
                    f"guard policy {name!r} guards model {first.model_name!r} (bound by its v1), not {model_name!r}: "
                    f"publish its next version with model_name {first.model_name!r}, or guard {model_name!r} with {elsewhere}",
                    param="model_name",
                    code="model_mismatch",
                )
            if first is None and (holder := store.guard_policy_of_model(session, model_name)) is not None:
                raise Invalid(
                    f"model {model_name!r} is already guarded by guard policy {holder!r}, and a model has one guard policy: "
                    f"publish a new version of {holder!r} instead (POST /registry/v1/guard-policies with name {holder!r}, "
                    f"or flywheel registry publish-guard-policy {holder} --model {model_name} --spec FILE.json)",
                    param="name",
                    code="model_has_policy",
                )
            version = (store.latest_guard_policy_version(session, name) or 0) + 1
            # Every field written out, defaults included: a version keeps meaning what it meant when
            # published even if a later contract changes a default.
            row = GuardPolicyVersion(
                name=name,
                version=version,
                model_name=model_name,
                spec=spec.model_dump(mode="json"),
                created_by=actor,
            )
            session.add(row)
            self.changes.record(
                session,
                actor,
                "guard_policy.publish",
                "guard_policy",
                f"{name}:v{version}",
                after={"model_name": model_name, "spec": row.spec, "activate": activate},
            )
            if activate:
                self._activate(session, actor, row)
        return _view(row, active=activate)

    def activate_policy(self, actor: str, *, name: str, version: int) -> GuardPolicyView:
        """Make a version the active one: an earlier version is a rollback."""
        with self.changes.change(actor, "guard_policy.activate", "guard_policy", name) as session:
            row = store.guard_policy_version(session, name, version)
            self._activate(session, actor, row)
        return _view(row, active=True)

    def _activate(self, session: Session, actor: str, row: GuardPolicyVersion) -> None:
        """Point the policy at `row`, audit the move and announce it, all in the caller's transaction."""
        pointer = session.get(GuardPolicyActive, row.name)
        before = {"version": pointer.version} if pointer is not None else None
        if pointer is None:
            pointer = GuardPolicyActive(name=row.name, version=row.version, updated_by=actor)
        else:
            pointer.version, pointer.updated_by, pointer.updated_at = row.version, actor, utcnow()
        session.add(pointer)
        self.changes.record(
            session,
            actor,
            "guard_policy.activate",
            "guard_policy",
            row.name,
            before=before,
            after={"version": row.version},
        )
        stage_event(
            session,
            GuardPolicyActivated(
                policy_name=row.name,
                version=row.version,
                model_name=row.model_name,
                spec=GuardPolicySpec.model_validate(row.spec),
                actor=actor,
            ),
        )

    def get_policy(self, name: str, *, version: int | None = None) -> GuardPolicyView:
        """A guard policy version by number, else the active one, else the latest."""
        with self.changes.store.reading() as session:
            pointer = session.get(GuardPolicyActive, name)
            if version is None and pointer is not None:
                version = pointer.version
            if version is None:
                version = store.latest_guard_policy_version(session, name)
                if version is None:
                    raise NotFound(f"no guard policy named {name!r}", param="name", code="guard_policy_not_found")
            row = store.guard_policy_version(session, name, version)
            return _view(row, active=pointer is not None and pointer.version == row.version)

    def list_policies(self, *, name: str | None = None, cursor: str | None = None, limit: int = 50) -> Page:
        """Guard policy versions, optionally of one name, each saying whether it is the active one."""
        with self.changes.store.reading() as session:
            rows = store.page(
                session, store.guard_policies_query(name), GuardPolicyVersion, lambda row: row, cursor, limit
            )
            active = store.active_guard_policy_versions(session, {row.name for row in rows.items})
            return Page(
                items=[_view(row, active=active.get(row.name) == row.version) for row in rows.items],
                next_cursor=rows.next_cursor,
            )


def _view(row: GuardPolicyVersion, *, active: bool) -> GuardPolicyView:
    return GuardPolicyView(
        name=row.name,
        version=row.version,
        model_name=row.model_name,
        spec=GuardPolicySpec.model_validate(row.spec),
        active=active,
        created_at=row.created_at,
        created_by=row.created_by,
    )
