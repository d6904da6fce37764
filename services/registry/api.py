"""The registry's HTTP door under /registry/v1: translates requests, calls the service, translates back.

Reads need the viewer role, changes the operator role, approvals the approver role, key management
admin; any valid key may ask who it is (`GET /keys/self`, how other services check keys). A change
refused by a rule (a conflict, a failed gate) lands in the audit log; a refusal of the caller
(unauthenticated, under-privileged, or a body refused before it was read) writes nothing.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response

from contracts.events import DatasetRef, Stage
from contracts.ids import DatasetName, GuardPolicyName, ModelName, PromptLabel, PromptName, RubricName
from contracts.http import (
    AdapterVersionCreate,
    AdapterVersionView,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyIdentity,
    ApiKeyRotate,
    ApiKeyView,
    ApprovalCreate,
    ApprovalView,
    AuditEntryView,
    BaseModelCreate,
    BaseModelView,
    DatasetCreate,
    DatasetVersionView,
    GuardPolicyActivate,
    GuardPolicyCreate,
    GuardPolicyView,
    LineageView,
    Page,
    PromptCreate,
    PromptLabelMove,
    PromptRendered,
    PromptRenderRequest,
    PromptVersionView,
    Role,
    RubricCreate,
    RubricVersionView,
    StageTransition,
)
from services.registry.service import Registry
from services.runtime.auth import Authenticator, Principal
from services.runtime.http import refusal_route

# SQLite and PostgreSQL store versions and offsets as signed 64-bit integers: a larger number is refused
# at the door (422) instead of overflowing in the driver (500).
LARGEST_STORED_INT = 2**63 - 1
Version = Annotated[int, Path(ge=1, le=LARGEST_STORED_INT, description="Version number.")]

# Every body but a dataset upload is small; none is read whole into memory past its cap.
MAX_BODY_BYTES = 1024 * 1024


def dataset_body_limit(max_dataset_bytes: int) -> int:
    """The largest upload body read: the JSONL travels as a JSON string, whose escaping can triple it
    (\\uXXXX for a 2-byte character); the exact dataset limit is then checked on the decoded records."""
    return 3 * max_dataset_bytes + 64 * 1024


def create_router(registry: Registry, auth: Authenticator) -> APIRouter:
    # Bodies are capped as they stream in (FastAPI reads a body whole before the handler runs).
    body_limits = {"/registry/v1/datasets": dataset_body_limit(registry.datasets.max_dataset_bytes)}
    router = APIRouter(
        prefix="/registry/v1",
        tags=["registry"],
        route_class=refusal_route(max_body_bytes=MAX_BODY_BYTES, body_limits=body_limits),
    )
    reader = auth.require(Role.viewer)
    writer = auth.require(Role.operator)
    approver = auth.require(Role.approver)
    admin = auth.require(Role.admin)
    holder = auth.any_key()
    # Use cases run in a thread (blocking SQL); what they refuse (a DomainError) the app answers.
    call = asyncio.to_thread

    def page(result: Any) -> dict:
        return {"items": result.items, "next_cursor": result.next_cursor}

    # ----------------------------------------------------------------------------- models
    @router.get("/models", response_model=Page[BaseModelView])
    async def list_models(
        cursor: str | None = None, limit: int = Query(50, ge=1, le=500), _: Principal = Depends(reader)
    ) -> dict:
        return page(await call(registry.models.list_models, cursor=cursor, limit=limit))

    @router.get("/models/{name}", response_model=BaseModelView)
    async def get_model(name: ModelName, _: Principal = Depends(reader)) -> Any:
        return await call(registry.models.get_model, name)

    @router.post("/models", response_model=BaseModelView, status_code=201)
    async def create_model(body: BaseModelCreate, who: Principal = Depends(writer)) -> Any:
        return await call(registry.models.register_base_model, who.name, **body.model_dump())

    # --------------------------------------------------------------------------- adapters
    @router.get("/adapters", response_model=Page[AdapterVersionView])
    async def list_adapters(
        model_name: str | None = None,
        stage: Stage | None = None,
        dataset_name: DatasetName | None = None,
        dataset_version: int | None = Query(None, ge=1, le=LARGEST_STORED_INT),
        cursor: str | None = None,
        limit: int = Query(50, ge=1, le=500),
        _: Principal = Depends(reader),
    ) -> dict:
        dataset = DatasetRef(name=dataset_name, version=dataset_version) if dataset_name and dataset_version else None
        return page(
            await call(
                registry.adapters.list_adapters,
                model_name=model_name,
                stage=stage,
                dataset=dataset,
                cursor=cursor,
                limit=limit,
            )
        )

    @router.post("/adapters", response_model=AdapterVersionView, status_code=201)
    async def create_adapter(body: AdapterVersionCreate, who: Principal = Depends(writer)) -> Any:
        return await call(
            registry.adapters.register_adapter,
            who.name,
            **body.model_dump(exclude={"dataset", "hyperparameters"}),
            dataset=body.dataset,
            hyperparameters=body.hyperparameters,
        )

    @router.get("/adapters/{model_name}/versions/{version}", response_model=AdapterVersionView)
    async def get_adapter(model_name: ModelName, version: Version, _: Principal = Depends(reader)) -> Any:
        return await call(registry.adapters.get_adapter, model_name, version)

    @router.get("/adapters/{model_name}/versions/{version}/lineage", response_model=LineageView)
    async def lineage(model_name: ModelName, version: Version, _: Principal = Depends(reader)) -> Any:
        return await call(registry.adapters.lineage, model_name, version)

    @router.post("/adapters/{model_name}/versions/{version}/transitions", response_model=AdapterVersionView)
    async def transition(
        model_name: ModelName, version: Version, body: StageTransition, who: Principal = Depends(writer)
    ) -> Any:
        return await call(
            registry.adapters.transition,
            who.name,
            model_name=model_name,
            version=version,
            **body.model_dump(exclude={"approver"}),
        )

    @router.post("/adapters/{model_name}/versions/{version}/approvals", response_model=ApprovalView, status_code=201)
    async def approve_adapter(
        model_name: ModelName, version: Version, body: ApprovalCreate, who: Principal = Depends(approver)
    ) -> Any:
        return await call(
            registry.approvals.approve,
            who.name,
            who.role,
            object_type="adapter",
            name=model_name,
            version=version,
            target=body.target,
            comment=body.comment,
        )

    @router.get("/adapters/{model_name}/versions/{version}/approvals", response_model=list[ApprovalView])
    async def adapter_approvals(model_name: ModelName, version: Version, _: Principal = Depends(reader)) -> Any:
        return await call(registry.approvals.list_approvals, object_type="adapter", name=model_name, version=version)

    # ---------------------------------------------------------------------------- prompts
    @router.get("/prompts", response_model=Page[PromptVersionView])
    async def list_prompts(
        name: str | None = None,
        cursor: str | None = None,
        limit: int = Query(50, ge=1, le=500),
        _: Principal = Depends(reader),
    ) -> dict:
        return page(await call(registry.prompts.list_prompts, name=name, cursor=cursor, limit=limit))

    @router.post("/prompts", response_model=PromptVersionView, status_code=201)
    async def create_prompt(body: PromptCreate, who: Principal = Depends(writer)) -> Any:
        return await call(registry.prompts.publish_prompt, who.name, **body.model_dump())

    @router.get("/prompts/{name}", response_model=PromptVersionView)
    async def get_prompt(
        name: PromptName,
        version: int | None = Query(None, ge=1, le=LARGEST_STORED_INT),
        label: str | None = None,
        _: Principal = Depends(reader),
    ) -> Any:
        return await call(registry.prompts.get_prompt, name, version=version, label=label)

    @router.put("/prompts/{name}/labels/{label}", response_model=PromptVersionView)
    async def move_label(
        name: PromptName, label: PromptLabel, body: PromptLabelMove, who: Principal = Depends(writer)
    ) -> Any:
        return await call(
            registry.prompts.set_prompt_label,
            who.name,
            name=name,
            label=label,
            version=body.version,
            traffic_percent=body.traffic_percent,
        )

    @router.post("/prompts/{name}/versions/{version}/approvals", response_model=ApprovalView, status_code=201)
    async def approve_prompt(
        name: PromptName, version: Version, body: ApprovalCreate, who: Principal = Depends(approver)
    ) -> Any:
        return await call(
            registry.approvals.approve,
            who.name,
            who.role,
            object_type="prompt",
            name=name,
            version=version,
            target=body.target,
            comment=body.comment,
        )

    @router.get("/prompts/{name}/versions/{version}/approvals", response_model=list[ApprovalView])
    async def prompt_approvals(name: PromptName, version: Version, _: Principal = Depends(reader)) -> Any:
        return await call(registry.approvals.list_approvals, object_type="prompt", name=name, version=version)

    @router.post("/prompts/{name}/render", response_model=PromptRendered)
    async def render(name: PromptName, body: PromptRenderRequest, _: Principal = Depends(reader)) -> PromptRendered:
        prompt = await call(registry.prompts.get_prompt, name, version=body.version, label=body.label)
        text = await call(registry.prompts.render_prompt, name, body.variables, version=prompt.version)
        return PromptRendered(name=name, version=prompt.version, text=text)

    # --------------------------------------------------------------------- guard policies
    @router.get("/guard-policies", response_model=Page[GuardPolicyView])
    async def list_guard_policies(
        name: str | None = None,
        cursor: str | None = None,
        limit: int = Query(50, ge=1, le=500),
        _: Principal = Depends(reader),
    ) -> dict:
        return page(await call(registry.guard_policies.list_policies, name=name, cursor=cursor, limit=limit))

    @router.post("/guard-policies", response_model=GuardPolicyView, status_code=201)
    async def create_guard_policy(body: GuardPolicyCreate, who: Principal = Depends(writer)) -> Any:
        return await call(
            registry.guard_policies.publish_policy,
            who.name,
            name=body.name,
            model_name=body.model_name,
            spec=body.spec,
            route=body.route,
            prompt_name=body.prompt_name,
            activate=body.activate,
        )

    @router.get("/guard-policies/{name}", response_model=GuardPolicyView)
    async def get_guard_policy(
        name: GuardPolicyName,
        version: int | None = Query(None, ge=1, le=LARGEST_STORED_INT),
        _: Principal = Depends(reader),
    ) -> Any:
        return await call(registry.guard_policies.get_policy, name, version=version)

    @router.put("/guard-policies/{name}/active", response_model=GuardPolicyView)
    async def activate_guard_policy(
        name: GuardPolicyName, body: GuardPolicyActivate, who: Principal = Depends(writer)
    ) -> Any:
        return await call(registry.guard_policies.activate_policy, who.name, name=name, version=body.version)

    # ---------------------------------------------------------------------------- rubrics
    @router.get("/rubrics", response_model=Page[RubricVersionView])
    async def list_rubrics(
        cursor: str | None = None, limit: int = Query(50, ge=1, le=500), _: Principal = Depends(reader)
    ) -> dict:
        """The latest version of every rubric (a version by number: GET /rubrics/{name}/versions/{version})."""
        return page(await call(registry.rubrics.list_rubrics, cursor=cursor, limit=limit))

    @router.post("/rubrics", response_model=RubricVersionView, status_code=201)
    async def create_rubric(body: RubricCreate, who: Principal = Depends(writer)) -> Any:
        return await call(
            registry.rubrics.publish_rubric,
            who.name,
            name=body.name,
            instructions=body.instructions,
            dimensions=body.dimensions,
        )

    @router.get("/rubrics/{name}", response_model=RubricVersionView)
    async def get_rubric(name: RubricName, _: Principal = Depends(reader)) -> Any:
        return await call(registry.rubrics.get_rubric, name)

    @router.get("/rubrics/{name}/versions/{version}", response_model=RubricVersionView)
    async def get_rubric_version(name: RubricName, version: Version, _: Principal = Depends(reader)) -> Any:
        return await call(registry.rubrics.get_rubric, name, version=version)

    # --------------------------------------------------------------------------- datasets
    @router.get("/datasets", response_model=Page[DatasetVersionView])
    async def list_datasets(
        name: str | None = None,
        cursor: str | None = None,
        limit: int = Query(50, ge=1, le=500),
        _: Principal = Depends(reader),
    ) -> dict:
        return page(await call(registry.datasets.list_datasets, name=name, cursor=cursor, limit=limit))

    @router.post("/datasets", response_model=DatasetVersionView, status_code=201)
    async def create_dataset(body: DatasetCreate, who: Principal = Depends(writer)) -> Any:
        return await call(
            registry.datasets.publish_dataset,
            who.name,
            name=body.name,
            split=body.split,
            jsonl=body.jsonl.encode(),
            provenance=body.provenance,
            model_name=body.model_name,
        )

    @router.get("/datasets/{name}/versions/{version}", response_model=DatasetVersionView)
    async def get_dataset(name: DatasetName, version: Version, _: Principal = Depends(reader)) -> Any:
        return await call(registry.datasets.get_dataset, name, version)

    @router.get("/datasets/{name}/versions/{version}/rows")
    async def dataset_rows(
        name: DatasetName,
        version: Version,
        offset: int = Query(0, ge=0, le=LARGEST_STORED_INT),
        limit: int = Query(100, ge=1, le=10_000),
        _: Principal = Depends(reader),
    ) -> list[dict]:
        return await call(registry.datasets.dataset_rows, name, version, offset=offset, limit=limit)

    # ------------------------------------------------------------------------------ audit
    @router.get("/audit", response_model=Page[AuditEntryView])
    async def audit(
        object_type: str | None = None,
        object_id: str | None = None,
        actor: str | None = None,
        cursor: str | None = None,
        limit: int = Query(100, ge=1, le=500),
        _: Principal = Depends(reader),
    ) -> dict:
        return page(
            await call(
                registry.changes.entries,
                object_type=object_type,
                object_id=object_id,
                actor=actor,
                cursor=cursor,
                limit=limit,
            )
        )

    # ------------------------------------------------------------------------------- keys
    @router.get("/keys/self", response_model=ApiKeyIdentity)
    async def key_identity(who: Principal = Depends(holder)) -> ApiKeyIdentity:
        """Who the presented key belongs to: how the other services check a key (the key asks for itself)."""
        return ApiKeyIdentity(key_id=who.key_id, principal=who.name, role=who.role, expires_at=who.expires_at)

    @router.get("/keys", response_model=list[ApiKeyView])
    async def list_keys(
        principal: str | None = None,
        cursor: str | None = None,
        limit: int = Query(100, ge=1, le=500),
        _: Principal = Depends(admin),
    ) -> Any:
        return await call(registry.keys.list_api_keys, principal=principal, cursor=cursor, limit=limit)

    @router.post("/keys", response_model=ApiKeyCreated, status_code=201)
    async def create_key(body: ApiKeyCreate, who: Principal = Depends(admin)) -> ApiKeyCreated:
        key, row = await call(
            registry.keys.create_api_key, who.name, principal=body.principal, role=body.role, ttl_s=body.ttl_s
        )
        return ApiKeyCreated(
            key=key, key_id=row.key_id, principal=row.principal, role=Role(row.role), expires_at=row.expires_at
        )

    @router.post("/keys/{key_id}/rotate", response_model=ApiKeyCreated, status_code=201)
    async def rotate_key(key_id: str, body: ApiKeyRotate, who: Principal = Depends(admin)) -> ApiKeyCreated:
        key, row = await call(registry.keys.rotate_api_key, who.name, key_id, grace_s=body.grace_s, ttl_s=body.ttl_s)
        auth.forget()
        return ApiKeyCreated(
            key=key, key_id=row.key_id, principal=row.principal, role=Role(row.role), expires_at=row.expires_at
        )

    @router.delete("/keys/{key_id}", status_code=204)
    async def revoke_key(key_id: str, who: Principal = Depends(admin)) -> Response:
        await call(registry.keys.revoke_api_key, who.name, key_id)
        auth.forget()
        return Response(status_code=204)

    return router
