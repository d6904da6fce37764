"""The registry's HTTP door under /registry/v1: translates requests, calls the service, translates back.

Reads need the viewer role, changes the operator role, key management admin. Every refused change
(unauthenticated, under-privileged, malformed, or refused by a rule) lands in the audit log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from contracts.events import DatasetRef, Hyperparameters, Stage
from contracts.http import Page
from services.registry.models import AdapterVersionView, AuditView, BaseModelView, DatasetVersionView, PromptVersionView
from services.registry.service import Registry, RegistryError
from services.runtime.auth import Authenticator, Principal, Role
from services.runtime.http import DoorError

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCreate(Body):
    name: str = Field(pattern=NAME, description="Registered name.")
    source: str = Field(min_length=1, max_length=1000, description="Package, directory or hub id it came from.")
    architecture: str = Field(min_length=1, max_length=200)
    parameter_count: int = Field(ge=0)
    artifact_uri: str = Field(min_length=1, max_length=2000, description="Where its safetensors are stored (artifact store).")
    artifact_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    license: str | None = Field(default=None, max_length=200)
    chat_template: str | None = None


class AdapterCreate(Body):
    model_name: str = Field(pattern=NAME)
    artifact_uri: str = Field(min_length=1, max_length=2000)
    artifact_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training_job_id: str | None = Field(default=None, max_length=200)
    dataset: DatasetRef | None = None
    hyperparameters: Hyperparameters | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class Transition(Body):
    to_stage: Stage = Field(description="Target stage.")
    approver: str | None = Field(default=None, max_length=256, description="Who approved (required for production).")
    reason: str | None = Field(default=None, max_length=2000)
    canary_percent: float | None = Field(default=None, gt=0, lt=100, description="Declare this production version a canary with this share of traffic.")
    replaces: int | None = Field(default=None, ge=1, description="The production version this one replaces (compare-and-swap).")


class PromptCreate(Body):
    name: str = Field(pattern=NAME)
    template: str = Field(min_length=1, max_length=200_000)
    model_name: str | None = Field(default=None, pattern=NAME)
    labels: list[str] = Field(default_factory=list, max_length=20)


class LabelMove(Body):
    version: int = Field(ge=1)


class RenderRequest(Body):
    version: int | None = Field(default=None, ge=1)
    label: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)


class Rendered(BaseModel):
    name: str
    version: int
    text: str


class DatasetCreate(Body):
    name: str = Field(pattern=NAME)
    split: str = Field(pattern=r"^(train|golden)$")
    jsonl: str = Field(description="The records, one JSON object per line.")
    provenance: str = Field(default="uploaded", pattern=r"^(uploaded|feedback)$")
    model_name: str | None = Field(default=None, pattern=NAME)


class KeyCreate(Body):
    principal: str = Field(min_length=1, max_length=256)
    role: Role


class KeyCreated(BaseModel):
    key: str = Field(description="The API key; shown once, stored only as a salted hash.")
    key_id: str
    principal: str
    role: Role


def _object_of(request: Request) -> tuple[str, str]:
    parts = [part for part in request.url.path.split("/") if part][2:]
    return (parts[0].rstrip("s") if parts else "registry"), "/".join(parts[1:]) or "-"


def build_router(registry: Registry, auth: Authenticator) -> APIRouter:
    def audit_refusal(request: Request, actor: str, status: int, message: str) -> None:
        if request.method != "GET":
            object_type, object_id = _object_of(request)
            registry.record_refusal(actor, f"{request.method} {request.url.path}", object_type, object_id, status, message)

    def refused(request: Request, principal: Principal | None, status: int, message: str) -> None:
        audit_refusal(request, principal.name if principal else "anonymous", status, message)

    class AuditedRoute(APIRoute):
        """Refused request bodies of changes are audited too (FastAPI validates before the handler runs)."""

        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def audited(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as error:
                    if request.method != "GET":
                        header = request.headers.get("authorization", "")
                        try:
                            actor = auth.authenticate(header.removeprefix("Bearer ").strip() or None).name
                        except DoorError:
                            actor = "anonymous"
                        first = error.errors()[0] if error.errors() else {}
                        await asyncio.to_thread(audit_refusal, request, actor, 422, str(first.get("msg", "invalid request")))
                    raise

            return audited

    router = APIRouter(prefix="/registry/v1", tags=["registry"], route_class=AuditedRoute)
    reader = auth.require(Role.viewer, on_refused=refused)
    writer = auth.require(Role.operator, on_refused=refused)
    admin = auth.require(Role.admin, on_refused=refused)

    async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except RegistryError as error:
            raise DoorError(error.status, str(error), param=error.param, code=error.code) from None

    def page(result: Any) -> dict:
        return {"items": result.items, "next_cursor": result.next_cursor}

    # ----------------------------------------------------------------------------- models
    @router.get("/models", response_model=Page[BaseModelView])
    async def list_models(cursor: str | None = None, limit: int = Query(50, ge=1, le=500), _: Principal = Depends(reader)) -> dict:
        return page(await call(registry.list_models, cursor=cursor, limit=limit))

    @router.get("/models/{name}", response_model=BaseModelView)
    async def get_model(name: str, _: Principal = Depends(reader)) -> Any:
        return await call(registry.get_model, name)

    @router.post("/models", response_model=BaseModelView, status_code=201)
    async def create_model(body: ModelCreate, who: Principal = Depends(writer)) -> Any:
        return await call(registry.register_base_model, who.name, **body.model_dump())

    # --------------------------------------------------------------------------- adapters
    @router.get("/adapters", response_model=Page[AdapterVersionView])
    async def list_adapters(model_name: str | None = None, stage: Stage | None = None, dataset_name: str | None = None, dataset_version: int | None = Query(None, ge=1), cursor: str | None = None, limit: int = Query(50, ge=1, le=500), _: Principal = Depends(reader)) -> dict:
        dataset = DatasetRef(name=dataset_name, version=dataset_version) if dataset_name and dataset_version else None
        return page(await call(registry.list_adapters, model_name=model_name, stage=stage, dataset=dataset, cursor=cursor, limit=limit))

    @router.post("/adapters", response_model=AdapterVersionView, status_code=201)
    async def create_adapter(body: AdapterCreate, who: Principal = Depends(writer)) -> Any:
        return await call(registry.register_adapter, who.name, **body.model_dump(exclude={"dataset", "hyperparameters"}), dataset=body.dataset, hyperparameters=body.hyperparameters)

    @router.get("/adapters/{model_name}/versions/{version}", response_model=AdapterVersionView)
    async def get_adapter(model_name: str, version: int, _: Principal = Depends(reader)) -> Any:
        return await call(registry.get_adapter, model_name, version)

    @router.get("/adapters/{model_name}/versions/{version}/lineage")
    async def lineage(model_name: str, version: int, _: Principal = Depends(reader)) -> dict:
        return await call(registry.lineage, model_name, version)

    @router.post("/adapters/{model_name}/versions/{version}/transitions", response_model=AdapterVersionView)
    async def transition(model_name: str, version: int, body: Transition, who: Principal = Depends(writer)) -> Any:
        return await call(registry.transition, who.name, model_name=model_name, version=version, **body.model_dump())

    # ---------------------------------------------------------------------------- prompts
    @router.get("/prompts", response_model=Page[PromptVersionView])
    async def list_prompts(name: str | None = None, cursor: str | None = None, limit: int = Query(50, ge=1, le=500), _: Principal = Depends(reader)) -> dict:
        return page(await call(registry.list_prompts, name=name, cursor=cursor, limit=limit))

    @router.post("/prompts", response_model=PromptVersionView, status_code=201)
    async def create_prompt(body: PromptCreate, who: Principal = Depends(writer)) -> Any:
        return await call(registry.publish_prompt, who.name, **body.model_dump())

    @router.get("/prompts/{name}", response_model=PromptVersionView)
    async def get_prompt(name: str, version: int | None = Query(None, ge=1), label: str | None = None, _: Principal = Depends(reader)) -> Any:
        return await call(registry.get_prompt, name, version=version, label=label)

    @router.put("/prompts/{name}/labels/{label}", response_model=PromptVersionView)
    async def move_label(name: str, label: str, body: LabelMove, who: Principal = Depends(writer)) -> Any:
        return await call(registry.set_prompt_label, who.name, name=name, label=label, version=body.version)

    @router.post("/prompts/{name}/render", response_model=Rendered)
    async def render(name: str, body: RenderRequest, _: Principal = Depends(reader)) -> Rendered:
        prompt = await call(registry.get_prompt, name, version=body.version, label=body.label)
        text = await call(registry.render_prompt, name, body.variables, version=prompt.version)
        return Rendered(name=name, version=prompt.version, text=text)

    # --------------------------------------------------------------------------- datasets
    @router.get("/datasets", response_model=Page[DatasetVersionView])
    async def list_datasets(name: str | None = None, cursor: str | None = None, limit: int = Query(50, ge=1, le=500), _: Principal = Depends(reader)) -> dict:
        return page(await call(registry.list_datasets, name=name, cursor=cursor, limit=limit))

    @router.post("/datasets", response_model=DatasetVersionView, status_code=201)
    async def create_dataset(body: DatasetCreate, who: Principal = Depends(writer)) -> Any:
        return await call(registry.publish_dataset, who.name, name=body.name, split=body.split, jsonl=body.jsonl.encode(), provenance=body.provenance, model_name=body.model_name)

    @router.get("/datasets/{name}/versions/{version}", response_model=DatasetVersionView)
    async def get_dataset(name: str, version: int, _: Principal = Depends(reader)) -> Any:
        return await call(registry.get_dataset, name, version)

    @router.get("/datasets/{name}/versions/{version}/rows")
    async def dataset_rows(name: str, version: int, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=10_000), _: Principal = Depends(reader)) -> list[dict]:
        return await call(registry.dataset_rows, name, version, offset=offset, limit=limit)

    # ------------------------------------------------------------------------------ audit
    @router.get("/audit", response_model=Page[AuditView])
    async def audit(object_type: str | None = None, object_id: str | None = None, actor: str | None = None, cursor: str | None = None, limit: int = Query(100, ge=1, le=500), _: Principal = Depends(reader)) -> dict:
        return page(await call(registry.audit, object_type=object_type, object_id=object_id, actor=actor, cursor=cursor, limit=limit))

    # ------------------------------------------------------------------------------- keys
    @router.post("/keys", response_model=KeyCreated, status_code=201)
    async def create_key(body: KeyCreate, who: Principal = Depends(admin)) -> KeyCreated:
        key, row = await call(registry.create_api_key, who.name, principal=body.principal, role=body.role)
        return KeyCreated(key=key, key_id=row.key_id, principal=row.principal, role=Role(row.role))

    @router.delete("/keys/{key_id}", status_code=204)
    async def revoke_key(key_id: str, who: Principal = Depends(admin)) -> Response:
        await call(registry.revoke_api_key, who.name, key_id)
        auth.forget()
        return Response(status_code=204)

    return router
