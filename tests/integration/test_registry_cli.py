"""`flywheel registry ...` as a person runs it: a subprocess against a fresh FLYWHEEL_HOME (SQLite).

Refusals are one `error:` line and a non-zero exit, never a traceback; every change is audited as
`cli:<user>`. The base import has its own test (test_registry_base_import.py): too slow to repeat here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from contracts.events import Stage
from services.registry.service import Registry
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore, default_artifact_root
from services.runtime.auth import KeyStore, registry_database_url
from services.runtime.settings import FlywheelSettings
from tests.integration.registry_support import CHAT, jsonl, seed_adapters
from tests.integration.test_cli_errors import FLYWHEEL, assert_one_error_line

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

USER = "tester"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def flywheel(home: Path, *args: str | Path, user: str = USER) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")}
    # getpass.getuser() reads LOGNAME first: the audit names `cli:tester` whoever runs the tests.
    env.update({"FLYWHEEL_HOME": str(home), "LOGNAME": user, "USER": user})
    return subprocess.run([FLYWHEEL, "registry", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def ok(home: Path, *args: str | Path, user: str = USER) -> str:
    result = flywheel(home, *args, user=user)
    assert result.returncode == 0, result.stderr
    return result.stdout


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def open_registry(home: Path) -> Registry:
    store = RegistryStore(registry_database_url(FlywheelSettings(home=home)))
    store.migrate()
    return Registry(store, ArtifactStore(default_artifact_root(home)))


def test_publish_a_dataset_and_refuse_a_malformed_one_by_line(home: Path, tmp_path: Path) -> None:
    good = tmp_path / "support.jsonl"
    good.write_bytes(jsonl(CHAT))
    assert ok(home, "publish-dataset", "support", good).startswith("support:v1 (2 chat records, sha256 ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT[0]) + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n' + "{oops\n")
    line = assert_one_error_line(
        flywheel(home, "publish-dataset", "support", bad),
        "2 invalid line(s)",
        "line 2: the last message must be the assistant's",
        "line 3: not JSON",
        "422 invalid_jsonl",
    )
    assert "line 1" not in line
    missing = flywheel(home, "publish-dataset", "support", tmp_path / "nope.jsonl")
    assert_one_error_line(missing, "nope.jsonl: no such file")
    audit = json_lines(ok(home, "audit", "--object-type", "dataset"))
    assert [(entry["actor"], entry["outcome"], entry["object_id"]) for entry in audit] == [
        (f"cli:{USER}", "ok", "support:v1"),
        (f"cli:{USER}", "refused", "support"),
    ]


def test_publish_a_prompt_move_its_label_and_audit_the_principal(home: Path, tmp_path: Path) -> None:
    template = tmp_path / "support.j2"
    template.write_text("Answer {{ question }} politely.")
    assert_one_error_line(
        flywheel(home, "publish-prompt", "support", template, "--label", "production"),
        "cannot go straight to production",
        "403 approval_required",
    )
    assert ok(home, "publish-prompt", "support", template).strip() == "support:v1 (variables: question)"
    assert_one_error_line(
        flywheel(home, "label-prompt", "support", "production", "1"),
        "support:v1 to production needs an approval by another principal",
        "403 approval_required",
    )
    assert (
        ok(home, "approve-prompt", "support", "1", user="pat")
        .strip()
        .startswith("support:v1 approved for production by cli:pat")
    )
    assert ok(home, "label-prompt", "support", "production", "1").strip() == "support@production -> v1"
    template.write_text("Answer {{ question }} for {{ customer }}.")
    assert ok(home, "publish-prompt", "support", template).strip() == "support:v2 (variables: customer, question)"
    ok(home, "approve-prompt", "support", "2", user="pat")
    assert ok(home, "label-prompt", "support", "production", "2").strip() == "support@production -> v2"
    assert_one_error_line(
        flywheel(home, "label-prompt", "support", "production", "9"),
        "no prompt version support:v9",
        "404 prompt_not_found",
    )
    moves = json_lines(ok(home, "audit", "--object-type", "prompt", "--object-id", "support@production"))
    assert [(entry["actor"], entry["outcome"], (entry["after"] or {}).get("version")) for entry in moves] == [
        (f"cli:{USER}", "ok", 1),
        (f"cli:{USER}", "ok", 2),
        (f"cli:{USER}", "refused", None),
    ]
    assert {entry["actor"] for entry in json_lines(ok(home, "audit", "--actor", f"cli:{USER}"))} == {f"cli:{USER}"}


def test_list_models_and_adapters_walk_lineage_and_move_stages(home: Path, tmp_path: Path) -> None:
    assert ok(home, "models") == ""
    registry = open_registry(home)
    try:
        seed_adapters(registry, tmp_path, count=2)
    finally:
        registry.store.close()
    assert [model["name"] for model in json_lines(ok(home, "models"))] == ["smol"]
    adapters = json_lines(ok(home, "adapters", "--model", "smol"))
    assert [(adapter["version"], adapter["stage"], adapter["dataset_name"]) for adapter in adapters] == [
        (1, "none", "support"),
        (2, "none", "support"),
    ]
    assert json.loads(ok(home, "lineage", "smol", "1"))["training_job_id"] == "job-0"
    assert ok(home, "transition", "smol", "1", "--to", "staging").strip() == "smol:v1 is now staging"
    assert_one_error_line(
        flywheel(home, "transition", "smol", "1", "--to", "production"),
        "needs an approval by another principal with the approver role",
        "flywheel registry approve smol 1",
        "403 approval_required",
    )
    assert_one_error_line(flywheel(home, "transition", "smol", "1", "--to", "live"), "--to 'live'", "staging")
    assert_one_error_line(
        flywheel(home, "transition", "smol", "1", "--to", "production", "--approver", "pat"), "--approver is gone"
    )
    ok(home, "approve", "smol", "1")  # by the requester themselves: it does not count
    assert_one_error_line(
        flywheel(home, "transition", "smol", "1", "--to", "production"),
        f"approved only by cli:{USER}, who is requesting it",
        "403 self_approval",
    )
    assert (
        ok(home, "approve", "smol", "1", "--comment", "beats base", user="pat")
        .strip()
        .startswith("smol:v1 approved for production by cli:pat")
    )
    assert ok(home, "transition", "smol", "1", "--to", "production").strip() == "smol:v1 is now production"
    assert [adapter["stage"] for adapter in json_lines(ok(home, "adapters", "--model", "smol"))] == [
        Stage.production.value,
        Stage.none.value,
    ]
    promotion = json_lines(ok(home, "audit", "--object-id", "smol:v1"))[-1]
    assert (promotion["actor"], promotion["action"], promotion["after"]["approver"]) == (
        f"cli:{USER}",
        "adapter.stage.production",
        "cli:pat",
    )


def test_create_and_revoke_an_api_key(home: Path) -> None:
    created = ok(home, "keys", "create", "bob", "--role", "operator").splitlines()
    assert created[0].startswith("key id ") and created[0].endswith(
        "for bob (operator, does not expire); the key, shown once:"
    )
    key_id, key = created[0].split()[2], created[1].strip()
    registry = open_registry(home)
    keys = KeyStore(registry.store.engine)
    try:
        principal = keys.verify(key)
        assert principal is not None and (principal.name, principal.role.value, principal.key_id) == (
            "bob",
            "operator",
            key_id,
        )
        rotated = ok(home, "keys", "rotate", key_id, "--ttl", "3600").splitlines()
        assert f"replaces {key_id} for bob (operator, expires " in rotated[0] and rotated[0].endswith(
            f"key {key_id} revoked; the new key, shown once:"
        )
        new_id, new_key = rotated[0].split()[2], rotated[1].strip()
        assert keys.verify(key) is None and keys.verify(new_key).key_id == new_id  # type: ignore[union-attr]
        listed = {entry["key_id"]: entry for entry in json_lines(ok(home, "keys", "list", "--principal", "bob"))}
        assert (
            listed[new_id]["rotated_from"] == key_id and listed[new_id]["expires_at"] and listed[key_id]["revoked_at"]
        )
        assert all("secret" not in name for entry in listed.values() for name in entry)
        assert ok(home, "keys", "revoke", new_id).strip() == f"key {new_id} revoked"
        assert keys.verify(new_key) is None
        key_id = new_id
    finally:
        registry.store.close()
    assert_one_error_line(flywheel(home, "keys", "revoke", key_id), f"no active key {key_id}", "404 key_not_found")
    assert_one_error_line(flywheel(home, "keys", "create", "eve", "--role", "root"), "--role 'root'", "operator")
    audit = json_lines(ok(home, "audit", "--object-type", "key"))
    assert [(entry["actor"], entry["action"], entry["outcome"]) for entry in audit] == [
        (f"cli:{USER}", "key.create", "ok"),
        (f"cli:{USER}", "key.rotate", "ok"),
        (f"cli:{USER}", "key.revoke", "ok"),
        (f"cli:{USER}", "key.revoke", "refused"),
    ]
