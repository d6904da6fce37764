"""A service's own spans: event ids that stay what they were, and one trace per retraining derived from its
correlation id, with the root span and one child per step of its path (job, evaluation, stage change)."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from contracts.events import (
    DatasetRef,
    EvaluationCompleted,
    MetricComparison,
    ModelTarget,
    SpanKind,
    SpanLogged,
    SpanStatus,
    Stage,
    StageChanged,
)
from services.evaluator.worker import evaluation_span
from services.feedback import otlp
from services.registry.adapters import stage_span
from services.runtime.spans import ROOT_STEP, RetrainingTrace, publish_span, service_span_event_id, span_event_id

pytestmark = pytest.mark.unit

AT = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


def test_a_retraining_trace_is_a_function_of_its_correlation_id_alone() -> None:
    trace = RetrainingTrace("alert-7f3a")
    assert re.fullmatch(r"[0-9a-f]{32}", trace.trace_id) and set(trace.trace_id) != {"0"}
    assert RetrainingTrace("alert-7f3a").trace_id == trace.trace_id, "every service derives the same trace"
    assert RetrainingTrace("alert-7f3b").trace_id != trace.trace_id
    steps = [ROOT_STEP, "training/retrain-alert-7f3a", "evaluation/auto-acme-v2", "evaluation/auto-acme-v3"]
    ids = [trace.span_id(step) for step in steps]
    assert all(re.fullmatch(r"[0-9a-f]{16}", span_id) and set(span_id) != {"0"} for span_id in ids)
    assert len(set(ids)) == len(ids) and trace.root_span_id == ids[0]
    # The same step of another retraining is another span, even where job ids repeat across traces.
    assert RetrainingTrace("alert-7f3b").span_id("training/retrain-alert-7f3a") != ids[1]


def test_the_root_has_no_parent_and_every_step_is_its_child() -> None:
    trace = RetrainingTrace("alert-1")
    common = {"kind": SpanKind.chain, "service_name": "flywheel-test", "started_at": AT}
    root = trace.span(ROOT_STEP, name="retraining acme", ended_at=AT + timedelta(seconds=1), **common)
    step = trace.span("training/job-1", name="train job-1", ended_at=AT, error="out of memory", **common)
    assert (root.parent_span_id, root.status, root.error) == (None, SpanStatus.ok, None)
    assert (step.parent_span_id, step.trace_id) == (root.span_id, root.trace_id)
    assert (step.status, step.error) == (SpanStatus.error, "out of memory")
    assert step.attributes["flywheel.correlation_id"] == "alert-1"
    # A clock that stepped back never makes a span the contract refuses.
    backwards = trace.span("training/job-2", name="train job-2", ended_at=AT - timedelta(seconds=5), **common)
    assert backwards.ended_at == backwards.started_at


def test_span_event_ids_are_the_ones_each_emitter_stored_before() -> None:
    span = RetrainingTrace("alert-1").span(
        ROOT_STEP, name="r", kind=SpanKind.chain, service_name="s", started_at=AT, ended_at=AT
    )
    gateway_namespace = uuid.UUID("3b0d8f44-6f5e-4c1e-9a63-2f0a4c7d9e15")
    assert service_span_event_id(span) == uuid.uuid5(gateway_namespace, f"{span.trace_id}/{span.span_id}")
    otlp_namespace = uuid.UUID("6f1d4c1e-3a0b-5c57-9a7e-2f8d6b1c0e11")
    for principal in ("app-1", None):
        sent = span.model_copy(update={"principal": principal})
        expected = uuid.uuid5(otlp_namespace, f"{principal}/{span.trace_id}/{span.span_id}")
        assert (
            otlp.span_event_id(sent)
            == expected
            == span_event_id(otlp_namespace, principal, span.trace_id, span.span_id)
        )


def test_an_evaluation_span_carries_the_verdict_and_the_scores() -> None:
    result = EvaluationCompleted(
        evaluation_id="auto-acme-v2",
        candidate=ModelTarget(model_name="acme", adapter_version=2),
        baseline=ModelTarget(model_name="acme", adapter_version=1),
        golden=DatasetRef(name="acme-golden", version=3),
        passed=False,
        reasons=["FAIL token_f1: -0.04 [-0.08, -0.01] below 0", "POLICY default@v1 (configured)"],
        gate_policy="default@v1",
        metrics=[MetricComparison(metric="token_f1", candidate=0.41, baseline=0.45, examples=20)],
    )
    span = evaluation_span(result, "alert-1", AT, AT + timedelta(seconds=90))
    trace = RetrainingTrace("alert-1")
    assert (span.trace_id, span.parent_span_id) == (trace.trace_id, trace.root_span_id)
    assert span.span_id == trace.span_id("evaluation/auto-acme-v2")
    # A failed gate is the evaluation's outcome, not an error of the evaluation.
    assert (span.kind, span.status, span.adapter_version) == (SpanKind.evaluator, SpanStatus.ok, 2)
    assert span.attributes["flywheel.gate.passed"] == "false"
    assert span.attributes["flywheel.baseline"] == "acme:v1" and span.attributes["flywheel.golden"] == "acme-golden:v3"
    assert span.attributes["flywheel.score.token_f1.candidate"] == "0.41"
    assert span.attributes["flywheel.score.token_f1.baseline"] == "0.45"
    assert span.output_text.splitlines()[0].startswith("FAIL token_f1")

    crashed = result.model_copy(update={"status": "failed", "error": None, "metrics": []})
    assert evaluation_span(crashed, "alert-1", AT, AT).status is SpanStatus.error


async def test_a_span_the_broker_refuses_is_logged_and_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    span = RetrainingTrace("alert-1").span(
        ROOT_STEP, name="retraining acme", kind=SpanKind.chain, service_name="s", started_at=AT, ended_at=AT
    )
    sent: list[tuple[SpanLogged, str | None, uuid.UUID]] = []

    async def refuse(payload: SpanLogged, *, correlation_id: str | None, event_id: uuid.UUID) -> None:
        sent.append((payload, correlation_id, event_id))
        raise ConnectionError("broker unreachable")

    await publish_span(refuse, span, correlation_id="alert-1")
    assert sent == [(span, "alert-1", service_span_event_id(span))]
    assert "span retraining acme of trace" in caplog.text and "ConnectionError" in caplog.text


async def test_a_broker_that_does_not_answer_holds_the_worker_no_longer_than_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    span = RetrainingTrace("alert-1").span(
        ROOT_STEP, name="retraining acme", kind=SpanKind.chain, service_name="s", started_at=AT, ended_at=AT
    )

    async def hang(payload: SpanLogged, *, correlation_id: str | None, event_id: uuid.UUID) -> None:
        await asyncio.Event().wait()

    await asyncio.wait_for(publish_span(hang, span, correlation_id="alert-1", timeout_s=0.05), 5)
    assert "TimeoutError" in caplog.text


def test_a_stage_change_is_an_instant_in_its_adapters_retraining() -> None:
    changed = StageChanged(
        model_name="acme",
        adapter_version=2,
        from_stage=Stage.staging,
        to_stage=Stage.production,
        actor="olga",
        reason="beats v1",
        canary_percent=10,
        approver="pat",
    )
    span = stage_span(changed, "alert-1", step="stage/abc", at=AT, gate_evaluation="auto-acme-v2")
    trace = RetrainingTrace("alert-1")
    assert (span.trace_id, span.span_id, span.parent_span_id) == (
        trace.trace_id,
        trace.span_id("stage/abc"),
        trace.root_span_id,
    )
    assert (span.name, span.started_at, span.ended_at, span.adapter_version) == (
        "promote acme:v2 to production",
        AT,
        AT,
        2,
    )
    assert {key: value for key, value in span.attributes.items() if key != "flywheel.correlation_id"} == {
        "flywheel.from_stage": "staging",
        "flywheel.to_stage": "production",
        "flywheel.actor": "olga",
        "flywheel.approver": "pat",
        "flywheel.reason": "beats v1",
        "flywheel.canary_percent": "10",
        "flywheel.gate.evaluation_id": "auto-acme-v2",
    }
