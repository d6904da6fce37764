"""A retraining is one trace: on the real broker, the real registry, trainer and evaluator in one process
and the real sink in embedded ClickHouse, a training request correlated by an alert id becomes the
trainer's job span, the evaluator's evaluation span and the registry's span of the adapter's stage change,
all children of the monitor's root span in the trace that id derives, as the trace readers
(services/monitor/traces.py) rebuild it.

The base model is the tiny random Llama the evaluator's tests use, so the job trains and the evaluation
scores in seconds; the registry learns it and the datasets through its door, as an operator adds them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from contracts.envelope import Envelope
from contracts.events import (
    AlertRaised,
    DatasetRef,
    EvaluationCompleted,
    Hyperparameters,
    Severity,
    SpanKind,
    TrainingRequested,
)
from services.evaluator.app import create_app as create_evaluator
from services.evaluator.settings import EvaluatorSettings
from services.monitor.retraining import retraining_root_span
from services.monitor.traces import spans_query
from services.runtime.span_tree import tree_order
from services.registry.app import create_app as create_registry
from services.runtime.artifacts import ArtifactStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.service import Runtime, Service, build_process
from services.runtime.settings import FlywheelSettings
from services.runtime.spans import ROOT_STEP, RetrainingTrace, service_span_event_id
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tests.evaluator_support import MODEL, golden_lines, tiny_base_dir
from tests.fixtures.trainer_model import DEMO_DATA
from tests.integration.test_event_bus import eventually
from tests.integration.test_sink_clickhouse import clickhouse, running_sink  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

ADMIN = "fw_boot_test-admin-secret-0123456789"
ALERT_ID = "alert-rating-0123456789ab"
JOB_ID = f"retrain-{ALERT_ID}"


def alert(now: datetime) -> AlertRaised:
    return AlertRaised(
        alert_id=ALERT_ID,
        rule_name="rating",
        rule_version=1,
        severity=Severity.warning,
        model_name=MODEL,
        adapter_version=None,
        metric="mean_rating",
        value=2.1,
        threshold=3.0,
        window_start=now - timedelta(minutes=15),
        window_end=now - timedelta(minutes=5),
        message="mean rating 2.1 < 3.0 over 15m",
    )


async def test_a_retraining_is_one_trace_from_its_request_to_the_gates_verdict(
    settings: FlywheelSettings,
    clickhouse: ClickHouseStore,  # noqa: F811
    tmp_path: Path,
) -> None:
    artifacts = ArtifactStore(settings.home / "artifacts")
    base = artifacts.put_directory(tiny_base_dir(tmp_path))
    train_rows = "".join((DEMO_DATA / "train.jsonl").read_text().splitlines(keepends=True)[:4])
    completed: list[Envelope[EvaluationCompleted]] = []

    def evaluator(runtime: Runtime) -> Service:
        runtime.clickhouse = lambda: clickhouse  # chDB allows one data directory per process: the session's

        async def listen(envelope: Envelope[EvaluationCompleted]) -> None:
            completed.append(envelope)

        runtime.subscribe("test-listener", EvaluationCompleted, listen)
        return create_evaluator(runtime, EvaluatorSettings(max_tokens=6, resamples=200))

    def trainer(runtime: Runtime) -> Service:
        return create_trainer(runtime, TrainerSettings(progress_every=1))

    settings = settings.model_copy(update={"bootstrap_admin_key": ADMIN})
    app, runtime = build_process(settings, [create_registry, trainer, evaluator], title="flywheel-retraining-test")
    async with running_sink(settings, clickhouse), app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as door:
            model = await door.post(
                "/registry/v1/models",
                json={
                    "name": MODEL,
                    "source": "test",
                    "architecture": "LlamaForCausalLM",
                    "parameter_count": 1,
                    "artifact_uri": base.uri,
                    "artifact_sha256": base.sha256,
                },
            )
            assert model.status_code == 201, model.text
            for name, split, jsonl in (
                ("acme-train", "train", train_rows),
                ("acme-golden", "golden", "\n".join(golden_lines(4)) + "\n"),
            ):
                dataset = await door.post(
                    "/registry/v1/datasets",
                    json={"name": name, "split": split, "jsonl": jsonl, "model_name": MODEL},
                )
                assert dataset.status_code == 201, dataset.text

        # What the monitor publishes when it answers the alert (tests/integration/test_monitor_retraining.py
        # shows it does): training.requested correlated by the alert id, and the root span of its trace.
        now = datetime.now(UTC)
        request = TrainingRequested(
            job_id=JOB_ID,
            model_name=MODEL,
            dataset=DatasetRef(name="acme-train", version=1),
            hyperparameters=Hyperparameters(rank=4, alpha=8, batch_size=2, epochs=1, max_seq_length=128, seed=1),
            requested_by="service:monitor",
        )
        monitor = runtime.bus("monitor")
        await monitor.publish(request, correlation_id=ALERT_ID)
        root = retraining_root_span(alert(now), request, now)
        await monitor.publish(root, correlation_id=ALERT_ID, event_id=service_span_event_id(root))

        await eventually(lambda: len(completed) == 1, timeout_s=300, what="the adapter's evaluation")
        evaluation = completed[0]
        assert evaluation.correlation_id == ALERT_ID, "the correlation id followed the adapter from its request"
        assert evaluation.payload.status == "completed", evaluation.payload.error
        # An operator stages the adapter: the registry records the stage change, and its span, in one transaction.
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as door:
            staged = await door.post(
                f"/registry/v1/adapters/{MODEL}/versions/1/transitions", json={"to_stage": "staging"}
            )
            assert staged.status_code == 200, staged.text

        trace = RetrainingTrace(ALERT_ID)
        sql, parameters = spans_query(trace.trace_id, limit=100, text_max=2000)

        def stored() -> list[dict]:
            return clickhouse.query(sql, parameters)

        await eventually(lambda: len(stored()) == 4, timeout_s=60, what="four spans in the retraining's trace")

    spans = [{**span, "attributes": dict(span["attributes"] or {})} for span in stored()]
    placed = tree_order(spans)
    assert [(p.span["name"], p.depth, p.parent_missing) for p in placed] == [
        (f"retraining {MODEL}", 0, False),
        (f"train {JOB_ID}", 1, False),
        (f"evaluate auto-{MODEL}-v1", 1, False),
        (f"stage {MODEL}:v1 to staging", 1, False),
    ]
    by_name = {p.span["name"].split()[0]: p.span for p in placed}
    retraining, train, evaluate, stage = (by_name[name] for name in ("retraining", "train", "evaluate", "stage"))
    assert retraining["span_id"] == trace.span_id(ROOT_STEP) and retraining["parent_span_id"] is None
    assert train["span_id"] == trace.span_id(f"training/{JOB_ID}")
    assert (train["kind"], train["service_name"], train["status"]) == (SpanKind.chain, "flywheel-trainer", "ok")
    assert train["attributes"]["flywheel.dataset"] == "acme-train:v1"
    assert train["attributes"]["flywheel.base_model"] == MODEL
    assert train["attributes"]["flywheel.steps"] == "2/2" and "flywheel.metric.final_loss" in train["attributes"]
    assert (evaluate["kind"], evaluate["service_name"], evaluate["status"]) == ("evaluator", "flywheel-evaluator", "ok")
    assert evaluate["adapter_version"] == 1, "the evaluation names the version the registry gave the trained adapter"
    verdict = evaluation.payload
    assert evaluate["attributes"]["flywheel.gate.passed"] == str(verdict.passed).lower()
    assert evaluate["attributes"]["flywheel.gate.policy"] == verdict.gate_policy
    token_f1 = next(metric for metric in verdict.metrics if metric.metric == "token_f1")
    assert evaluate["attributes"]["flywheel.score.token_f1.candidate"] == f"{token_f1.candidate:g}"
    assert evaluate["output_text"].splitlines() == verdict.reasons
    # Each span is timed by its own service, in the order the retraining ran.
    assert retraining["start_us"] <= train["start_us"] <= evaluate["start_us"]
    assert train["start_us"] + train["duration_ms"] * 1000 <= evaluate["start_us"]
    assert (stage["service_name"], stage["adapter_version"], stage["duration_ms"]) == ("flywheel-registry", 1, 0)
    assert (stage["attributes"]["flywheel.from_stage"], stage["attributes"]["flywheel.to_stage"]) == ("none", "staging")
    assert evaluate["start_us"] + evaluate["duration_ms"] * 1000 <= stage["start_us"]
