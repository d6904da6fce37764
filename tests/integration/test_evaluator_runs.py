"""Whole evaluations on a tiny random model: results in chDB, the HTML report, and every bad input a
clear failed evaluation or a per-example error, never a pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.events import DatasetRef, EvaluationRequested, ModelTarget
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.scoring import Embedder
from tests.evaluator_support import (
    MODEL,
    evaluator_for,
    golden_lines,
    random_adapter,
    register,
    tiny_base_dir,
    with_schema,
)
from tests.fixtures.clickhouse import ClickHouseTarget

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluator-models")
    return {"base": tiny_base_dir(root), "adapter": random_adapter(root, seed=3)}


@pytest.fixture
def clickhouse(chdb_target: ClickHouseTarget) -> ClickHouseStore:
    store = chdb_target.open()
    store.migrate()
    return store


def request(
    evaluation_id: str, *, adapter: int | None = 1, golden: int = 1, suite: str = "default"
) -> EvaluationRequested:
    return EvaluationRequested(
        evaluation_id=evaluation_id,
        candidate=ModelTarget(model_name=MODEL, adapter_version=adapter),
        golden=DatasetRef(name="acme-golden", version=golden),
        metric_suite=suite,
        requested_by="test",
    )


async def test_an_evaluation_scores_both_targets_stores_rows_and_writes_the_report(
    tmp_path: Path, clickhouse: ClickHouseStore, embedder: Embedder, models: dict
) -> None:
    evaluator = evaluator_for(tmp_path, clickhouse, embedder)
    golden = "\n".join([*golden_lines(5), with_schema(golden_lines(6)[-1], {"type": "object"})])
    register(evaluator, models["base"], adapters={1: models["adapter"]}, golden={1: golden})

    result = await evaluator.run(request("ev-full"))

    assert result.status == "completed", result.error
    assert result.baseline == ModelTarget(model_name=MODEL)  # nothing in production: the base model
    metrics = {m.metric: m for m in result.metrics}
    assert set(metrics) == {
        "exact_match",
        "token_f1",
        "bleu",
        "rouge_l",
        "fact_numbers",
        "perplexity",
        "format_validity",
        "groundedness",
        "hallucination_rate",
        "unsafe_rate",
        "latency_ms",
        "output_tokens",
    }
    assert metrics["token_f1"].examples == 6 and metrics["token_f1"].ci_low is not None
    assert metrics["format_validity"].examples == 1  # only the record that asks for JSON
    assert metrics["perplexity"].candidate > 1000  # a random model is lost on real text
    # Every reference states a number: with no policy declared, the factual policy applies.
    assert result.gate_policy == "facts@v1"
    assert result.reasons[-1].startswith("POLICY facts@v1 (auto: 6/6 golden references state numbers (at least 50%))")
    assert not result.passed and result.reasons[0].startswith(("FAIL token_f1", "PASS token_f1"))

    rows = clickhouse.query(
        "SELECT target, count() AS n, countIf(error IS NOT NULL) AS errors FROM evaluation_result FINAL WHERE evaluation_id = 'ev-full' GROUP BY target ORDER BY target"
    )
    assert rows == [{"target": "baseline", "n": 6 * 12, "errors": 0}, {"target": "candidate", "n": 6 * 12, "errors": 0}]
    versions = clickhouse.query(
        "SELECT DISTINCT target, adapter_version FROM evaluation_result WHERE evaluation_id = 'ev-full' ORDER BY target"
    )
    assert versions == [{"target": "baseline", "adapter_version": None}, {"target": "candidate", "adapter_version": 1}]

    report = (tmp_path / "reports" / "evaluation-ev-full.html").read_text()
    assert evaluator.artifacts.get_bytes(result.report_uri).decode() == report
    assert report.count("<svg") == 2 and 'id="bars"' in report and 'id="distributions"' in report
    assert "Worst examples (token_f1, candidate − baseline)" in report and "Gate FAILED" in report
    assert "factory reset the Nimbus hub" in report  # the questions are shown beside both answers


async def test_bad_inputs_fail_the_evaluation_with_the_reason(
    tmp_path: Path, clickhouse: ClickHouseStore, embedder: Embedder, models: dict
) -> None:
    evaluator = evaluator_for(tmp_path, clickhouse, embedder)
    no_reference = golden_lines(1)[0].replace('"role": "assistant"', '"role": "user"')
    register(
        evaluator,
        models["base"],
        golden={1: "\n\n", 2: "\n".join([golden_lines(1)[0], no_reference]), 3: "\n".join(golden_lines(2))},
    )

    empty = await evaluator.run(request("ev-empty", adapter=None))
    assert (empty.status, empty.passed) == ("failed", False)
    assert empty.error == "the golden set is empty: there is nothing to evaluate"

    unreferenced = await evaluator.run(request("ev-noref", adapter=None, golden=2))
    assert unreferenced.status == "failed"
    assert "line 2: no reference: the last message must be the assistant's (non-empty) answer" in unreferenced.error

    unknown = await evaluator.run(request("ev-unknown", adapter=9, golden=3))
    assert (
        unknown.status == "failed"
        and "candidate tiny-smol:v9 failed to load: adapter version 9 is unknown" in unknown.error
    )

    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": "not a rank"}')
    register(evaluator, models["base"], adapters={2: broken})
    unloadable = await evaluator.run(request("ev-broken", adapter=2, golden=3))
    assert unloadable.status == "failed" and unloadable.error.startswith(
        "adapter of candidate tiny-smol:v2 failed to load"
    )
    assert unloadable.reasons == [f"FAIL evaluation could not run: {unloadable.error}"]

    suite = await evaluator.run(request("ev-suite", adapter=None, golden=3, suite="nonsense"))
    assert suite.status == "failed" and "unknown metric suite 'nonsense'" in suite.error

    no_judge = await evaluator.run(request("ev-no-judge", adapter=None, golden=3, suite="judge"))
    assert no_judge.status == "failed" and "the `judge` suite needs a judge endpoint" in no_judge.error

    unknown_base = await evaluator.run(
        request("ev-no-base", adapter=None, golden=3).model_copy(update={"candidate": ModelTarget(model_name="nope")})
    )
    assert unknown_base.status == "failed"
    assert (
        unknown_base.error
        == "candidate nope (base) failed to load: base model 'nope' is unknown to the evaluator (no model.registered seen)"
    )


async def test_a_metric_erroring_on_one_example_is_recorded_on_that_example(
    tmp_path: Path, clickhouse: ClickHouseStore, embedder: Embedder, models: dict
) -> None:
    evaluator = evaluator_for(tmp_path, clickhouse, embedder)
    lines = golden_lines(3)
    lines[1] = with_schema(lines[1], {"type": "not-a-type"})  # the golden record's schema is itself invalid
    register(evaluator, models["base"], adapters={1: models["adapter"]}, golden={1: "\n".join(lines)})

    result = await evaluator.run(request("ev-metric-error", suite="fast"))

    assert result.status == "completed"
    validity = next(m for m in result.metrics if m.metric == "format_validity")
    assert (validity.examples, validity.errors) == (0, 1)
    error = clickhouse.query(
        "SELECT example_id, error FROM evaluation_result FINAL WHERE evaluation_id = 'ev-metric-error' AND target = 'candidate' AND error IS NOT NULL"
    )
    assert len(error) == 1 and error[0]["example_id"] == "2" and error[0]["error"].startswith("SchemaError")
