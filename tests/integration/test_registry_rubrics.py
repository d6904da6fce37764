"""Review rubrics in the registry, through its real door on SQLite and PostgreSQL, through the runtime's
registry client and through the CLI: each publication of a name is its next immutable version, the latest
and any version by number read back as published, every publication is audited, an unknown rubric is a
404 naming it, a malformed one a 422 naming its field, and the door's roles decide who reads and who publishes.
A registry database from before rubrics (migration 0005) upgrades in place."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from contracts.http import Role, RubricCreate, RubricDimension, RubricScale, RubricVersionView
from services.registry import store as store_module
from services.registry.api import create_router
from services.registry.service import Registry
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.auth import Authenticator, KeyStore
from services.runtime.http import create_http_app
from services.runtime.registry_client import RegistryClient, RegistryError, RegistrySyncClient
from tests.integration.registry_support import (
    database_url,  # noqa: F401 - a fixture
    registry,  # noqa: F401 - a fixture
)
from tests.integration.test_cli_errors import assert_one_error_line
from tests.integration.test_registry_cli import flywheel, json_lines, ok, open_registry
from tests.support import served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

RUBRIC = "answer-quality"
ROOT = "/registry/v1/rubrics"
FIRST: dict[str, Any] = {
    "name": RUBRIC,
    "instructions": "Read the question and the answer; judge the answer only.",
    "dimensions": [
        {"name": "correct", "description": "Is the answer right?", "scale": "thumbs"},
        {"name": "helpful", "description": "How much does it help?", "scale": "rating"},
    ],
}
SECOND: dict[str, Any] = {
    **FIRST,
    "dimensions": [
        *FIRST["dimensions"],
        {"name": "tone", "description": "How does it sound?", "scale": "label", "labels": ["warm", "neutral", "curt"]},
    ],
}


@dataclass
class Door:
    app: FastAPI
    http: httpx.AsyncClient  # presents an operator's key
    keys: dict[Role, str]

    def as_(self, role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@pytest.fixture
async def door(registry: Registry) -> AsyncIterator[Door]:
    # A pepper of the test's own: on PostgreSQL there is no development pepper beside the database.
    keys = KeyStore(registry.store.engine, pepper=b"rubrics-test-pepper-0123456789abcdef")
    made = {
        role: keys.create(principal=principal, role=role, created_by="test")[0]
        for role, principal in ((Role.operator, "olga"), (Role.viewer, "vic"), (Role.app, "gateway"))
    }
    app = create_http_app("registry-rubrics", routers=[create_router(registry, Authenticator(keys))])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://registry",
        headers={"Authorization": f"Bearer {made[Role.operator]}"},
    ) as client:
        yield Door(app, client, made)


def audit(registry: Registry) -> list[tuple[str, str, str, str, list[str]]]:
    entries = registry.changes.entries(object_type="rubric", limit=500).items
    return [
        (entry.actor, entry.action, entry.object_id, entry.outcome, [d["name"] for d in (entry.after or {}).get("dimensions", [])])
        for entry in entries
    ]  # fmt: skip


async def test_publish_two_versions_then_read_the_latest_a_version_and_the_list(door: Door, registry: Registry) -> None:
    first = await door.http.post(ROOT, json=FIRST)
    assert first.status_code == 201, first.text
    assert {key: first.json()[key] for key in ("name", "version", "instructions", "created_by")} == {
        "name": RUBRIC,
        "version": 1,
        "instructions": FIRST["instructions"],
        "created_by": "olga",
    }
    second = await door.http.post(ROOT, json=SECOND)
    assert second.status_code == 201 and second.json()["version"] == 2, second.text
    other = await door.http.post(ROOT, json={"name": "tone-only", "dimensions": [SECOND["dimensions"][2]]})
    assert (other.status_code, other.json()["version"], other.json()["instructions"]) == (201, 1, ""), other.text

    latest = RubricVersionView.model_validate((await door.http.get(f"{ROOT}/{RUBRIC}")).json())
    assert latest.version == 2 and [d.name for d in latest.dimensions] == ["correct", "helpful", "tone"]
    assert latest.dimensions[2] == RubricDimension(
        name="tone", description="How does it sound?", scale=RubricScale.label, labels=["warm", "neutral", "curt"]
    )
    one = (await door.http.get(f"{ROOT}/{RUBRIC}/versions/1")).json()
    assert (one["version"], one["dimensions"]) == (1, [{**d, "labels": []} for d in FIRST["dimensions"]])
    # Read back as published, the time included: in UTC whichever database stored it (SQLite reads it back naive).
    assert one["created_at"] == first.json()["created_at"] and one["created_at"].endswith("Z")

    listed = (await door.http.get(ROOT)).json()
    assert [(item["name"], item["version"]) for item in listed["items"]] == [(RUBRIC, 2), ("tone-only", 1)]
    assert listed["next_cursor"] is None
    paged = (await door.http.get(ROOT, params={"limit": 1})).json()
    rest = (await door.http.get(ROOT, params={"limit": 1, "cursor": paged["next_cursor"]})).json()
    assert [item["name"] for item in paged["items"] + rest["items"]] == [RUBRIC, "tone-only"]
    assert rest["next_cursor"] is None

    assert audit(registry) == [
        ("olga", "rubric.publish", f"{RUBRIC}:v1", "ok", ["correct", "helpful"]),
        ("olga", "rubric.publish", f"{RUBRIC}:v2", "ok", ["correct", "helpful", "tone"]),
        ("olga", "rubric.publish", "tone-only:v1", "ok", ["tone"]),
    ]


async def test_an_unknown_rubric_or_version_is_a_404_naming_it(door: Door) -> None:
    unknown = await door.http.get(f"{ROOT}/no-such-rubric")
    assert unknown.status_code == 404, unknown.text
    error = unknown.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("rubric_not_found", "name", "not_found_error")
    assert "no-such-rubric" in error["message"]
    assert (await door.http.post(ROOT, json=FIRST)).status_code == 201
    missing = await door.http.get(f"{ROOT}/{RUBRIC}/versions/9")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "rubric_not_found", missing.text
    assert f"{RUBRIC}:v9" in missing.json()["error"]["message"]
    assert (await door.http.get(f"{ROOT}/no-such-rubric/versions/1")).status_code == 404


async def test_a_malformed_rubric_is_a_422_naming_its_field_and_nothing_is_stored(
    door: Door, registry: Registry
) -> None:
    one_label = {
        **FIRST,
        "dimensions": [{"name": "tone", "description": "Tone?", "scale": "label", "labels": ["warm"]}],
    }
    refused = await door.http.post(ROOT, json=one_label)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["param"] == "dimensions.0" and "dimension 'tone'" in error["message"], error
    assert "2 to 12 distinct labels" in error["message"]

    twice = {**FIRST, "dimensions": [FIRST["dimensions"][0], FIRST["dimensions"][0]]}
    assert "dimension names must be distinct" in (await door.http.post(ROOT, json=twice)).json()["error"]["message"]
    labelled_thumbs = {**FIRST, "dimensions": [{**FIRST["dimensions"][0], "labels": ["yes", "no"]}]}
    assert (await door.http.post(ROOT, json=labelled_thumbs)).json()["error"]["param"] == "dimensions.0"
    for hostile in ("../etc", "-rf", "a b", "x" * 201):
        answer = await door.http.post(ROOT, json={**FIRST, "name": hostile})
        assert (answer.status_code, answer.json()["error"]["param"]) == (422, "name"), hostile
    assert (await door.http.post(ROOT, json={**FIRST, "dimensions": []})).json()["error"]["param"] == "dimensions"
    typo = await door.http.post(ROOT, json={**FIRST, "instruction": "one letter short"})
    assert (typo.status_code, typo.json()["error"]["param"]) == (422, "instruction")
    assert (await door.http.get(f"{ROOT}/-rf")).status_code == 422
    assert (await door.http.get(f"{ROOT}/{RUBRIC}/versions/0")).status_code == 422

    assert registry.rubrics.list_rubrics().items == [] and audit(registry) == []


async def test_viewers_read_operators_publish_and_apps_do_neither(door: Door) -> None:
    assert (await door.http.post(ROOT, json=FIRST)).status_code == 201
    viewer = door.as_(Role.viewer)
    for path in (ROOT, f"{ROOT}/{RUBRIC}", f"{ROOT}/{RUBRIC}/versions/1"):
        assert (await door.http.get(path, headers=viewer)).status_code == 200, path
    by_viewer = await door.http.post(ROOT, json=SECOND, headers=viewer)
    assert by_viewer.status_code == 403 and by_viewer.json()["error"]["type"] == "permission_error", by_viewer.text

    app = door.as_(Role.app)
    for path in (ROOT, f"{ROOT}/{RUBRIC}", f"{ROOT}/{RUBRIC}/versions/1"):
        assert (await door.http.get(path, headers=app)).status_code == 403, path
    assert (await door.http.post(ROOT, json=SECOND, headers=app)).status_code == 403
    anonymous = await door.http.get(f"{ROOT}/{RUBRIC}", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    assert (await door.http.get(f"{ROOT}/{RUBRIC}")).json()["version"] == 1  # the refused publications stored nothing


async def test_the_runtime_clients_read_and_publish_rubrics_as_the_contracts_models(door: Door) -> None:
    operator, viewer = door.keys[Role.operator], door.keys[Role.viewer]
    client = RegistryClient("http://registry", viewer, transport=httpx.ASGITransport(app=door.app))
    async with served(door.app, lifespan="off") as url:
        # A command has no event loop; here the server shares this test's loop, so the sync calls run in a thread.
        published = await asyncio.to_thread(
            RegistrySyncClient(url, operator).publish_rubric, RubricCreate.model_validate(FIRST)
        )
        assert isinstance(published, RubricVersionView) and (published.name, published.version) == (RUBRIC, 1)
        await asyncio.to_thread(RegistrySyncClient(url, operator).publish_rubric, RubricCreate.model_validate(SECOND))
        synced = await asyncio.to_thread(RegistrySyncClient(url, viewer).rubric, RUBRIC, 1)
        with pytest.raises(RegistryError) as refused:
            await asyncio.to_thread(RegistrySyncClient(url, viewer).publish_rubric, RubricCreate.model_validate(SECOND))
    assert refused.value.status == 403 and refused.value.refused
    assert synced == await client.rubric(RUBRIC, version=1) and synced.version == 1
    latest = await client.rubric(RUBRIC)
    assert latest.version == 2 and latest.dimensions[2].labels == ["warm", "neutral", "curt"]
    with pytest.raises(RegistryError) as unknown:
        await client.rubric("no-such-rubric")
    assert (unknown.value.status, unknown.value.code) == (404, "rubric_not_found")
    assert "no rubric named 'no-such-rubric'" in str(unknown.value)


# ------------------------------------------------------------------------------------ upgrade


@pytest.fixture
def before_rubrics(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RegistryStore]:  # noqa: F811
    """A registry database migrated as the release before rubrics left it (up to 0005), with a prompt in it."""
    everything = store_module._migrations
    monkeypatch.setattr(store_module, "_migrations", lambda: [m for m in everything() if m[0] <= 5])
    store = RegistryStore(database_url)
    assert store.migrate()[-1] == "m0005_guard_policies"
    monkeypatch.setattr(store_module, "_migrations", everything)
    yield store
    store.close()


def test_a_registry_from_before_rubrics_upgrades_in_place(before_rubrics: RegistryStore, tmp_path: Path) -> None:
    registry = Registry(before_rubrics, ArtifactStore(tmp_path / "artifacts"))
    registry.prompts.publish_prompt("alice", name="greeting", template="Hello {{ name }}")
    # Rubrics first; the migrations that came after them follow in the same upgrade.
    assert before_rubrics.migrate()[0] == "m0006_rubrics"
    assert registry.prompts.get_prompt("greeting").template == "Hello {{ name }}"
    body = RubricCreate.model_validate(FIRST)
    published = registry.rubrics.publish_rubric(
        "alice", name=body.name, instructions=body.instructions, dimensions=body.dimensions
    )
    assert (published.version, registry.rubrics.get_rubric(RUBRIC).dimensions) == (1, body.dimensions)


# ---------------------------------------------------------------------------------------- CLI


def test_publish_a_yaml_rubric_show_and_list_it_from_the_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    rubric = tmp_path / "answer-quality.yaml"
    rubric.write_text(
        f"name: {RUBRIC}\n"
        "instructions: |\n  Read the question and the answer; judge the answer only.\n"
        "dimensions:\n"
        "  - name: correct\n    description: Is the answer right?\n    scale: thumbs\n"
        "  - name: tone\n    description: How does it sound?\n    scale: label\n    labels: [warm, neutral, curt]\n"
    )
    assert ok(home, "rubric", "publish", rubric).strip() == f"{RUBRIC}:v1 (dimensions: correct (thumbs), tone (label))"
    as_json = tmp_path / "v2.json"
    as_json.write_text(json.dumps(SECOND))
    assert ok(home, "rubric", "publish", as_json).strip().startswith(f"{RUBRIC}:v2 (dimensions: correct (thumbs), ")

    shown = json.loads(ok(home, "rubric", "show", RUBRIC, "--version", "1"))
    assert (shown["version"], shown["instructions"], [d["labels"] for d in shown["dimensions"]]) == (
        1,
        "Read the question and the answer; judge the answer only.\n",
        [[], ["warm", "neutral", "curt"]],
    )
    assert json.loads(ok(home, "rubric", "show", RUBRIC))["version"] == 2
    assert [(item["name"], item["version"]) for item in json_lines(ok(home, "rubric", "list"))] == [(RUBRIC, 2)]

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"name: {RUBRIC}\ndimensions:\n  - {{name: tone, description: The tone, scale: label, labels: [warm]}}\n"
    )
    assert_one_error_line(flywheel(home, "rubric", "publish", bad), "dimensions.0", "dimension 'tone'")
    bad.write_text("name: [unclosed\n")
    assert_one_error_line(flywheel(home, "rubric", "publish", bad), "not YAML: line 2, column 1")
    bad.write_text("- just a list\n")
    assert_one_error_line(flywheel(home, "rubric", "publish", bad), "a rubric is a mapping")
    assert_one_error_line(flywheel(home, "rubric", "publish", tmp_path / "nope.yaml"), "nope.yaml: no such file")
    assert_one_error_line(
        flywheel(home, "rubric", "show", RUBRIC, "--version", "9"),
        f"no rubric version {RUBRIC}:v9",
        "404 rubric_not_found",
    )
    assert_one_error_line(flywheel(home, "rubric", "show", "nope"), "no rubric named 'nope'", "404 rubric_not_found")

    registry = open_registry(home)
    try:
        entries = registry.changes.entries(object_type="rubric", limit=500).items
        assert [(entry.actor, entry.object_id, entry.outcome) for entry in entries] == [
            ("cli:tester", f"{RUBRIC}:v1", "ok"),
            ("cli:tester", f"{RUBRIC}:v2", "ok"),
        ]
    finally:
        registry.store.close()
