"""The registry's pages in the web console, under /registry/console: models with their adapter versions
and lineage, prompts with their versions, labels and diffs, review rubrics with their versions, datasets
with a preview of their records.

The pages translate like the JSON door (api.py): they read through the same use cases and store
queries, take ids from the URL with the door's types, and change things through the same use cases
with the signed-in principal as the actor. What those refuse (a gate, a missing approval, an unknown
version) comes back as a refusal page with the status the JSON door would answer.
"""

from __future__ import annotations

import asyncio
import difflib
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, TypeAdapter, ValidationError

from contracts.events import DatasetRef, Stage
from contracts.http import PromptLabelMove, Role, StageTransition
from contracts.ids import DatasetName, ModelName, PromptLabel, PromptName, RubricName, VersionNumber
from services.registry import store
from services.registry.adapters import TRANSITIONS
from services.registry.changes import aware
from services.registry.service import Registry
from services.registry.store import Page
from services.runtime.console import Console, ConsoleRefused, ConsoleUser, checked
from services.runtime.errors import DomainError
from services.runtime.http import status_of

PREFIX = "/registry/console"
# A list page reads at most this many rows of a listing; it says so when there are more.
LISTING_CAP = 1000
PREVIEW_ROWS = 20
# A preview cell longer than this is cut: a page of twenty records stays a page.
PREVIEW_CHARS = 300

MODEL_NAME: TypeAdapter[str] = TypeAdapter(ModelName)
PROMPT_NAME: TypeAdapter[str] = TypeAdapter(PromptName)
RUBRIC_NAME: TypeAdapter[str] = TypeAdapter(RubricName)
DATASET_NAME: TypeAdapter[str] = TypeAdapter(DatasetName)
LABEL: TypeAdapter[str] = TypeAdapter(PromptLabel)
VERSION: TypeAdapter[int] = TypeAdapter(VersionNumber)
Body = TypeVar("Body", bound=BaseModel)


