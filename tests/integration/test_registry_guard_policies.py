"""Guard policies in the registry, through its real door on SQLite and PostgreSQL and through the CLI:
immutable versions, activation and rollback announced as `guard_policy.activated` in the outbox, every
change audited, and the rules that keep a model to one policy refused without changing anything."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from contracts.events import GuardAction, GuardPolicySpec
from contracts.http import Role
from services.registry.api import create_router
from services.registry.models import GuardPolicyVersion, OutboxEvent
from services.registry.service import Registry
from services.runtime.auth import Authenticator, KeyStore
from services.runtime.http import create_http_app
from tests.integration.registry_support import (
    database_url,  # noqa: F401 - a fixture
    registry,  # noqa: F401 - a fixture
)
from tests.integration.test_cli_errors import assert_one_error_line
from tests.integration.test_registry_cli import flywheel, json_lines, ok, open_registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POLICY = "support-guard"
MODEL = "smol"
PATH = f"/registry/v1/guard-policies/{POLICY}"
STRICT = GuardPolicySpec(input_injection=GuardAction.block, input_secrets=GuardAction.redact)
STRICTER = GuardPolicySpec(
    input_injection=GuardAction.block,
    input_secrets=GuardAction.block,
    output_personal=GuardAction.redact,
    cache_semantic_threshold=0.9,
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


class Door:
    def __init__(self, client: httpx.AsyncClient, viewer: dict[str, str]) -> None:
        self.http = client
        self.viewer = viewer  # headers of a viewer's key; the client's own key is an operator's

    async def publish(self, spec: GuardPolicySpec | dict[str, str], **fields: object) -> httpx.Response:
        body = {"name": POLICY, "model_name": MODEL, **fields}
        body["spec"] = spec.model_dump(mode="json") if isinstance(spec, GuardPolicySpec) else spec
        return await self.http.post("/registry/v1/guard-policies", json=body)


@pytest.fixture
async def door(registry: Registry) -> AsyncIterator[Door]:
    # A pepper of the test's own: on PostgreSQL there is no development pepper beside the database.
    keys = KeyStore(registry.store.engine, pepper=b"guard-policies-test-pepper-0123456789abcdef")
    operator, _ = keys.create(principal="olga", role=Role.operator, created_by="test")
    viewer, _ = keys.create(principal="vic", role=Role.viewer, created_by="test")
    app = create_http_app("registry-guard-policies", routers=[create_router(registry, Authenticator(keys))])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://registry",
        headers={"Authorization": f"Bearer {operator}"},
    ) as client:
        yield Door(client, {"Authorization": f"Bearer {viewer}"})


def activations(registry: Registry) -> list[dict[str, Any]]:
    """The payloads of the staged guard_policy.activated events, in commit order."""
    with registry.store.reading() as session:
        rows = session.scalars(
            select(OutboxEvent).where(OutboxEvent.event_type == "guard_policy.activated").order_by(OutboxEvent.id)  # type: ignore[arg-type]
        )
        return [json.loads(row.envelope)["payload"] for row in rows]


def audit(registry: Registry) -> list[tuple[str, str, str, str, dict[str, Any] | None, dict[str, Any] | None]]:
    entries = registry.changes.entries(object_type="guard_policy", limit=500).items
    return [(entry.actor, entry.action, entry.object_id, entry.outcome, entry.before, entry.after) for entry in entries]


def refusals(registry: Registry) -> list[tuple[str, str]]:
    return [
        (entry.object_id, entry.detail or "")
        for entry in registry.changes.entries(object_type="guard_policy", limit=500).items
        if entry.outcome == "refused"
    ]


def versions(registry: Registry) -> list[tuple[str, int, str, bool]]:
    return [
        (view.name, view.version, view.model_name, view.active)
        for view in registry.guard_policies.list_policies(limit=500).items
    ]


async def test_publish_two_versions_then_roll_back_to_the_first(door: Door, registry: Registry) -> None:
    first = await door.publish(STRICT)
    assert first.status_code == 201, first.text
    assert {key: first.json()[key] for key in ("name", "version", "model_name", "active", "created_by")} == {
        "name": POLICY,
        "version": 1,
        "model_name": MODEL,
        "active": True,
        "created_by": "olga",
    }
    assert GuardPolicySpec.model_validate(first.json()["spec"]) == STRICT
    second = await door.publish(STRICTER)
    assert second.status_code == 201, second.text
    assert (second.json()["version"], second.json()["active"]) == (2, True)

    current = (await door.http.get(PATH)).json()
    assert (current["version"], current["active"]) == (2, True)
    assert GuardPolicySpec.model_validate(current["spec"]) == STRICTER
    assert (await door.http.get(PATH, params={"version": 1})).json()["active"] is False

    rollback = await door.http.put(f"{PATH}/active", json={"version": 1})
    assert rollback.status_code == 200, rollback.text
    assert (rollback.json()["version"], rollback.json()["active"]) == (1, True)
    current = (await door.http.get(PATH)).json()
    assert (current["version"], current["active"]) == (1, True)
    assert GuardPolicySpec.model_validate(current["spec"]) == STRICT
    assert (await door.http.get(PATH, params={"version": 2})).json()["active"] is False
    listed = (await door.http.get("/registry/v1/guard-policies", params={"name": POLICY})).json()
    assert [(item["version"], item["active"]) for item in listed["items"]] == [(1, True), (2, False)]
    assert listed["next_cursor"] is None

    strict, stricter = STRICT.model_dump(mode="json"), STRICTER.model_dump(mode="json")
    assert audit(registry) == [
        ("olga", "guard_policy.publish", f"{POLICY}:v1", "ok", None, {"model_name": MODEL, "attached_to": "", "spec": strict, "activate": True}),
        ("olga", "guard_policy.activate", POLICY, "ok", None, {"version": 1}),
        ("olga", "guard_policy.publish", f"{POLICY}:v2", "ok", None, {"model_name": MODEL, "attached_to": "", "spec": stricter, "activate": True}),
        ("olga", "guard_policy.activate", POLICY, "ok", {"version": 1}, {"version": 2}),
        ("olga", "guard_policy.activate", POLICY, "ok", {"version": 2}, {"version": 1}),
    ]  # fmt: skip
    whole_model = {"model_name": MODEL, "route": None, "prompt_name": None}
    assert activations(registry) == [
        {"policy_name": POLICY, "version": 1, **whole_model, "spec": strict, "actor": "olga"},
        {"policy_name": POLICY, "version": 2, **whole_model, "spec": stricter, "actor": "olga"},
        {"policy_name": POLICY, "version": 1, **whole_model, "spec": strict, "actor": "olga"},
    ]

    # An unknown version is refused, audited, and moves nothing.
    missing = await door.http.put(f"{PATH}/active", json={"version": 9})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "guard_policy_not_found"
    assert (await door.http.get(PATH)).json()["version"] == 1 and len(activations(registry)) == 3
    unknown = await door.http.get("/registry/v1/guard-policies/no-such-guard")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "guard_policy_not_found"


async def test_an_inactive_version_is_stored_but_changes_nothing_the_gateway_applies(
    door: Door, registry: Registry
) -> None:
    assert (await door.publish(STRICT)).status_code == 201
    draft = await door.publish(STRICTER, activate=False)
    assert draft.status_code == 201 and (draft.json()["version"], draft.json()["active"]) == (2, False)
    assert (await door.http.get(PATH)).json()["version"] == 1
    assert [payload["version"] for payload in activations(registry)] == [1]
    assert (await door.http.put(f"{PATH}/active", json={"version": 2})).json()["active"] is True
    assert [payload["version"] for payload in activations(registry)] == [1, 2]


async def test_a_viewer_reads_but_may_not_publish_or_activate(door: Door, registry: Registry) -> None:
    body = {"name": POLICY, "model_name": MODEL, "spec": STRICT.model_dump(mode="json")}
    refused = await door.http.post("/registry/v1/guard-policies", json=body, headers=door.viewer)
    assert refused.status_code == 403, refused.text
    assert versions(registry) == [] and activations(registry) == [] and audit(registry) == []
    assert (await door.publish(STRICT)).status_code == 201
    assert (await door.http.put(f"{PATH}/active", json={"version": 1}, headers=door.viewer)).status_code == 403
    read = await door.http.get(PATH, headers=door.viewer)
    assert read.status_code == 200 and read.json()["version"] == 1
    assert len(activations(registry)) == 1


async def test_a_spec_that_would_redact_an_injection_is_refused_and_nothing_is_stored(
    door: Door, registry: Registry
) -> None:
    refused = await door.publish({"input_injection": "redact", "output_secrets": "block"})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["param"] == "spec.input_injection" and "cannot be redacted" in error["message"]
    misspelled = await door.publish({"input_secret": "block"})  # one letter short: it would guard nothing
    assert misspelled.status_code == 422 and "unknown field(s) input_secret" in misspelled.json()["error"]["message"]
    assert versions(registry) == [] and activations(registry) == []
    assert (await door.http.get(PATH)).status_code == 404
    bad_name = await door.http.get("/registry/v1/guard-policies/Not A Name")
    assert bad_name.status_code == 422


async def test_a_policy_stays_with_its_model_and_a_model_keeps_one_policy(door: Door, registry: Registry) -> None:
    assert (await door.publish(STRICT)).status_code == 201
    before = (versions(registry), activations(registry))

    moved = await door.publish(STRICTER, model_name="other")
    assert moved.status_code == 422, moved.text
    assert (moved.json()["error"]["code"], moved.json()["error"]["param"]) == ("model_mismatch", "model_name")
    assert f"guards model '{MODEL}'" in moved.json()["error"]["message"]

    second = await door.publish(STRICTER, name="another-guard")
    assert second.status_code == 422, second.text
    message = second.json()["error"]["message"]
    assert second.json()["error"]["code"] == "model_has_policy"
    assert (
        f"already guarded by guard policy '{POLICY}'" in message and f"publish a new version of '{POLICY}'" in message
    )

    assert (versions(registry), activations(registry)) == before
    assert (await door.http.get("/registry/v1/guard-policies/another-guard")).status_code == 404
    assert refusals(registry) == [(POLICY, "422 model_mismatch: " + moved.json()["error"]["message"]), ("another-guard", "422 model_has_policy: " + message)]  # fmt: skip


async def test_a_route_and_a_prompt_of_a_model_each_get_a_policy_of_their_own(door: Door, registry: Registry) -> None:
    assert (await door.publish(STRICT)).status_code == 201  # the whole model
    routed = await door.publish(STRICTER, name="staging-guard", route="staging")
    assert routed.status_code == 201, routed.text
    assert (routed.json()["route"], routed.json()["prompt_name"]) == ("staging", None)
    prompted = await door.publish(STRICTER, name="greet-guard", prompt_name="greet")
    assert prompted.status_code == 201, prompted.text
    assert (prompted.json()["route"], prompted.json()["prompt_name"]) == (None, "greet")
    assert [(event["policy_name"], event["route"], event["prompt_name"]) for event in activations(registry)] == [
        (POLICY, None, None),
        ("staging-guard", "staging", None),
        ("greet-guard", None, "greet"),
    ]
    before = (versions(registry), activations(registry))

    second = await door.publish(STRICT, name="racer", route="staging")
    assert second.status_code == 422 and second.json()["error"]["code"] == "model_has_policy", second.text
    assert (
        f"route staging of model '{MODEL}' is already guarded by guard policy 'staging-guard'"
        in (second.json()["error"]["message"])
    )
    moved = await door.publish(STRICT, name="staging-guard", route="production")
    assert (moved.status_code, moved.json()["error"]["code"], moved.json()["error"]["param"]) == (
        422,
        "model_mismatch",
        "route",
    )
    assert (
        f"guards route staging of model '{MODEL}' (bound by its v1), not route production of model '{MODEL}'"
        in moved.json()["error"]["message"]
    )
    unattached = await door.publish(STRICT, name="greet-guard")  # its next version, but for the whole model
    assert (unattached.status_code, unattached.json()["error"]["param"]) == (422, "prompt_name"), unattached.text
    assert f"guards prompt 'greet' on model '{MODEL}'" in unattached.json()["error"]["message"]
    both = await door.publish(STRICT, name="both-guard", route="staging", prompt_name="greet")
    assert both.status_code == 422 and "give route or prompt_name, not both" in both.json()["error"]["message"]
    unknown = await door.publish(STRICT, name="blue-guard", route="blue")
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (422, "route"), unknown.text
    assert (versions(registry), activations(registry)) == before


def test_the_database_itself_refuses_a_second_policy_name_for_a_model(registry: Registry) -> None:
    registry.guard_policies.publish_policy("alice", name=POLICY, model_name=MODEL, spec=STRICT)

    def first_version(name: str, attached_to: str) -> GuardPolicyVersion:
        return GuardPolicyVersion(
            name=name,
            version=1,
            model_name=MODEL,
            attached_to=attached_to,
            spec=STRICT.model_dump(),
            created_by="bob",
        )

    with pytest.raises(IntegrityError), registry.store.transaction() as session:
        # As a racing publication would, past the rule's check: the partial unique index holds.
        session.add(first_version("racer", ""))
    with registry.store.transaction() as session:
        session.add(first_version("greet-guard", "prompt:greet"))  # another attachment of the model is free
    assert versions(registry) == [(POLICY, 1, MODEL, True), ("greet-guard", 1, MODEL, False)]


def test_the_cli_publishes_activates_lists_and_refuses_a_bad_spec_in_one_line(home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "guard.json"
    spec.write_text(json.dumps({"input_injection": "block", "output_secrets": "redact"}))
    assert ok(home, "publish-guard-policy", POLICY, "--model", MODEL, "--spec", spec).strip() == (
        f"{POLICY}:v1 guards {MODEL} (active)"
    )
    spec.write_text(json.dumps({"input_injection": "flag"}))
    assert ok(home, "publish-guard-policy", POLICY, "--model", MODEL, "--spec", spec, "--inactive").strip() == (
        f"{POLICY}:v2 guards {MODEL} (not active)"
    )
    assert ok(home, "activate-guard-policy", POLICY, "2").strip() == f"{POLICY}:v2 is now active for {MODEL}"
    assert ok(
        home, "publish-guard-policy", "canary-guard", "--model", MODEL, "--route", "canary", "--spec", spec
    ).strip() == (f"canary-guard:v1 guards route canary of {MODEL} (active)")
    assert ok(
        home, "publish-guard-policy", "greet-guard", "--model", MODEL, "--prompt", "greet", "--spec", spec
    ).strip() == (f"greet-guard:v1 guards prompt greet on {MODEL} (active)")
    assert_one_error_line(
        flywheel(home, "publish-guard-policy", "blue-guard", "--model", MODEL, "--route", "blue", "--spec", spec),
        "route",
        "'production', 'staging', 'canary', 'pinned' or 'direct'",
    )
    listed = json_lines(ok(home, "guard-policies", "--name", POLICY))
    assert [(item["version"], item["active"], item["spec"]["input_injection"]) for item in listed] == [
        (1, False, "block"),
        (2, True, "flag"),
    ]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"input_injection": "redact"}))
    assert_one_error_line(
        flywheel(home, "publish-guard-policy", POLICY, "--model", MODEL, "--spec", bad),
        "spec.input_injection",
        "cannot be redacted",
    )
    bad.write_text(json.dumps({"input_secret": "block"}))
    assert_one_error_line(
        flywheel(home, "publish-guard-policy", POLICY, "--model", MODEL, "--spec", bad),
        "unknown field(s) input_secret",
        "input_secrets",
    )
    bad.write_text("{oops")
    assert_one_error_line(flywheel(home, "publish-guard-policy", POLICY, "--model", MODEL, "--spec", bad), "not JSON")
    assert_one_error_line(
        flywheel(home, "publish-guard-policy", POLICY, "--model", MODEL, "--spec", tmp_path / "nope.json"),
        "nope.json: no such file",
    )
    assert_one_error_line(
        flywheel(home, "publish-guard-policy", "another-guard", "--model", MODEL, "--spec", spec),
        f"publish a new version of '{POLICY}'",
        "422 model_has_policy",
    )

    registry = open_registry(home)
    try:
        assert versions(registry) == [
            (POLICY, 1, MODEL, False),
            (POLICY, 2, MODEL, True),
            ("canary-guard", 1, MODEL, True),
            ("greet-guard", 1, MODEL, True),
        ]
        assert [payload["version"] for payload in activations(registry)] == [1, 2, 1, 1]
        assert {entry[0] for entry in audit(registry)} == {"cli:tester"}
    finally:
        registry.store.close()
