"""Base models: registered once, by name, with their safetensors already in the artifact store."""

from __future__ import annotations

from contracts.events import ModelRegistered
from contracts.http import BaseModelView
from services.registry import store
from services.registry.changes import Changes
from services.registry.errors import Conflict, Invalid
from services.registry.models import BaseModelRecord
from services.registry.outbox import stage_event
from services.registry.store import Page
from services.runtime.artifacts import ArtifactError, ArtifactStore


class BaseModels:
    """Registering and reading base models."""

    def __init__(self, changes: Changes, artifacts: ArtifactStore) -> None:
        self.changes = changes
        self.artifacts = artifacts

    def register_base_model(
        self,
        actor: str,
        *,
        name: str,
        source: str,
        architecture: str,
        parameter_count: int,
        artifact_uri: str,
        artifact_sha256: str,
        license: str | None = None,
        chat_template: str | None = None,
        details: dict | None = None,
    ) -> BaseModelView:
        """Register a base model whose safetensors are already in the artifact store."""
        with self.changes.change(actor, "model.register", "model", name) as session:
            if store.model_exists(session, name):
                raise Conflict(
                    f"model {name!r} is already registered; choose another name", param="name", code="duplicate_name"
                )
            try:
                stored = self.artifacts.exists(artifact_uri)
            except ArtifactError as error:  # outside the artifact store: never read, never announced
                raise Invalid(
                    f"base model artifact refused: {error}", param="artifact_uri", code="artifact_invalid"
                ) from None
            if not stored:
                raise Invalid(
                    f"no artifact at {artifact_uri}; store the weights first",
                    param="artifact_uri",
                    code="artifact_not_found",
                )
            row = BaseModelRecord(
                name=name,
                source=source,
                architecture=architecture,
                parameter_count=parameter_count,
                license=license,
                artifact_uri=artifact_uri,
                artifact_sha256=artifact_sha256,
                chat_template=chat_template,
                details=details or {},
                created_by=actor,
            )
            session.add(row)
            self.changes.record(
                session,
                actor,
                "model.register",
                "model",
                name,
                after={"source": source, "artifact_sha256": artifact_sha256},
            )
            stage_event(
                session,
                ModelRegistered(
                    model_name=name,
                    source=source,
                    architecture=architecture,
                    parameter_count=parameter_count,
                    license=license,
                    artifact_uri=artifact_uri,
                    artifact_sha256=artifact_sha256,
                ),
            )
        return BaseModelView.model_validate(row)

    def get_model(self, name: str) -> BaseModelView:
        """One base model by name."""
        with self.changes.store.reading() as session:
            return BaseModelView.model_validate(store.model_named(session, name))

    def list_models(self, *, cursor: str | None = None, limit: int = 50) -> Page:
        """Base models, oldest first."""
        with self.changes.store.reading() as session:
            return store.page(
                session, store.models_query(), BaseModelRecord, BaseModelView.model_validate, cursor, limit
            )
