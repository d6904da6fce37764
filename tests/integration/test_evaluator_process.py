"""The evaluator in a process on the real broker: it learns the catalogue from registry events, evaluates
a new adapter version against the base model by itself, publishes evaluation.completed, and answers
its door with API keys."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from contracts.envelope import Envelope
from contracts.events import AdapterRegistered, DatasetPublished, EvaluationCompleted, ModelRegistered, ModelTarget
from contracts.http import Role
from services.evaluator.app import create_app
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.store import EvaluatorStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.service import Runtime, build_process
from services.runtime.settings import FlywheelSettings
from tests.evaluator_support import MODEL, golden_lines, random_adapter, tiny_base_dir
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.test_event_bus import eventually
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def test_a_registered_adapter_is_evaluated_and_the_result_published(
    settings: FlywheelSettings, chdb_target: ClickHouseTarget, tmp_path: Path
) -> None:
    clickhouse: ClickHouseStore = chdb_target.open()
    clickhouse.migrate()
    artifacts = ArtifactStore(settings.home / "artifacts")
    base = artifacts.put_directory(tiny_base_dir(tmp_path))
    adapter = artifacts.put_directory(random_adapter(tmp_path, seed=5))
    golden = artifacts.put_bytes("\n".join(golden_lines(4)).encode(), kind="jsonl")
    completed: list[Envelope[EvaluationCompleted]] = []

    def evaluator(runtime: Runtime):  # noqa: ANN202
        runtime.clickhouse = lambda: clickhouse  # chDB allows one data directory per process: the session's

        async def listen(envelope: Envelope[EvaluationCompleted]) -> None:
            completed.append(envelope)

        runtime.subscribe("test-listener", EvaluationCompleted, listen)
        return create_app(runtime, EvaluatorSettings(max_tokens=6, resamples=200))

    app, runtime = build_process(settings, [evaluator], title="flywheel-evaluator-test")
    operator, viewer = api_key(settings, Role.operator), api_key(settings, Role.viewer)
    async with app.router.lifespan_context(app):
        bus = runtime.bus("registry")
        await bus.publish(
            ModelRegistered(
                model_name=MODEL,
                source="test",
                architecture="LlamaForCausalLM",
                parameter_count=1,
                artifact_uri=base.uri,
                artifact_sha256=base.sha256,
            )
        )
        await bus.publish(
            DatasetPublished(
                dataset_name="acme-golden",
                version=1,
                split="golden",
                row_count=4,
                sha256=golden.sha256,
                artifact_uri=golden.uri,
                provenance="uploaded",
                model_name=MODEL,
            )
        )
        catalogue = EvaluatorStore(settings.home / "evaluator" / "evaluator.db")
        await eventually(
            lambda: catalogue.base_model(MODEL) is not None and catalogue.latest_golden(MODEL) is not None,
            what="the catalogue",
        )
        sent = await bus.publish(
            AdapterRegistered(
                model_name=MODEL, adapter_version=1, artifact_uri=adapter.uri, artifact_sha256=adapter.sha256
            )
        )

        await eventually(lambda: len(completed) == 1, timeout_s=180, what="evaluation.completed")
        event = completed[0].payload
        assert completed[0].correlation_id == sent.correlation_id
        assert (event.evaluation_id, event.status, event.candidate, event.baseline) == (
            "auto-tiny-smol-v1",
            "completed",
            ModelTarget(model_name=MODEL, adapter_version=1),
            ModelTarget(model_name=MODEL),
        )
        assert (
            event.gate_policy == "facts@v1" and event.reasons and event.report_uri
        )  # auto: every golden reference states a number
        assert {m.metric for m in event.metrics} >= {"token_f1", "groundedness", "unsafe_rate", "perplexity"}
        stored = clickhouse.query(
            "SELECT count() AS n FROM evaluation_result FINAL WHERE evaluation_id = 'auto-tiny-smol-v1'"
        )
        assert stored == [{"n": 2 * 4 * 12}]

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            body = {
                "candidate": {"model_name": MODEL, "adapter_version": 1},
                "golden": {"name": "acme-golden", "version": 1},
                "metric_suite": "fast",
            }
            assert (await client.post("/evaluator/v1/evaluations", json=body)).status_code == 401
            assert (
                await client.post("/evaluator/v1/evaluations", json=body, headers={"Authorization": f"Bearer {viewer}"})
            ).status_code == 403
            queued = await client.post(
                "/evaluator/v1/evaluations", json=body, headers={"Authorization": f"Bearer {operator}"}
            )
            assert queued.status_code == 202 and queued.json()["status"] == "queued"  # recorded before it is published
            evaluation_id = queued.json()["evaluation_id"]
            await eventually(lambda: len(completed) == 2, timeout_s=180, what="the requested evaluation")
            shown = (
                await client.get(
                    f"/evaluator/v1/evaluations/{evaluation_id}", headers={"Authorization": f"Bearer {viewer}"}
                )
            ).json()
            assert shown["status"] == "completed" and shown["result"]["evaluation_id"] == evaluation_id
            assert shown["request"]["requested_by"] == "test-operator"
            listed = (
                await client.get(
                    "/evaluator/v1/evaluations",
                    params={"model_name": MODEL},
                    headers={"Authorization": f"Bearer {viewer}"},
                )
            ).json()
            assert [item["evaluation_id"] for item in listed["data"]] == [evaluation_id, "auto-tiny-smol-v1"]
            missing = await client.get("/evaluator/v1/evaluations/nope", headers={"Authorization": f"Bearer {viewer}"})
            assert missing.status_code == 404
        catalogue.close()
