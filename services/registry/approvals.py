"""Approvals of production promotions: an adapter version to the production stage, or the production
label of a prompt version, needs a yes recorded beforehand by another principal with the approver role
or admin (`approve`); the promotion uses it up (`use`), and the audit log names both."""

from __future__ import annotations

from sqlmodel import Session

from contracts.http import ApprovalView
from services.registry import store
from services.registry.changes import Changes
from services.registry.errors import Forbidden, Invalid
from services.registry.models import Approval, utcnow
from services.runtime.auth import GRANTS, Role

PRODUCTION_LABEL = "production"


class Approvals:
    """Recording approvals, and using one up for a promotion."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes

    def approve(
        self,
        approver: str,
        approver_role: Role,
        *,
        object_type: str,
        name: str,
        version: int,
        target: str = PRODUCTION_LABEL,
        comment: str | None = None,
    ) -> ApprovalView:
        """Record `approver`'s yes to promoting an adapter version (object_type adapter) or a prompt
        version (prompt) to production; a promotion by another principal uses it up."""
        object_id = f"{name}:v{version}"
        if Role.approver not in GRANTS[Role(approver_role)]:
            raise Forbidden(
                f"{approver} has role {Role(approver_role).value}; approving needs approver or admin",
                code="insufficient_role",
            )
        with self.changes.change(approver, "approval.grant", object_type, object_id) as session:
            if target != PRODUCTION_LABEL:
                raise Invalid(
                    f"only promotions to {PRODUCTION_LABEL} need approval; {target!r} does not",
                    param="target",
                    code="approval_not_needed",
                )
            if object_type == "adapter":
                store.adapter_version(session, name, version)
            else:
                store.prompt_version(session, name, version)
            row = Approval(
                object_type=object_type,
                object_id=object_id,
                target=target,
                approved_by=approver,
                approved_role=Role(approver_role).value,
                comment=comment,
            )
            session.add(row)
            session.flush()
            self.changes.record(
                session,
                approver,
                "approval.grant",
                object_type,
                object_id,
                after={"target": target, "approval_id": row.id},
                detail=comment,
            )
        return ApprovalView.model_validate(row)

    def list_approvals(self, *, object_type: str, name: str, version: int) -> list[ApprovalView]:
        """Approvals of one adapter or prompt version, oldest first, used or not."""
        with self.changes.store.reading() as session:
            return [
                ApprovalView.model_validate(row)
                for row in store.approvals_of(session, object_type, f"{name}:v{version}")
            ]

    @staticmethod
    def use(
        session: Session, requester: str, object_type: str, object_id: str, target: str, how_to_approve: str
    ) -> Approval:
        """Take the oldest unused approval of this promotion by someone other than the requester, or refuse (403)."""
        unused = store.unused_approvals(session, object_type, object_id, target)
        approval = next((row for row in unused if row.approved_by != requester), None)
        if approval is None:
            if unused:
                raise Forbidden(
                    f"{object_id} to {target} was approved only by {requester}, who is requesting it: another principal with the approver role must approve ({how_to_approve})",
                    code="self_approval",
                )
            raise Forbidden(
                f"{object_id} to {target} needs an approval by another principal with the approver role: ask one to approve it first ({how_to_approve})",
                code="approval_required",
            )
        approval.used_by, approval.used_at = requester, utcnow()
        session.add(approval)
        return approval
