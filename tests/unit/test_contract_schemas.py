"""The published JSON Schemas are the contract with apps and other services: a change that breaks
them must be a new schema version, and any change at all must be reviewed and regenerated."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from contracts.events import DatasetRef, TrainingRequested
from contracts.http import TrainingJobCreate
from contracts.schema_snapshot import REGENERATE_HINT, breaking_changes, compatibility_report, current_schemas

pytestmark = pytest.mark.unit

INFERENCE = "events/inference.logged.v1.json"


def test_contracts_match_the_published_snapshot() -> None:
    breaking, other = compatibility_report()
    assert not breaking, "breaking contract change(s):\n" + "\n".join(breaking)
    assert not other, "contract changed without a new snapshot; " + REGENERATE_HINT + ":\n" + "\n".join(other)


def _payload_def(schema: dict) -> dict:
    return schema["$defs"]["InferenceLogged"]


def test_removed_field_is_breaking() -> None:
    published = current_schemas()[INFERENCE]
    changed = copy.deepcopy(published)
    del _payload_def(changed)["properties"]["output_text"]
    assert any("output_text: field removed" in problem for problem in breaking_changes(published, changed))


def test_changed_type_is_breaking() -> None:
    published = current_schemas()[INFERENCE]
    changed = copy.deepcopy(published)
    _payload_def(changed)["properties"]["prompt_tokens"] = {"type": "string"}
    problems = breaking_changes(published, changed)
    assert any("prompt_tokens: type changed from integer to string" in problem for problem in problems)


def test_new_required_field_is_breaking() -> None:
    published = current_schemas()[INFERENCE]
    changed = copy.deepcopy(published)
    _payload_def(changed)["properties"]["tenant"] = {"type": "string"}
    _payload_def(changed)["required"].append("tenant")
    assert any("tenant: field is now required" in problem for problem in breaking_changes(published, changed))


def test_removed_enum_value_is_breaking() -> None:
    published = current_schemas()["events/feedback.received.v1.json"]
    changed = copy.deepcopy(published)
    changed["$defs"]["Thumbs"]["enum"] = ["up"]
    assert any('"down"' in problem and "removed" in problem for problem in breaking_changes(published, changed))


def test_added_optional_field_and_widened_type_are_compatible() -> None:
    published = current_schemas()[INFERENCE]
    changed = copy.deepcopy(published)
    _payload_def(changed)["properties"]["tenant"] = {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    _payload_def(changed)["properties"]["route"] = {
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "default": "direct",
    }
    assert breaking_changes(published, changed) == []


def test_every_event_and_http_model_is_exported() -> None:
    schemas = current_schemas()
    assert sum(name.startswith("events/") for name in schemas) == 20
    for name, schema in schemas.items():
        if name.startswith("events/"):
            assert {
                "event_id",
                "event_type",
                "schema_version",
                "occurred_at",
                "producer",
                "correlation_id",
                "payload",
            } <= set(schema["properties"])


def test_a_training_request_from_before_preference_tuning_validates_as_sft() -> None:
    old = {
        "job_id": "job-1",
        "model_name": "smollm2-135m-instruct",
        "dataset": {"name": "acme", "version": 1},
        "hyperparameters": {"rank": 4, "alpha": 8.0, "learning_rate": 1e-3},
        "requested_by": "operator",
    }
    hyperparameters = TrainingRequested.model_validate(old).hyperparameters
    assert (hyperparameters.method, hyperparameters.dpo_beta) == ("sft", 0.1)


SFT_THEN_DPO_REQUEST = {
    "job_id": "job-2",
    "model_name": "smollm2-135m-instruct",
    "dataset": {"name": "acme", "version": 1},
    "preference_dataset": {"name": "acme-preferences", "version": 2},
    "hyperparameters": {"rank": 4, "method": "sft_then_dpo"},
    "requested_by": "operator",
}


def test_an_sft_then_dpo_request_carries_its_preference_dataset_on_the_event_and_at_the_door() -> None:
    request = TrainingRequested.model_validate(SFT_THEN_DPO_REQUEST)
    assert request.preference_dataset == DatasetRef(name="acme-preferences", version=2)
    body = TrainingJobCreate.model_validate({k: v for k, v in SFT_THEN_DPO_REQUEST.items() if k != "requested_by"})
    assert body.preference_dataset == request.preference_dataset


@pytest.mark.parametrize("model", [TrainingRequested, TrainingJobCreate])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"preference_dataset": None}, "method sft_then_dpo needs preference_dataset"),
        (
            {"hyperparameters": {"method": "sft"}},
            "preference_dataset is only for hyperparameters.method sft_then_dpo; a sft job",
        ),
        (
            {"hyperparameters": {"method": "dpo"}},
            "preference_dataset is only for hyperparameters.method sft_then_dpo; a dpo job",
        ),
    ],
)
def test_a_preference_dataset_is_required_by_sft_then_dpo_and_refused_by_the_other_methods(
    model: type, change: dict, message: str
) -> None:
    asked = {**SFT_THEN_DPO_REQUEST, **change}
    if model is TrainingJobCreate:
        del asked["requested_by"]
    with pytest.raises(ValidationError, match=message):
        model.model_validate(asked)


def test_a_request_without_a_preference_dataset_still_validates_for_sft_and_dpo() -> None:
    for method in ("sft", "dpo"):
        asked = {**SFT_THEN_DPO_REQUEST, "preference_dataset": None, "hyperparameters": {"method": method}}
        assert TrainingRequested.model_validate(asked).preference_dataset is None
