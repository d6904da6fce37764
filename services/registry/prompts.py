"""Prompts: immutable template versions, labels pointing at them (publishing to a stage, a rollback, an
A/B share of production traffic), and rendering in the sandbox. Moving the production label uses up
an approval (approvals.py)."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from contracts.events import PromptPublished
from contracts.http import PromptVersionView
from services.registry import store
from services.registry.approvals import PRODUCTION_LABEL, Approvals
from services.registry.changes import Changes
from services.registry.errors import Forbidden, Invalid, NotFound
from services.registry.models import Approval, PromptLabel, PromptVersion, utcnow
from services.registry.outbox import stage_event
from services.registry.store import Page
from services.runtime.prompts import (
    MissingVariable,
    TemplateSyntax,
    UnsafeTemplate,
    render_template,
    template_variables,
)


class Prompts:
    """Publishing, labelling, reading and rendering prompt versions."""

    def __init__(self, changes: Changes, approvals: Approvals) -> None:
        self.changes = changes
        self.approvals = approvals

    def publish_prompt(
        self, actor: str, *, name: str, template: str, model_name: str | None = None, labels: list[str] | None = None
    ) -> PromptVersionView:
        """Store the next immutable version of a prompt template and point the given labels at it."""
        with self.changes.change(actor, "prompt.publish", "prompt", name) as session:
            if PRODUCTION_LABEL in (labels or []):
                raise Forbidden(
                    f"a new version cannot go straight to {PRODUCTION_LABEL}: publish it without that label, have another principal with the approver role approve it "
                    f"(POST /registry/v1/prompts/{name}/versions/<version>/approvals), then move the label (PUT /registry/v1/prompts/{name}/labels/{PRODUCTION_LABEL})",
                    param="labels",
                    code="approval_required",
                )
            try:
                variables = template_variables(template)
            except TemplateSyntax as error:
                raise Invalid(
                    f"template does not parse: line {error.lineno}: {error.message}",
                    param="template",
                    code="template_syntax",
                ) from None
            version = store.next_prompt_version(session, name)
            row = PromptVersion(
                name=name,
                version=version,
                template=template,
                variables=variables,
                model_name=model_name,
                created_by=actor,
            )
            session.add(row)
            for label in labels or []:
                self._point_label(session, actor, name, label, version)
            self.changes.record(
                session,
                actor,
                "prompt.publish",
                "prompt",
                f"{name}:v{version}",
                after={"variables": variables, "labels": labels or []},
            )
            traffic = store.label_traffic(session, name, version)
            stage_event(
                session,
                PromptPublished(
                    prompt_name=name,
                    version=version,
                    model_name=model_name,
                    template=template,
                    variables=variables,
                    labels=list(labels or []),
                    label_traffic=traffic,
                ),
            )
        return _view(row, list(labels or []), traffic)

    def set_prompt_label(
        self, actor: str, *, name: str, label: str, version: int, traffic_percent: float | None = None
    ) -> PromptVersionView:
        """Point a label at a version: publishing to a stage, or a rollback. With `traffic_percent`, the
        label also declares an A/B split: that share of production-label traffic gets its version."""
        with self.changes.change(actor, "prompt.label", "prompt", f"{name}@{label}") as session:
            if label == PRODUCTION_LABEL and traffic_percent:
                raise Invalid(
                    f"the {PRODUCTION_LABEL} label gets the traffic no split takes; declare the share on the candidate's label, e.g. PUT /prompts/{name}/labels/candidate",
                    param="traffic_percent",
                    code="invalid_split",
                )
            row = store.prompt_version(session, name, version)
            approval: Approval | None = None
            current = session.get(PromptLabel, (name, label))
            if label == PRODUCTION_LABEL and (current is None or current.version != version):
                how = f"flywheel registry approve-prompt {name} {version}, or POST /registry/v1/prompts/{name}/versions/{version}/approvals"
                approval = self.approvals.use(session, actor, "prompt", f"{name}:v{version}", PRODUCTION_LABEL, how)
            self._point_label(session, actor, name, label, version, traffic_percent, approval)
            labels = store.labels_of(session, name, version)
            traffic = store.label_traffic(session, name, version)
            stage_event(
                session,
                PromptPublished(
                    prompt_name=name,
                    version=version,
                    model_name=row.model_name,
                    template=row.template,
                    variables=list(row.variables),
                    labels=sorted(set(labels) | {label}),
                    label_traffic=traffic,
                ),
            )
        return _view(row, sorted(set(labels) | {label}), traffic)

    def _point_label(
        self,
        session: Session,
        actor: str,
        name: str,
        label: str,
        version: int,
        traffic_percent: float | None = None,
        approval: Approval | None = None,
    ) -> None:
        """Move a label; its A/B share moves with it unless `traffic_percent` sets a new one (0 ends it)."""
        existing = session.get(PromptLabel, (name, label))
        before = {"version": existing.version, "traffic_percent": existing.traffic_percent} if existing else None
        share = (
            existing.traffic_percent if existing is not None and traffic_percent is None else (traffic_percent or None)
        )
        if existing is None:
            session.add(PromptLabel(name=name, label=label, version=version, traffic_percent=share, updated_by=actor))
        else:
            existing.version, existing.traffic_percent, existing.updated_by, existing.updated_at = (
                version,
                share,
                actor,
                utcnow(),
            )
            session.add(existing)
        after: dict[str, Any] = {"version": version, "traffic_percent": share}
        if approval is not None:
            after |= {"approver": approval.approved_by, "approval_id": approval.id}
        self.changes.record(session, actor, "prompt.label", "prompt", f"{name}@{label}", before=before, after=after)

    def get_prompt(self, name: str, *, version: int | None = None, label: str | None = None) -> PromptVersionView:
        """A prompt version by number, by label, or the latest."""
        with self.changes.store.reading() as session:
            if version is None and label is not None:
                pointer = session.get(PromptLabel, (name, label))
                if pointer is None:
                    raise NotFound(f"prompt {name!r} has no label {label!r}", param="label", code="label_not_found")
                version = pointer.version
            if version is None:
                version = store.latest_prompt_version(session, name)
                if version is None:
                    raise NotFound(f"no prompt named {name!r}", param="name", code="prompt_not_found")
            row = store.prompt_version(session, name, version)
            return _view(
                row, sorted(store.labels_of(session, name, version)), store.label_traffic(session, name, version)
            )

    def list_prompts(self, *, name: str | None = None, cursor: str | None = None, limit: int = 50) -> Page:
        """Prompt versions, optionally of one name."""
        with self.changes.store.reading() as session:
            return store.page(
                session, store.prompts_query(name), PromptVersion, lambda row: _view(row, []), cursor, limit
            )

    def render_prompt(
        self, name: str, variables: dict[str, Any], *, version: int | None = None, label: str | None = None
    ) -> str:
        """Render a prompt version in the sandbox; a missing variable is an Invalid naming it."""
        prompt = self.get_prompt(name, version=version, label=label)
        try:
            return render_template(prompt.template, variables, needs=prompt.variables)
        except MissingVariable as error:
            detail = f" needs variable(s) {', '.join(error.missing)}" if error.missing else f": {error}"
            raise Invalid(
                f"prompt {name}:v{prompt.version}{detail}", param="variables", code="missing_variable"
            ) from None
        except UnsafeTemplate as error:
            raise Invalid(
                f"prompt {name}:v{prompt.version} tried an unsafe operation: {error}",
                param="template",
                code="unsafe_template",
            ) from None


def _view(row: PromptVersion, labels: list[str], traffic: dict[str, float] | None = None) -> PromptVersionView:
    return PromptVersionView(
        name=row.name,
        version=row.version,
        template=row.template,
        variables=list(row.variables),
        model_name=row.model_name,
        labels=labels,
        label_traffic=traffic or {},
        created_at=row.created_at,
        created_by=row.created_by,
    )
