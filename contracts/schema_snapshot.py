"""JSON Schema export of every contract, and the compatibility check against a published snapshot.

Published snapshot: contracts/schemas/ (events/<event_type>.v<N>.json, http/<Model>.json).
Breaking within a schema version: a removed field, a changed type, a removed enum value, a field
that became required, or a string that became stricter (a pattern added or changed, a shorter
`maxLength`, a longer `minLength`). Adding an optional field is not breaking. Narrowed numeric
ranges are not classified here; like every other difference, they fail the snapshot test until a
reviewer regenerates the snapshot.

Deliberate tightenings: a string field that takes one of the id and name types of contracts/ids.py
refuses values the published schema allowed. It is reported as a difference, not as breaking,
because the values it refuses were never safe to act on: ids and names become file names, Kafka
keys and URL paths, and `../../victim` as a job id made the trainer delete a directory outside its
own (issue 13). A producer that sent such a value was relying on a vulnerability; its event is
dead-lettered and its request gets 422, with the pattern in the message. Any other tightening is
breaking and needs a new schema version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contracts.envelope import Envelope
from contracts.events import EVENTS
from contracts.http import HTTP_MODELS
from contracts.ids import ID_PATTERNS

SNAPSHOT_DIR = Path(__file__).parent / "schemas"
REGENERATE_HINT = "review the change, then regenerate the snapshot with `flywheel contracts export contracts/schemas`"


def current_schemas() -> dict[str, dict[str, Any]]:
    """Every contract's JSON Schema, keyed by its path inside the snapshot directory."""
    schemas: dict[str, dict[str, Any]] = {}
    for event in EVENTS:
        schemas[f"events/{event.event_type}.v{event.schema_version}.json"] = Envelope[event].model_json_schema()  # type: ignore[valid-type]
    for model in HTTP_MODELS:
        schemas[f"http/{model.__name__}.json"] = model.model_json_schema()
    return schemas


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema under `directory`; returns the files written."""
    written = []
    for relative, schema in current_schemas().items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def read_snapshot(directory: Path = SNAPSHOT_DIR) -> dict[str, dict[str, Any]]:
    """The published schemas, keyed like `current_schemas()`."""
    return {
        path.relative_to(directory).as_posix(): json.loads(path.read_text())
        for path in sorted(directory.rglob("*.json"))
    }


DELIBERATE = " (deliberate: an id or name type of contracts/ids.py; the values it refuses were never safe)"


def breaking_changes(published: dict[str, Any], current: dict[str, Any], name: str = "") -> list[str]:
    """Every way `current` would reject or misread data valid under `published`, but the deliberate tightenings."""
    return [problem for problem in _changes(published, current, name) if not problem.endswith(DELIBERATE)]


def deliberate_tightenings(published: dict[str, Any], current: dict[str, Any], name: str = "") -> list[str]:
    """Strings of `published` that `current` constrains to an id or name type of contracts/ids.py."""
    return [problem for problem in _changes(published, current, name) if problem.endswith(DELIBERATE)]


def _changes(published: dict[str, Any], current: dict[str, Any], name: str) -> list[str]:
    return _compare(
        _Resolver(published).resolve(published),
        _Resolver(current).resolve(current),
        name or "$",
        _Resolver(published),
        _Resolver(current),
    )


class _Resolver:
    def __init__(self, root: dict[str, Any]) -> None:
        self.defs = root.get("$defs", {})

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if ref and ref.startswith("#/$defs/"):
            return self.resolve(self.defs[ref.removeprefix("#/$defs/")])
        return schema


def _alternatives(schema: dict[str, Any], resolver: _Resolver) -> list[dict[str, Any]]:
    schema = resolver.resolve(schema)
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        return [alternative for option in options for alternative in _alternatives(option, resolver)]
    return [schema]


def _kind(schema: dict[str, Any]) -> str:
    if "const" in schema:
        return "const"
    if "enum" in schema:
        return "enum"
    kind = schema.get("type")
    if isinstance(kind, list):
        return "|".join(sorted(kind))
    return kind or "any"


def _compare(
    old: dict[str, Any], new: dict[str, Any], path: str, old_r: _Resolver, new_r: _Resolver, depth: int = 0
) -> list[str]:
    if depth > 32:  # recursive models: deep enough to have compared every distinct field
        return []
    problems: list[str] = []
    old_options = _alternatives(old, old_r)
    new_options = _alternatives(new, new_r)
    new_by_kind: dict[str, dict[str, Any]] = {}
    for option in new_options:
        new_by_kind.setdefault(_kind(option), option)
    if "any" in new_by_kind:
        return problems
    for option in old_options:
        kind = _kind(option)
        if kind in ("enum", "const"):
            old_values = set(map(json.dumps, option.get("enum", [option.get("const")])))
            new_values = {
                json.dumps(value)
                for candidate in new_options
                for value in candidate.get("enum", [candidate["const"]] if "const" in candidate else [])
            }
            if any(_kind(candidate) == option.get("type") for candidate in new_options):
                continue  # widened from a closed set to its whole type
            removed = old_values - new_values
            if removed:
                problems.append(f"{path}: enum value(s) {', '.join(sorted(removed))} removed")
            continue
        counterpart = new_by_kind.get(kind)
        if counterpart is None:
            problems.append(f"{path}: type changed from {kind} to {' | '.join(sorted(new_by_kind))}")
            continue
        if kind == "object":
            problems.extend(_compare_objects(option, counterpart, path, old_r, new_r, depth))
        elif kind == "string":
            problems.extend(_compare_strings(option, counterpart, path))
        elif kind == "array" and "items" in option and "items" in counterpart:
            problems.extend(_compare(option["items"], counterpart["items"], f"{path}[]", old_r, new_r, depth + 1))
    return problems


def _compare_strings(old: dict[str, Any], new: dict[str, Any], path: str) -> list[str]:
    stricter: list[str] = []
    if new.get("pattern") is not None and new.get("pattern") != old.get("pattern"):
        stricter.append(
            f"pattern {new['pattern']!r} " + ("added" if old.get("pattern") is None else f"replaces {old['pattern']!r}")
        )
    if new.get("maxLength") is not None and new["maxLength"] < old.get("maxLength", float("inf")):
        stricter.append(f"maxLength {old.get('maxLength', 'none')} -> {new['maxLength']}")
    if new.get("minLength", 0) > old.get("minLength", 0):
        stricter.append(f"minLength {old.get('minLength', 0)} -> {new['minLength']}")
    if not stricter:
        return []
    deliberate = DELIBERATE if new.get("pattern") in ID_PATTERNS else ""
    return [f"{path}: stricter string: {', '.join(stricter)}{deliberate}"]


def _compare_objects(
    old: dict[str, Any], new: dict[str, Any], path: str, old_r: _Resolver, new_r: _Resolver, depth: int
) -> list[str]:
    problems: list[str] = []
    old_props: dict[str, Any] = old.get("properties", {})
    new_props: dict[str, Any] = new.get("properties", {})
    for name, schema in old_props.items():
        if name not in new_props:
            problems.append(f"{path}.{name}: field removed")
        else:
            problems.extend(_compare(schema, new_props[name], f"{path}.{name}", old_r, new_r, depth + 1))
    for name in sorted(set(new.get("required", [])) - set(old.get("required", []))):
        problems.append(f"{path}.{name}: field is now required")
    old_extra, new_extra = old.get("additionalProperties"), new.get("additionalProperties")
    if isinstance(old_extra, dict) and isinstance(new_extra, dict):
        problems.extend(_compare(old_extra, new_extra, f"{path}{{*}}", old_r, new_r, depth + 1))
    return problems


def compatibility_report(snapshot_dir: Path = SNAPSHOT_DIR) -> tuple[list[str], list[str]]:
    """(breaking changes, other differences) between the current contracts and the snapshot."""
    published = read_snapshot(snapshot_dir)
    current = current_schemas()
    breaking: list[str] = []
    other: list[str] = []
    for name, schema in current.items():
        if name not in published:
            other.append(f"{name}: new schema, not in the snapshot")
            continue
        breaking.extend(f"{name}: {problem}" for problem in breaking_changes(published[name], schema))
        other.extend(f"{name}: {problem}" for problem in deliberate_tightenings(published[name], schema))
        if published[name] != schema:
            other.append(f"{name}: changed")
    return breaking, other
