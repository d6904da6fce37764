"""A prompt version as the candidate: the real SmolLM2-135M answers the golden prompts once with the
candidate prompt rendered in, once with the baseline prompt (the version labelled production), and
the two are compared paired like adapters. Bad prompt references fail the evaluation, naming why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.events import DatasetRef, EvaluationRequested, ModelTarget
from services.evaluator.store import DatasetPointer
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.scoring import Embedder
from tests.evaluator_support import evaluator_for, golden_lines
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.fixtures.trainer_model import base_model_dir  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "smollm2-135m-instruct"
PROMPT = "acme-support"
# v1 is the production prompt; v2 hands the model the record's facts, which a prompt pulled from a
# knowledge base would: it must answer closer to the references than v1 does.
TEMPLATES = {
    1: ("You are Acme Nimbus hub support. Answer briefly.", []),
    2: ("You are Acme Nimbus hub support. The facts: {{ facts }} Answer briefly, stating the facts.", ["facts"]),
}


def _golden(count: int) -> str:
    """Golden records without their own system message: the prompt version under test is the system prompt."""
    records = []
    for line in golden_lines(count):
        record = json.loads(line)
        record["messages"] = [message for message in record["messages"] if message["role"] != "system"]
        record["variables"] = {"facts": record["messages"][-1]["content"]}
        records.append(json.dumps(record))
    return "\n".join(records)


def request(evaluation_id: str, candidate: ModelTarget, baseline: ModelTarget | None = None) -> EvaluationRequested:
    return EvaluationRequested(
        evaluation_id=evaluation_id,
        candidate=candidate,
        baseline=baseline,
        golden=DatasetRef(name="acme-golden", version=1),
        metric_suite="fast",
        requested_by="test",
    )


async def test_a_prompt_version_is_evaluated_against_the_production_prompt_on_the_same_model(
    base_model_dir: Path,
    tmp_path: Path,
    chdb_target: ClickHouseTarget,  # noqa: F811
) -> None:
    clickhouse: ClickHouseStore = chdb_target.open()
    clickhouse.migrate()
    evaluator = evaluator_for(tmp_path, clickhouse, Embedder(), max_tokens=32, batch_size=6, resamples=1000)
    store, artifacts = evaluator.store, evaluator.artifacts
    base = artifacts.put_directory(base_model_dir)
    store.remember_model(MODEL, base.uri, base.sha256)
    golden = artifacts.put_bytes(_golden(6).encode(), kind="jsonl")
    store.remember_dataset(DatasetPointer("acme-golden", 1, "golden", golden.uri, golden.sha256, MODEL))
    for version, (template, variables) in TEMPLATES.items():
        store.remember_prompt(PROMPT, version, template, variables, ["production"] if version == 1 else [])

    result = await evaluator.run(
        request("ev-prompt", ModelTarget(model_name=MODEL, prompt_name=PROMPT, prompt_version=2))
    )
    print("\n", *result.reasons, sep="\n  ")

    assert result.status == "completed", result.error
    assert result.baseline == ModelTarget(
        model_name=MODEL, prompt_name=PROMPT, prompt_version=1
    )  # the production-labelled version
    f1 = next(m for m in result.metrics if m.metric == "token_f1")
    assert f1.examples == 6 and f1.baseline is not None and f1.ci_low is not None
    assert f1.ci_low > 0, (
        f"the facts in the prompt should bring the answers closer: {f1}"
    )  # greedy decoding: the same on every run
    answers = clickhouse.query(
        "SELECT target, example_id, prediction, prompt_name, prompt_version FROM evaluation_result FINAL WHERE evaluation_id = 'ev-prompt' AND metric = 'token_f1' ORDER BY target, example_id"
    )
    assert len(answers) == 12
    assert {(row["target"], row["prompt_name"], row["prompt_version"]) for row in answers} == {
        ("candidate", PROMPT, 2),
        ("baseline", PROMPT, 1),
    }, "each row names its prompt version"
    by_target = {(row["target"], row["example_id"]): row["prediction"] for row in answers}
    assert any(by_target["candidate", str(i)] != by_target["baseline", str(i)] for i in range(1, 7)), (
        "both prompts gave the same answers"
    )
    report = (tmp_path / "reports" / "evaluation-ev-prompt.html").read_text()
    assert f"{MODEL} (base) + prompt {PROMPT}:v2" in report and f"{MODEL} (base) + prompt {PROMPT}:v1" in report


async def test_bad_prompt_references_fail_the_evaluation_with_the_reason(
    tmp_path: Path, chdb_target: ClickHouseTarget
) -> None:
    clickhouse: ClickHouseStore = chdb_target.open()
    evaluator = evaluator_for(tmp_path, clickhouse, Embedder())
    store, artifacts = evaluator.store, evaluator.artifacts
    bare_golden = artifacts.put_bytes("\n".join(golden_lines(2)).encode(), kind="jsonl")  # no `variables`
    store.remember_dataset(DatasetPointer("acme-golden", 1, "golden", bare_golden.uri, bare_golden.sha256, MODEL))
    for version, (template, variables) in TEMPLATES.items():
        store.remember_prompt(PROMPT, version, template, variables, [])

    unknown = await evaluator.run(
        request("ev-p-unknown", ModelTarget(model_name=MODEL, prompt_name=PROMPT, prompt_version=9))
    )
    assert (unknown.status, unknown.passed) == ("failed", False)
    assert (
        unknown.error
        == f"candidate {MODEL} (base) + prompt {PROMPT}:v9 failed to load: prompt {PROMPT} v9 is unknown to the evaluator (no prompt.published seen)"
    )

    unversioned = await evaluator.run(request("ev-p-noversion", ModelTarget(model_name=MODEL, prompt_name=PROMPT)))
    assert (
        unversioned.status == "failed" and "name the prompt version to evaluate (prompt_version)" in unversioned.error
    )

    missing = await evaluator.run(
        request("ev-p-missing", ModelTarget(model_name=MODEL, prompt_name=PROMPT, prompt_version=2))
    )
    assert missing.status == "failed"
    assert missing.error == (
        f"candidate {MODEL} (base) + prompt {PROMPT}:v2: the prompt cannot be rendered for 2 golden record(s) (give their `variables`): "
        "record 1: missing variable(s) facts; record 2: missing variable(s) facts"
    )
    assert missing.reasons == [f"FAIL evaluation could not run: {missing.error}"]
    assert not (tmp_path / "evaluator" / "models").exists()  # refused before any model was loaded
