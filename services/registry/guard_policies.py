"""Guard policies: immutable versions of what a gateway does inline with a model's traffic (an action per
check on each side of a call, how its cache may be used), and which version is active. Activating a
version, on publication or later (a rollback is activating an earlier one), announces it to the gateways
as `guard_policy.activated`.

A policy is attached to a whole model, to one of its routes (production, staging, canary, pinned,
direct) or to the model's calls that use one registry prompt; the gateway applies the most specific one
(prompt, then route, then model). A policy name is bound to the attachment of its first version, and an
attachment has one policy name, so "the guard of X" is always one history of versions; the database
refuses a second name for an attachment too (models.GuardPolicyVersion's partial unique index), so two
racing first publications cannot both win.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from contracts.events import GuardPolicyActivated, GuardPolicySpec, ServedRoute, guard_attachment
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
        self,
        actor: str,
        *,
        name: str,
        model_name: str,
        spec: GuardPolicySpec,
        route: ServedRoute | None = None,
        prompt_name: str | None = None,
        activate: bool = True,
    ) -> GuardPolicyView:
        """Store the next immutable version of a guard policy; with `activate`, make it the active one."""
        attached_to = guard_attachment(route.value if route else None, prompt_name)
        where = _described(model_name, attached_to)
        with self.changes.change(actor, "guard_policy.publish", "guard_policy", name) as session:
            first = store.first_guard_policy_version(session, name)
            if first is not None and (first.model_name, first.attached_to) != (model_name, attached_to):
                holder = store.guard_policy_attached(session, model_name, attached_to)
                elsewhere = f"its own policy {holder!r}" if holder else "a policy of another name"
                raise Invalid(
                    f"guard policy {name!r} guards {_described(first.model_name, first.attached_to)} (bound by its v1), "
                    f"not {where}: publish its next version there, or guard {where} with {elsewhere}",
                    param="model_name" if first.model_name != model_name else "route" if route else "prompt_name",
                    code="model_mismatch",
                )
            if first is None and (holder := store.guard_policy_attached(session, model_name, attached_to)) is not None:
                raise Invalid(
                    f"{where} is already guarded by guard policy {holder!r}, and each model, route and prompt has "
                    f"one guard policy: publish a new version of {holder!r} instead (POST /registry/v1/guard-policies "
                    f"with name {holder!r}, or flywheel registry publish-guard-policy {holder} ...)",
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
                attached_to=attached_to,
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
                after={"model_name": model_name, "attached_to": attached_to, "spec": row.spec, "activate": activate},
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
                **_attachment_fields(row.attached_to),
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


def _attachment_fields(attached_to: str) -> dict[str, Any]:
    """The attached_to column (contracts' guard_attachment) back as the contracts' route and prompt_name fields."""
    kind, _, value = attached_to.partition(":")
    return {
        "route": ServedRoute(value) if kind == "route" else None,
        "prompt_name": value if kind == "prompt" else None,
    }


def _described(model_name: str, attached_to: str) -> str:
    kind, _, value = attached_to.partition(":")
    if kind == "route":
        return f"route {value} of model {model_name!r}"
    if kind == "prompt":
        return f"prompt {value!r} on model {model_name!r}"
    return f"model {model_name!r}"


def _view(row: GuardPolicyVersion, *, active: bool) -> GuardPolicyView:
    return GuardPolicyView(
        name=row.name,
        version=row.version,
        model_name=row.model_name,
        **_attachment_fields(row.attached_to),
        spec=GuardPolicySpec.model_validate(row.spec),
        active=active,
        created_at=row.created_at,
        created_by=row.created_by,
    )