def create_console_router(registry: Registry, console: Console) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["console"], include_in_schema=False)
    templates = console.templates("services.registry")
    templates.filters["when"] = when

    async def call(user: ConsoleUser, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A use case run in a thread (blocking SQL); what it refuses becomes a refusal page."""
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except DomainError as error:
            raise ConsoleRefused(status_of(error), str(error), user) from None

    # ------------------------------------------------------------------------------- models
    @router.get("/models", response_class=HTMLResponse)
    async def models(request: Request, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        listing = await call(user, models_overview, registry)
        return console.page(request, templates, "models.html", user, title="Models", **listing)

    @router.get("/models/{name}", response_class=HTMLResponse)
    async def model(request: Request, name: str, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        name = checked(MODEL_NAME, name, f"no model named {name!r}", user)
        facts = await call(user, model_overview, registry, name)
        return console.page(request, templates, "model.html", user, title=f"Model {name}", **facts)

    @router.get("/models/{name}/versions/{version}", response_class=HTMLResponse)
    async def adapter(
        request: Request, name: str, version: str, user: ConsoleUser = Depends(console.viewer)
    ) -> HTMLResponse:
        name, number = checked_version(MODEL_NAME, name, version, "adapter version", user)
        facts = await call(user, adapter_overview, registry, name, number)
        return console.page(
            request, templates, "adapter.html", user, title=f"{name}:v{number}", may_change=may_change(user), **facts
        )

    @router.post("/models/{name}/versions/{version}/stage")
    async def move_stage(
        request: Request, name: str, version: str, user: ConsoleUser = Depends(console.viewer)
    ) -> RedirectResponse:
        fields = await console.form(request, user, Role.operator)
        name, number = checked_version(MODEL_NAME, name, version, "adapter version", user)
        move = parsed(StageTransition, fields, ("to_stage", "reason", "canary_percent", "replaces"), user)
        await call(
            user,
            registry.adapters.transition,
            user.principal.name,
            model_name=name,
            version=number,
            **move.model_dump(exclude={"approver"}),
        )
        return RedirectResponse(f"{PREFIX}/models/{quote(name, safe='')}/versions/{number}", status_code=303)

    # ------------------------------------------------------------------------------ prompts
    @router.get("/prompts", response_class=HTMLResponse)
    async def prompts(request: Request, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        listing = await call(user, prompts_overview, registry)
        return console.page(request, templates, "prompts.html", user, title="Prompts", **listing)

    @router.get("/prompts/{name}", response_class=HTMLResponse)
    async def prompt(request: Request, name: str, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        name = checked(PROMPT_NAME, name, f"no prompt named {name!r}", user)
        # `from` is a Python keyword, so the pair is read off the query string rather than as parameters.
        wanted: dict[str, int] = {}
        for side in ("from", "to"):
            value = request.query_params.get(side)
            if value:
                wanted[side] = checked(VERSION, value, f"no prompt version {name}:v{value}", user)
        facts = await call(user, prompt_overview, registry, name, wanted.get("from"), wanted.get("to"))
        return console.page(
            request, templates, "prompt.html", user, title=f"Prompt {name}", may_change=may_change(user), **facts
        )

    @router.post("/prompts/{name}/labels")
    async def move_label(request: Request, name: str, user: ConsoleUser = Depends(console.viewer)) -> RedirectResponse:
        fields = await console.form(request, user, Role.operator)
        name = checked(PROMPT_NAME, name, f"no prompt named {name!r}", user)
        try:
            label = LABEL.validate_python(fields.get("label", "").strip())
        except ValidationError:
            raise ConsoleRefused(
                422, "label: a label is letters, digits, '.', '_' or '-' (200 at most); nothing was changed", user
            ) from None
        move = parsed(PromptLabelMove, fields, ("version", "traffic_percent"), user)
        await call(
            user,
            registry.prompts.set_prompt_label,
            user.principal.name,
            name=name,
            label=label,
            version=move.version,
            traffic_percent=move.traffic_percent,
        )
        return RedirectResponse(f"{PREFIX}/prompts/{quote(name, safe='')}", status_code=303)

    # ------------------------------------------------------------------------------ rubrics
    @router.get("/rubrics", response_class=HTMLResponse)
    async def rubrics(request: Request, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        latest, truncated = await call(user, every, registry.rubrics.list_rubrics)
        return console.page(
            request,
            templates,
            "rubrics.html",
            user,
            title="Rubrics",
            rubrics=latest,
            truncated=truncated,
            cap=LISTING_CAP,
        )

    @router.get("/rubrics/{name}", response_class=HTMLResponse)
    async def rubric(request: Request, name: str, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        name = checked(RUBRIC_NAME, name, f"no rubric named {name!r}", user)
        facts = await call(user, rubric_overview, registry, name)
        return console.page(request, templates, "rubric.html", user, title=f"Rubric {name}", **facts)

    # ----------------------------------------------------------------------------- datasets
    @router.get("/datasets", response_class=HTMLResponse)
    async def datasets(request: Request, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        listing = await call(user, datasets_overview, registry)
        return console.page(request, templates, "datasets.html", user, title="Datasets", **listing)

    @router.get("/datasets/{name}/versions/{version}", response_class=HTMLResponse)
    async def dataset(
        request: Request, name: str, version: str, user: ConsoleUser = Depends(console.viewer)
    ) -> HTMLResponse:
        name, number = checked_version(DATASET_NAME, name, version, "dataset version", user)
        facts = await call(user, dataset_overview, registry, name, number)
        return console.page(request, templates, "dataset.html", user, title=f"Dataset {name}:v{number}", **facts)

    return router


# -------------------------------------------------------------------------------- the URL's ids


def checked_version(kind: TypeAdapter[str], name: str, version: str, what: str, user: ConsoleUser) -> tuple[str, int]:
    unknown = f"no {what} {name!r}:v{version!r}"
    return checked(kind, name, unknown, user), checked(VERSION, version, unknown, user)


def parsed(model: type[Body], fields: dict[str, str], names: tuple[str, ...], user: ConsoleUser) -> Body:
    """A form's fields as the JSON door's body model; an empty field is one left out."""
    try:
        return model.model_validate({name: value for name in names if (value := fields.get(name, "").strip())})
    except ValidationError as error:
        problem = next(iter(error.errors()), {})
        where = ".".join(str(part) for part in problem.get("loc", ())) or "form"
        raise ConsoleRefused(422, f"{where}: {problem.get('msg', 'invalid')}; nothing was changed", user) from None


def may_change(user: ConsoleUser) -> bool:
    """Whether a page shows its forms: the server checks every post anyway, this only spares a viewer forms it cannot use."""
    return user.csrf is not None and user.principal.may(Role.operator)


def when(moment: datetime | None) -> str:
    """A stored time as the console shows it, in UTC to the second."""
    return aware(moment).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


# ----------------------------------------------------------------------------- what pages show


def every(listing: Callable[..., Page], **filters: Any) -> tuple[list[Any], bool]:
    """The rows of a paged listing, at most LISTING_CAP of them, and whether there were more."""
    items: list[Any] = []
    cursor: str | None = None
    while True:
        page = listing(cursor=cursor, limit=500, **filters)
        items.extend(page.items)
        cursor = page.next_cursor
        if cursor is None or len(items) >= LISTING_CAP:
            return items[:LISTING_CAP], cursor is not None or len(items) > LISTING_CAP


def models_overview(registry: Registry) -> dict[str, Any]:
    models, more_models = every(registry.models.list_models)
    adapters, more_adapters = every(registry.adapters.list_adapters)
    versions: dict[str, list[Any]] = {model.name: [] for model in models}
    for adapter in adapters:
        versions.setdefault(adapter.model_name, []).append(adapter)
    return {"models": models, "versions": versions, "truncated": more_models or more_adapters, "cap": LISTING_CAP}


def traffic_split(adapters: list[Any]) -> list[dict[str, Any]]:
    """Who answers a model's production traffic: the full production version and the canary's share."""
    canary = next((a for a in adapters if a.stage == Stage.production and a.canary_percent is not None), None)
    full = next((a for a in adapters if a.stage == Stage.production and a.canary_percent is None), None)
    split = []
    if full is not None:
        split.append(
            {"version": full.version, "percent": 100 - (canary.canary_percent if canary else 0), "role": "production"}
        )
    if canary is not None:
        split.append({"version": canary.version, "percent": canary.canary_percent, "role": "canary"})
    return split


def model_overview(registry: Registry, name: str) -> dict[str, Any]:
    model = registry.models.get_model(name)
    adapters, truncated = every(registry.adapters.list_adapters, model_name=name)
    with registry.store.reading() as session:
        evaluations = {adapter.version: store.evaluations_of(session, name, adapter.version) for adapter in adapters}
    latest = {version: judged[-1] if judged else None for version, judged in evaluations.items()}
    return {
        "model": model,
        "adapters": adapters,
        "latest_evaluation": latest,
        "traffic": traffic_split(adapters),
        "truncated": truncated,
        "cap": LISTING_CAP,
    }


def adapter_overview(registry: Registry, name: str, version: int) -> dict[str, Any]:
    lineage = registry.adapters.lineage(name, version)
    siblings, _ = every(registry.adapters.list_adapters, model_name=name)
    with registry.store.reading() as session:
        # The stored records rather than the lineage's views: the page shows their metrics, which the views leave out.
        evaluations = store.evaluations_of(session, name, version)
    history, _ = every(registry.changes.entries, object_type="adapter", object_id=f"{name}:v{version}")
    current = lineage.adapter.stage
    holder = next(
        (
            a.version
            for a in siblings
            if a.stage == Stage.production and a.canary_percent is None and a.version != version
        ),
        None,
    )
    return {
        "lineage": lineage,
        "adapter": lineage.adapter,
        "evaluations": evaluations,
        "approvals": registry.approvals.list_approvals(object_type="adapter", name=name, version=version),
        "history": history,
        "traffic": traffic_split(siblings),
        # Production to production is a change of the canary's share; every other move goes somewhere else.
        "moves": sorted(stage.value for stage in TRANSITIONS[current] if stage != current or stage == Stage.production),
        "holder": holder,
    }


def prompts_overview(registry: Registry) -> dict[str, Any]:
    versions, truncated = every(registry.prompts.list_prompts)
    by_name: dict[str, list[Any]] = {}
    for prompt in versions:
        by_name.setdefault(prompt.name, []).append(prompt)
    with registry.store.reading() as session:
        labels = {
            name: {prompt.version: sorted(store.labels_of(session, name, prompt.version)) for prompt in prompts}
            for name, prompts in by_name.items()
        }
    return {"prompts": by_name, "labels": labels, "truncated": truncated, "cap": LISTING_CAP}


def prompt_overview(registry: Registry, name: str, old: int | None, new: int | None) -> dict[str, Any]:
    registry.prompts.get_prompt(name)  # an unknown prompt is a NotFound before anything else is read
    versions, truncated = every(registry.prompts.list_prompts, name=name)
    with registry.store.reading() as session:
        labels = {prompt.version: sorted(store.labels_of(session, name, prompt.version)) for prompt in versions}
        traffic = {prompt.version: store.label_traffic(session, name, prompt.version) for prompt in versions}
    by_version = {prompt.version: prompt for prompt in versions}
    latest = max(by_version)
    new = latest if new is None else new
    old = max((v for v in by_version if v < new), default=new) if old is None else old
    for wanted in (old, new):
        if wanted not in by_version:  # past the listing's cap, or not a version: the latter is a NotFound
            by_version[wanted] = registry.prompts.get_prompt(name, version=wanted)
    pointers = sorted(
        (label, version, traffic[version].get(label)) for version, pointing in labels.items() for label in pointing
    )
    return {
        "name": name,
        "versions": versions,
        "labels": labels,
        "pointers": pointers,
        "old": old,
        "new": new,
        "diff": unified_diff(by_version[old].template, by_version[new].template, f"{name}:v{old}", f"{name}:v{new}"),
        "truncated": truncated,
        "cap": LISTING_CAP,
    }


def unified_diff(before: str, after: str, before_name: str, after_name: str) -> list[dict[str, str]]:
    """The lines of a unified diff, each with the class the layout colours it by."""
    lines = difflib.unified_diff(
        before.splitlines(), after.splitlines(), fromfile=before_name, tofile=after_name, lineterm=""
    )
    return [{"kind": line_kind(line), "text": line} for line in lines]


def line_kind(line: str) -> str:
    if line.startswith(("---", "+++", "@@")):
        return "hunk"
    if line.startswith("+"):
        return "added"
    if line.startswith("-"):
        return "removed"
    return "context"


def rubric_overview(registry: Registry, name: str) -> dict[str, Any]:
    registry.rubrics.get_rubric(name)  # an unknown rubric is a NotFound before anything else is read
    versions, truncated = every(registry.rubrics.list_versions, name=name)
    return {"name": name, "versions": versions, "truncated": truncated, "cap": LISTING_CAP}


def datasets_overview(registry: Registry) -> dict[str, Any]:
    versions, truncated = every(registry.datasets.list_datasets)
    by_name: dict[str, list[Any]] = {}
    for dataset in versions:
        by_name.setdefault(dataset.name, []).append(dataset)
    return {"datasets": by_name, "truncated": truncated, "cap": LISTING_CAP}


def dataset_overview(registry: Registry, name: str, version: int) -> dict[str, Any]:
    dataset = registry.datasets.get_dataset(name, version)
    trained, _ = every(registry.adapters.list_adapters, dataset=DatasetRef(name=name, version=version))
    try:
        records, unreadable = registry.datasets.dataset_rows(name, version, limit=PREVIEW_ROWS), None
    except DomainError as error:  # the metadata is still worth showing when the records cannot be read
        records, unreadable = [], str(error)
    return {
        "dataset": dataset,
        "preview": [record_fields(record) for record in records],
        "preview_rows": PREVIEW_ROWS,
        "unreadable": unreadable,
        "trained": trained,
    }


def record_fields(record: Any) -> list[tuple[str, str]]:
    """One record as (field, text) pairs: a chat record message by message, any other field by field."""
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        pairs = [
            (str(message.get("role", "?")), cell(message.get("content")))
            for message in record["messages"]
            if isinstance(message, dict)
        ]
        return pairs + [(str(key), cell(value)) for key, value in record.items() if key != "messages"]
    if isinstance(record, dict):
        return [(str(key), cell(value)) for key, value in record.items()]
    return [("record", cell(record))]


def cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + f"… ({len(text)} characters)"
