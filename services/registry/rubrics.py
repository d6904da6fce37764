"""Review rubrics: immutable versions per name of what reviewers are asked to judge and the dimensions they
score an answer on. The feedback service's review queues name a rubric version, so a score always says
which questions it answered; a changed rubric is a new version, never an edit.

Publishing is audited like a prompt's; no event announces it (contracts/events.py has none): whoever uses
a rubric reads it from the door when it needs it."""

from __future__ import annotations

from contracts.http import RubricDimension, RubricVersionView
from services.registry import store
from services.registry.changes import Changes, aware
from services.registry.errors import NotFound
from services.registry.models import RubricVersion
from services.registry.store import Page


class Rubrics:
    """Publishing and reading rubric versions."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes

    def publish_rubric(
        self, actor: str, *, name: str, instructions: str, dimensions: list[RubricDimension]
    ) -> RubricVersionView:
        """Store the next immutable version of a rubric."""
        with self.changes.change(actor, "rubric.publish", "rubric", name) as session:
            version = (store.latest_rubric_version(session, name) or 0) + 1
            # Every field written out, defaults included: a version keeps meaning what it meant when published.
            row = RubricVersion(
                name=name,
                version=version,
                instructions=instructions,
                dimensions=[dimension.model_dump(mode="json") for dimension in dimensions],
                created_by=actor,
            )
            session.add(row)
            self.changes.record(
                session, actor, "rubric.publish", "rubric", f"{name}:v{version}", after={"dimensions": row.dimensions}
            )
        return _view(row)

    def get_rubric(self, name: str, *, version: int | None = None) -> RubricVersionView:
        """A rubric version by number, else the latest."""
        with self.changes.store.reading() as session:
            if version is None:
                version = store.latest_rubric_version(session, name)
                if version is None:
                    raise NotFound(f"no rubric named {name!r}", param="name", code="rubric_not_found")
            return _view(store.rubric_version(session, name, version))

    def list_rubrics(self, *, cursor: str | None = None, limit: int = 50) -> Page:
        """The latest version of every rubric."""
        with self.changes.store.reading() as session:
            return store.page(session, store.latest_rubrics_query(), RubricVersion, _view, cursor, limit)

    def list_versions(self, name: str, *, cursor: str | None = None, limit: int = 50) -> Page:
        """Every version of one rubric, oldest first."""
        with self.changes.store.reading() as session:
            return store.page(session, store.rubric_versions_query(name), RubricVersion, _view, cursor, limit)


def _view(row: RubricVersion) -> RubricVersionView:
    # SQLite reads the time back naive; it was written in UTC, and the view says so whichever database answers.
    return RubricVersionView.model_validate(row).model_copy(update={"created_at": aware(row.created_at)})
