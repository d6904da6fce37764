"""Approvals are people, not strings: against the live registry door on real Kafka, a production promotion
(an adapter version, or a prompt's production label) needs an approval recorded beforehand by another
authenticated principal whose role grants approver; the requester cannot approve their own, a viewer or
an operator cannot approve at all, refusals are 403s that write nothing, and the audit log names both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from contracts.events import Stage
from services.registry.app import create_app
from services.registry.service import Registry
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore, default_artifact_root
from services.runtime.auth import registry_database_url
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from tests.integration.registry_support import seed_adapters

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ADMIN = "fw_boot_security-approvals-admin-0123456789"
PROMOTE = "/registry/v1/adapters/smol/versions/1/transitions"
APPROVE = "/registry/v1/adapters/smol/versions/1/approvals"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Door:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.keys: dict[str, dict[str, str]] = {}

    async def key(self, principal: str, role: str) -> dict[str, str]:
        created = await self.client.post("/registry/v1/keys", json={"principal": principal, "role": role})
        assert created.status_code == 201, created.text
        self.keys[principal] = auth(created.json()["key"])
        return self.keys[principal]

    async def audit(self, **params: str) -> list[dict]:
        return (await self.client.get("/registry/v1/audit", params={"limit": 500, **params})).json()["items"]


@pytest.fixture
async def door(settings: FlywheelSettings, topics: str, tmp_path: Path) -> AsyncIterator[Door]:
    settings = settings.model_copy(update={"bootstrap_admin_key": ADMIN})
    app, _ = build_process(settings, [create_app], title="registry-approvals")
    async with app.router.lifespan_context(app):
        # The fixtures: smol with adapters v1 and v2 (trained, and passed its gate) in staging, written through the
        # registry's own use cases on the database the door serves; evaluations arrive by event in production.
        store = RegistryStore(registry_database_url(settings))
        try:
            seeded = Registry(store, ArtifactStore(default_artifact_root(settings.home)))
            seed_adapters(seeded, tmp_path, count=2)
            for version in (1, 2):
                seeded.adapters.transition("seed", model_name="smol", version=version, to_stage=Stage.staging)
        finally:
            store.close()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://registry", headers=auth(ADMIN)
        ) as client:
            yield Door(client)


async def test_an_adapter_promotion_needs_another_principal_who_may_approve(door: Door) -> None:
    olga = await door.key("olga", "operator")
    pat = await door.key("pat", "approver")
    vic = await door.key("vic", "viewer")
    http = door.client
    audited_before = len(await door.audit())

    missing = await http.post(PROMOTE, json={"to_stage": "production"}, headers=olga)
    assert missing.status_code == 403 and missing.json()["error"]["code"] == "approval_required"
    assert "needs an approval by another principal with the approver role" in missing.json()["error"]["message"]
    # A name in the body is no approval: the field is ignored.
    named = await http.post(PROMOTE, json={"to_stage": "production", "approver": "pat"}, headers=olga)
    assert named.status_code == 403 and named.json()["error"]["code"] == "approval_required"

    for who, role in ((vic, "viewer"), (olga, "operator")):
        refused = await http.post(APPROVE, json={}, headers=who)
        assert refused.status_code == 403, refused.text
        assert f"has role {role}; this needs approver or higher" in refused.json()["error"]["message"]

    # An admin may approve, but not a promotion it then requests itself.
    assert (await http.post(APPROVE.replace("/1/", "/2/"), json={"comment": "mine"})).status_code == 201
    own = await http.post(PROMOTE.replace("/1/", "/2/"), json={"to_stage": "production"})
    assert own.status_code == 403 and own.json()["error"]["code"] == "self_approval"
    assert (
        "smol:v2 to production was approved only by bootstrap-admin, who is requesting it"
        in own.json()["error"]["message"]
    )
    # An approver cannot promote: approving is not operating.
    assert (await http.post(PROMOTE, json={"to_stage": "production"}, headers=pat)).status_code == 403
    assert (await http.get("/registry/v1/adapters/smol/versions/1")).json()["stage"] == "staging"
    # None of those refusals wrote anything; the admin's approval is the one new row.
    assert [(entry["actor"], entry["action"]) for entry in (await door.audit())[audited_before:]] == [
        ("bootstrap-admin", "approval.grant")
    ]

    approval = await http.post(APPROVE, json={"comment": "passed the gate; canary looks fine"}, headers=pat)
    assert approval.status_code == 201 and (
        approval.json()["approved_by"],
        approval.json()["approved_role"],
        approval.json()["used_by"],
    ) == ("pat", "approver", None)
    promoted = await http.post(PROMOTE, json={"to_stage": "production", "reason": "approved"}, headers=olga)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["stage"] == "production"

    entries = await door.audit(object_type="adapter", object_id="smol:v1")
    grant = [entry for entry in entries if entry["action"] == "approval.grant" and entry["actor"] == "pat"]
    promotion = [entry for entry in entries if entry["action"] == "adapter.stage.production"]
    assert len(grant) == 1 and grant[0]["detail"] == "passed the gate; canary looks fine"
    assert [
        (entry["actor"], entry["outcome"], entry["after"]["approver"], entry["after"]["approval_id"])
        for entry in promotion
    ] == [("olga", "ok", "pat", approval.json()["id"])]
    approvals = (await http.get(APPROVE, headers=vic)).json()
    assert [(item["approved_by"], item["used_by"]) for item in approvals] == [("pat", "olga")]


async def test_a_prompt_production_label_follows_the_same_rule(door: Door) -> None:
    olga = await door.key("olga", "operator")
    pat = await door.key("pat", "approver")
    http = door.client

    straight = await http.post(
        "/registry/v1/prompts",
        json={"name": "support", "template": "Answer {{ q }}.", "labels": ["production"]},
        headers=olga,
    )
    assert straight.status_code == 403 and "cannot go straight to production" in straight.json()["error"]["message"]
    assert (await http.get("/registry/v1/prompts")).json()["items"] == []
    published = await http.post(
        "/registry/v1/prompts",
        json={"name": "support", "template": "Answer {{ q }}.", "labels": ["candidate"]},
        headers=olga,
    )
    assert published.status_code == 201, published.text
    move = "/registry/v1/prompts/support/labels/production"
    unapproved = await http.put(move, json={"version": 1}, headers=olga)
    assert unapproved.status_code == 403 and unapproved.json()["error"]["code"] == "approval_required"
    assert (
        await http.post("/registry/v1/prompts/support/versions/1/approvals", json={}, headers=olga)
    ).status_code == 403

    assert (
        await http.post("/registry/v1/prompts/support/versions/1/approvals", json={}, headers=pat)
    ).status_code == 201
    own = await http.post("/registry/v1/prompts/support/versions/1/approvals", json={})  # the admin approves ...
    assert own.status_code == 201
    moved = await http.put(move, json={"version": 1}, headers=olga)
    assert moved.status_code == 200 and "production" in moved.json()["labels"]
    # Other labels need no approval.
    assert (
        await http.put("/registry/v1/prompts/support/labels/staging", json={"version": 1}, headers=olga)
    ).status_code == 200

    labels = await door.audit(object_type="prompt", object_id="support@production")
    assert [(entry["actor"], entry["after"]["approver"]) for entry in labels] == [("olga", "pat")]
    # ... but cannot use its own approval: the admin's move of the label back is refused.
    published_v2 = await http.post(
        "/registry/v1/prompts", json={"name": "support", "template": "Reply to {{ q }}."}, headers=olga
    )
    assert published_v2.status_code == 201
    assert (await http.post("/registry/v1/prompts/support/versions/2/approvals", json={})).status_code == 201
    self_move = await http.put(move, json={"version": 2})
    assert self_move.status_code == 403 and self_move.json()["error"]["code"] == "self_approval"
    assert (await http.get("/registry/v1/prompts/support", params={"label": "production"})).json()["version"] == 1
