"""The id and name types of contracts/ids.py, the path helper that keeps paths under their root, and
how the schema snapshot check classifies the tightening those types brought (issue 13)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from contracts.events import DatasetRef, InferenceLogged, TrainingRequested
from contracts.http import TrainingJobCreate
from contracts.ids import (
    ID_PATTERNS,
    LARGEST_VERSION,
    DatasetName,
    EvaluationId,
    InferenceId,
    JobId,
    ModelName,
    PromptLabel,
    Sha256,
    SpanId,
    TraceId,
    VersionNumber,
)
from contracts.schema_snapshot import breaking_changes, current_schemas, deliberate_tightenings
from services.runtime.paths import PathOutsideRoot, under

pytestmark = pytest.mark.unit

LONGEST_MODEL = "m" * 200

# Values the codebase, its tests and its demo use: every one must stay valid.
LEGITIMATE: dict[object, list[str]] = {
    ModelName: ["smollm2-135m-instruct", "smollm2", "tiny", "m", "model-2", "Qwen2.5-0.5B", LONGEST_MODEL],
    DatasetName: ["tiny", "acme-golden", "smollm2-135m-instruct-corrections", "support_v2.train"],
    PromptLabel: ["production", "staging", "exp-1", "b"],
    JobId: [
        "4f1c2a9e-6b0d-4c7e-9a55-0e2b7d3f8c11",
        "job-42",
        "j1",
        "retrain-9b2e4c1a-7f3d-4e8a-b6c5-1d0f2a3e4b5c",
        "abc123-7-train",
    ],
    EvaluationId: ["ev-f0c7b9c7c6f14ac1", f"auto-{LONGEST_MODEL}-v{2**63 - 1}", "must-show-v2", "eval-1"],
    InferenceId: [
        "08a09851-9dfe-4676-8c12-ab09e7d2eeda",
        "after-poison",
        "chatcmpl-42",
        "pii-1",
        "app:req/42",
        "i" * 128,
    ],
    Sha256: ["0" * 64, "ab" * 32],
}

# Traversal, separators, control characters, leading dots and dashes, empties, and overlong values.
HOSTILE_NAMES = [
    "..",
    ".",
    "../../victim",
    "a/b",
    "a\\b",
    "/etc/passwd",
    "%2e%2e%2f",
    "a\x00b",
    "",
    " x",
    "x ",
    "x\n",
    "-rf",
    ".hidden",
    "ünïcode",
    "a b",
]


@pytest.mark.parametrize(("kind", "value"), [(kind, value) for kind, values in LEGITIMATE.items() for value in values])
def test_every_legitimate_id_and_name_is_accepted(kind: object, value: str) -> None:
    assert TypeAdapter(kind).validate_python(value) == value


@pytest.mark.parametrize("kind", [ModelName, DatasetName, PromptLabel, JobId, EvaluationId])
@pytest.mark.parametrize("value", HOSTILE_NAMES)
def test_names_and_ids_refuse_what_could_become_a_path(kind: object, value: str) -> None:
    with pytest.raises(ValidationError, match="should match pattern"):
        TypeAdapter(kind).validate_python(value)


@pytest.mark.parametrize(("kind", "longest"), [(ModelName, 200), (JobId, 230), (EvaluationId, 230), (InferenceId, 128)])
def test_overlong_values_are_refused_with_the_limit_in_the_message(kind: object, longest: int) -> None:
    TypeAdapter(kind).validate_python("a" * longest)
    with pytest.raises(ValidationError, match=f"at most {longest} characters"):
        TypeAdapter(kind).validate_python("a" * (longest + 1))


@pytest.mark.parametrize("value", ["", "../x", "-x", "a b", "a\x00b", "a\\b", "é"])
def test_inference_ids_keep_their_alphabet_and_nothing_more(value: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(InferenceId).validate_python(value)


def test_a_digest_is_lowercase_hex_of_sha256_length() -> None:
    for value in ("0" * 63, "0" * 65, "AB" * 32, "../" + "0" * 61):
        with pytest.raises(ValidationError):
            TypeAdapter(Sha256).validate_python(value)


def test_a_version_fits_the_databases_integer() -> None:
    assert TypeAdapter(VersionNumber).validate_python(LARGEST_VERSION) == LARGEST_VERSION
    for value in (0, -1, LARGEST_VERSION + 1):
        with pytest.raises(ValidationError):
            TypeAdapter(VersionNumber).validate_python(value)


@pytest.mark.parametrize(("kind", "digits"), [(TraceId, 32), (SpanId, 16)])
def test_trace_and_span_ids_refuse_all_zero_wherever_they_are_used(kind: object, digits: int) -> None:
    # W3C trace context calls an all-zero id invalid; one in a stored span or feedback would join everything
    # else that carried the same bad id.
    ids: TypeAdapter[str] = TypeAdapter(kind)
    assert ids.validate_python("0" * (digits - 1) + "1") == "0" * (digits - 1) + "1"
    with pytest.raises(ValidationError, match="an all-zero trace or span id is invalid"):
        ids.validate_python("0" * digits)
    with pytest.raises(ValidationError, match="trace_id\n.*all-zero"):
        InferenceLogged(inference_id="chatcmpl-1", model_name="m", trace_id="0" * 32)


def test_contract_models_carry_the_types() -> None:
    with pytest.raises(ValidationError) as refused:
        TrainingJobCreate(model_name="smollm2", dataset=DatasetRef(name="tiny", version=1), job_id="../../victim")
    assert refused.value.errors()[0]["loc"] == ("job_id",)
    with pytest.raises(ValidationError) as refused:
        TrainingRequested(
            job_id="job-1", model_name="smollm2", dataset={"name": "../data", "version": 1}, requested_by="test"
        )
    assert refused.value.errors()[0]["loc"] == ("dataset", "name")
    schema = TrainingRequested.model_json_schema()
    assert (
        schema["properties"]["job_id"]["pattern"] in ID_PATTERNS and schema["properties"]["job_id"]["maxLength"] == 230
    )


# ------------------------------------------------------------------------------------ path helper


def test_under_joins_and_resolves_inside_the_root(tmp_path: Path) -> None:
    assert under(tmp_path, "jobs", "job-42") == tmp_path.resolve() / "jobs" / "job-42"
    assert under(tmp_path, "a/../b") == tmp_path.resolve() / "b"  # climbs, but stays inside
    assert under(str(tmp_path), "sub/file.json") == tmp_path.resolve() / "sub" / "file.json"


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        (("..",), "not inside"),
        (("../../victim",), "not inside"),
        (("jobs", "../.."), "not inside"),
        ((".",), "not inside"),  # the root itself: removing it would remove every job
        (("/etc/passwd",), "absolute"),
        (("jobs", "/tmp"), "absolute"),
        (("..\\victim",), "backslash"),
        (("",), "empty"),
        (("a\x00b",), "NUL"),
    ],
)
def test_under_refuses_what_would_leave_the_root(tmp_path: Path, parts: tuple[str, ...], reason: str) -> None:
    with pytest.raises(PathOutsideRoot, match=reason):
        under(tmp_path / "root", *parts)


def test_under_refuses_a_symlink_planted_inside_that_leads_out(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(PathOutsideRoot, match="not inside"):
        under(root, "link", "victim")


# ----------------------------------------------------------------------------- schema snapshot check


def _before_issue_13(schema: dict) -> dict:
    """The schema as it was published before ids were constrained: id patterns and their lengths removed."""
    old = copy.deepcopy(schema)

    def strip(node: object) -> None:
        if isinstance(node, dict):
            if node.get("pattern") in ID_PATTERNS:
                node.pop("pattern")
                node.pop("maxLength", None)
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    strip(old)
    return old


def test_constraining_a_string_to_an_id_type_is_a_deliberate_tightening_not_a_breaking_change() -> None:
    current = current_schemas()["events/training.requested.v1.json"]
    published = _before_issue_13(current)
    assert breaking_changes(published, current) == []
    tightened = deliberate_tightenings(published, current)
    assert any(
        "$.payload.job_id: stricter string: pattern" in line and "maxLength none -> 230" in line for line in tightened
    ), tightened
    assert any("$.payload.dataset.name" in line for line in tightened), tightened


def test_any_other_tightening_of_a_string_is_breaking() -> None:
    published = current_schemas()["events/inference.logged.v1.json"]
    payload = lambda schema: schema["$defs"]["InferenceLogged"]["properties"]  # noqa: E731
    for change, expected in (
        ({"pattern": "^[a-z]+$"}, "pattern '^[a-z]+$' added"),
        ({"maxLength": 10}, "maxLength none -> 10"),
        ({"minLength": 3}, "minLength 0 -> 3"),
    ):
        current = copy.deepcopy(published)
        payload(current)["output_text"].update(change)
        problems = breaking_changes(published, current)
        assert any("output_text: stricter string" in problem and expected in problem for problem in problems), problems
        assert deliberate_tightenings(published, current) == []


def test_loosening_a_string_is_compatible() -> None:
    current = current_schemas()["events/training.requested.v1.json"]
    assert breaking_changes(current, _before_issue_13(current)) == []
