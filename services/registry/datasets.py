"""Datasets: JSONL records validated line by line (errors by line number), stored by digest in the
artifact store, registered as numbered versions, and read back with their digest verified."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from contracts.events import DatasetPublished
from contracts.http import DatasetVersionView
from services.registry import store
from services.registry.changes import Changes
from services.registry.errors import Conflict, Invalid, TooLarge
from services.registry.models import DatasetVersion
from services.registry.outbox import stage_event
from services.registry.store import Page
from services.runtime.artifacts import ArtifactError, ArtifactStore

# Chat records: {"messages": [{"role", "content"}, ...]}; instruction records: {"instruction", "output", "input"?};
# preference records: {"prompt": [{"role", "content"}, ...], "chosen", "rejected", "provenance"?}.
ROLES = {"system", "user", "assistant"}
PREFERENCE_KEYS = ("prompt", "chosen", "rejected")
# uploaded; feedback: built from corrections; preferences: built from feedback as preference pairs.
PROVENANCES = ("uploaded", "feedback", "preferences")


def validate_record(record: Any) -> tuple[str, str | None]:
    """(format, error) of one dataset record: format is chat, instruction or preference; error None when valid."""
    if not isinstance(record, dict):
        return "", "a record must be a JSON object"
    if "messages" in record:
        problem = _conversation_problem(record["messages"], "messages")
        if problem is None and record["messages"][-1]["role"] != "assistant":
            problem = "the last message must be the assistant's (the target)"
        return "chat", problem
    if "instruction" in record:
        for name in ("instruction", "output"):
            if not isinstance(record.get(name), str) or not record[name].strip():
                return "instruction", f"{name} must be a non-empty string"
        if "input" in record and not isinstance(record["input"], str):
            return "instruction", "input must be a string"
        return "instruction", None
    if any(key in record for key in PREFERENCE_KEYS):
        return "preference", _preference_problem(record)
    return "", (
        'unknown record: expected {"messages": [...]} (chat), {"instruction": ..., "output": ...} (instruction) '
        'or {"prompt": [...], "chosen": ..., "rejected": ...} (preference)'
    )


def _conversation_problem(messages: Any, name: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{name} must be a non-empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{name}[{index}] must be an object"
        if message.get("role") not in ROLES:
            return f"{name}[{index}].role must be one of {', '.join(sorted(ROLES))}"
        if not isinstance(message.get("content"), str):
            return f"{name}[{index}].content must be a string"
    return None


def _preference_problem(record: dict[str, Any]) -> str | None:
    missing = [key for key in PREFERENCE_KEYS if key not in record]
    if missing:
        return f"a preference record needs {', '.join(PREFERENCE_KEYS)}; missing {', '.join(missing)}"
    problem = _conversation_problem(record["prompt"], "prompt")
    if problem is not None:
        return problem
    if record["prompt"][-1]["role"] != "user":
        return "the last prompt message must be the user's (the turn both answers reply to)"
    for name in ("chosen", "rejected"):
        if not isinstance(record[name], str) or not record[name].strip():
            return f"{name} must be a non-empty string"
    if record["chosen"].strip() == record["rejected"].strip():
        return "chosen and rejected are the same text: there is nothing to prefer"
    if "provenance" in record and not isinstance(record["provenance"], dict):
        return "provenance must be an object"
    return None


def validate_jsonl(jsonl: bytes) -> tuple[str, int]:
    """(record format, row count) of a JSONL upload, or Invalid listing its bad lines (the first 20)."""
    errors: list[str] = []
    formats: set[str] = set()
    rows = 0
    try:
        text = jsonl.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Invalid(f"dataset is not UTF-8 (byte {error.start})", param="jsonl", code="invalid_jsonl") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            errors.append(f"line {number}: not JSON ({error.msg} at column {error.colno})")
            continue
        record_format, problem = validate_record(record)
        if problem:
            errors.append(f"line {number}: {problem}")
            continue
        formats.add(record_format)
        rows += 1
    if len(formats) > 1:
        errors.append(f"records mix {' and '.join(sorted(formats))} formats; use one per dataset")
    if not errors and rows == 0:
        errors.append("dataset has no records")
    if errors:
        shown = "; ".join(errors[:20]) + (f"; (+{len(errors) - 20} more)" if len(errors) > 20 else "")
        raise Invalid(f"{len(errors)} invalid line(s): {shown}", param="jsonl", code="invalid_jsonl")
    return formats.pop(), rows


class Datasets:
    """Publishing and reading dataset versions."""

    def __init__(self, changes: Changes, artifacts: ArtifactStore, *, max_dataset_bytes: int) -> None:
        self.changes = changes
        self.artifacts = artifacts
        self.max_dataset_bytes = max_dataset_bytes

    def publish_dataset(
        self,
        actor: str,
        *,
        name: str,
        split: str,
        jsonl: bytes,
        provenance: str = "uploaded",
        model_name: str | None = None,
    ) -> DatasetVersionView:
        """Validate JSONL records (errors by line number), store them by digest, and register the next version."""
        with self.changes.change(actor, "dataset.publish", "dataset", name) as session:
            if split not in ("train", "golden"):
                raise Invalid("split must be train or golden", param="split")
            if provenance not in PROVENANCES:
                raise Invalid(f"provenance must be one of {', '.join(PROVENANCES)}", param="provenance")
            if len(jsonl) > self.max_dataset_bytes:
                raise TooLarge(
                    f"dataset is {len(jsonl)} bytes; the limit is {self.max_dataset_bytes}",
                    param="jsonl",
                    code="dataset_too_large",
                )
            record_format, rows = validate_jsonl(jsonl)
            if split == "golden" and record_format == "preference":
                # The evaluator scores answers against one reference each; a pair holds two and no reference.
                raise Invalid(
                    "preference records are for training: publish them with split train; a golden set holds chat or instruction records with one reference answer",
                    param="split",
                    code="preference_not_golden",
                )
            digest = hashlib.sha256(jsonl).hexdigest()
            try:
                ref = self.artifacts.put_bytes(jsonl, kind="jsonl")
            except ArtifactError as error:
                raise Invalid(f"dataset refused: {error}", param="jsonl") from None
            version = store.next_dataset_version(session, name)
            row = DatasetVersion(
                name=name,
                version=version,
                split=split,
                record_format=record_format,
                row_count=rows,
                sha256=digest,
                artifact_uri=ref.uri,
                provenance=provenance,
                model_name=model_name,
                created_by=actor,
            )
            session.add(row)
            self.changes.record(
                session,
                actor,
                "dataset.publish",
                "dataset",
                f"{name}:v{version}",
                after={"sha256": digest, "rows": rows, "split": split},
            )
            stage_event(
                session,
                DatasetPublished(
                    dataset_name=name,
                    version=version,
                    split=split,
                    row_count=rows,
                    sha256=digest,
                    artifact_uri=ref.uri,
                    provenance=provenance,
                    model_name=model_name,
                ),
            )
        return DatasetVersionView.model_validate(row)

    def get_dataset(self, name: str, version: int) -> DatasetVersionView:
        """One dataset version."""
        with self.changes.store.reading() as session:
            return DatasetVersionView.model_validate(store.dataset_version(session, name, version))

    def list_datasets(self, *, name: str | None = None, cursor: str | None = None, limit: int = 50) -> Page:
        """Dataset versions, optionally of one name."""
        with self.changes.store.reading() as session:
            return store.page(
                session, store.datasets_query(name), DatasetVersion, DatasetVersionView.model_validate, cursor, limit
            )

    def dataset_rows(self, name: str, version: int, *, offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """The records of a dataset version, read back from the artifact store with their digest verified."""
        dataset = self.get_dataset(name, version)
        try:
            data = self.artifacts.get_bytes(dataset.artifact_uri, dataset.sha256)
        except ArtifactError as error:
            raise Conflict(f"dataset {name}:v{version} cannot be read: {error}", code="artifact_invalid") from None
        records = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        return records[offset : offset + max(0, min(limit, 10_000))]
