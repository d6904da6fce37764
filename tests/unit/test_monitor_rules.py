"""Alert rules as loaded from YAML: span rules (a `spans:` selector with a span metric) beside the rules
over inferences, which keep their meaning; every rule that cannot run is refused with its reason."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.events import AlertRaised, SpanKind, SpanSelector
from services.monitor.rules import DEFAULT_RULES, SPAN_METRICS, RuleError, load_rules, parse_rules

pytestmark = pytest.mark.unit


def rule(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "version": 1, "threshold": 1, **fields}


def test_default_rules_are_about_inferences_per_model_and_adapter_as_before() -> None:
    rules = load_rules(DEFAULT_RULES)
    assert rules and all(r.spans is None and r.spec.source == "inference" for r in rules)
    assert {r.scope for r in rules} == {("model_name", "adapter_version")}


def test_a_span_rule_selects_spans_by_kind_name_or_prefix_and_service_and_judges_them_together() -> None:
    slow, errors, cost, everything = parse_rules(
        [
            rule(name="slow-retrieve", metric="span_latency_p95_ms", spans={"name": "retrieve"}, threshold=500),
            rule(name="tool-errors", metric="span_error_rate", spans={"kind": "tool", "name": "search.*"}),
            rule(
                name="llm-cost",
                metric="span_cost_usd_sum",
                spans={"kind": "llm", "service": "rag-app"},
                scope=["model_name"],
                window_s=3600,
            ),
            rule(name="any-span-errors", metric="span_error_rate", spans={}),
        ]
    )
    assert slow.spans is not None and slow.spans.name == "retrieve" and slow.spans.name_prefix is None
    assert slow.scope == () and slow.expression == "quantile(0.95)(duration_ms)"
    assert errors.spans is not None and errors.spans.kind is SpanKind.tool and errors.spans.name_prefix == "search."
    assert cost.scope == ("model_name",) and cost.spec.samples == "count(cost_usd)"
    assert everything.spans is not None and everything.spans.describe() == "all spans"
    assert errors.spans.describe() == "spans kind=tool name=search.*"
    assert not any(r.is_quality for r in (slow, errors, cost, everything))


def test_span_metrics_cover_latency_errors_cost_and_tokens() -> None:
    assert set(SPAN_METRICS) == {
        "span_latency_p50_ms",
        "span_latency_p95_ms",
        "span_latency_p99_ms",
        "span_error_rate",
        "span_cost_usd_sum",
        "span_cost_usd_mean",
        "span_tokens_sum",
    }


def test_a_span_rule_in_mode_against_baseline_needs_its_baseline_window() -> None:
    with pytest.raises(RuleError, match=r"rule r: .*span_error_rate in mode against_baseline .*set baseline_window_s"):
        parse_rules([rule(metric="span_error_rate", spans={"kind": "tool"}, mode="against_baseline")])
    (ok,) = parse_rules(
        [rule(metric="span_error_rate", spans={"kind": "tool"}, mode="against_baseline", baseline_window_s=86400)]
    )
    assert ok.needs_baseline


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            {"metric": "span_latency_p95_ms"},
            r"rule r: rule: .*metric span_latency_p95_ms is about spans: say which with `spans:`",
        ),
        (
            {"metric": "latency_p95_ms", "spans": {"kind": "llm"}},
            r"rule r: rule: .*`spans:` is only for span metrics \(span_latency_p50_ms, .*\), not latency_p95_ms, "
            r"which is about inferences",
        ),
        (
            {"metric": "sql", "query": "avg(duration_ms)", "spans": {"kind": "llm"}},
            r"`spans:` is only for span metrics",
        ),
        ({"metric": "span_error_rate", "spans": {"nmae": "retrieve"}}, r"rule r: spans.nmae: Extra inputs"),
        ({"metric": "span_error_rate", "spans": {"kind": "database"}}, r"rule r: spans.kind: Input should be 'llm'"),
        ({"metric": "span_error_rate", "spans": {"name": "re*ve"}}, r"spans.name: .*`\*` may only end the name"),
        ({"metric": "span_error_rate", "spans": {"name": "**"}}, r"`\*` may only end the name"),
        ({"metric": "span_error_rate", "spans": {"name": "*"}}, r"spans.name: .*matches every span: leave name out"),
        ({"metric": "span_error_rate", "spans": {"name": "retrieve\n"}}, r"spans.name: .*control character"),
        ({"metric": "span_error_rate", "spans": {"name": ""}}, r"spans.name: String should have at least 1"),
        ({"metric": "span_error_rate", "spans": {"name": "x" * 257}}, r"spans.name: String should have at most 256"),
        ({"metric": "span_error_rate", "spans": {"service": ""}}, r"spans.service: String should have at least 1"),
        (
            {"metric": "span_error_rate", "spans": {"kind": "tool"}, "scope": ["model_name", "adapter_version"]},
            r"a span rule's scope is \[\] \(its spans together\) or \[model_name\]",
        ),
        (
            {"metric": "span_error_rate", "spans": {"kind": "tool"}, "quality": True},
            r"a span rule cannot be a quality rule",
        ),
        ({"metric": "error_rate", "scope": ["adapter_version"]}, r"scope must include model_name"),
        ({"metric": "error_rate", "scope": ["service_name"]}, r"rule r: scope: .*scope must be drawn from"),
    ],
)
def test_a_rule_that_cannot_run_is_refused_with_the_reason(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(RuleError, match=reason):
        parse_rules([rule(**fields)])


def test_an_alert_without_spans_reads_as_before_and_one_with_them_round_trips() -> None:
    alert = {
        "alert_id": "a-1",
        "rule_name": "tool-errors",
        "rule_version": 1,
        "severity": "warning",
        "model_name": "",
        "metric": "span_error_rate",
        "value": 0.2,
        "threshold": 0.1,
        "window_start": "2026-03-01T12:00:00Z",
        "window_end": "2026-03-01T12:15:00Z",
        "message": "span_error_rate = 0.2 > 0.1 over 20 samples for spans kind=tool",
    }
    assert AlertRaised.model_validate(alert).spans is None
    spans = SpanSelector(kind=SpanKind.tool, name="search.*")
    sent = AlertRaised.model_validate({**alert, "spans": spans.model_dump(exclude_none=True)})
    assert AlertRaised.model_validate_json(sent.model_dump_json()).spans == spans
