"""What `flywheel demo` found, as a plain-text summary and a self-contained HTML page with inline SVG plots."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

PASSED, FAILED, NOT_REACHED = "passed", "failed", "not reached"


@dataclass
class Step:
    number: int
    title: str
    status: str = NOT_REACHED
    lines: list[str] = field(default_factory=list)
    reason: str | None = None
    seconds: float = 0.0
    reused: bool = False


@dataclass
class Evaluation:
    adapter_version: int
    evaluation_id: str
    baseline: str
    golden: str
    passed: bool
    gate_policy: str
    reasons: list[str]
    metrics: list[dict[str, Any]]
    report_path: str | None = None


@dataclass
class LoopReport:
    started_at: datetime
    home: str
    bootstrap: str = ""
    http: str = ""
    steps: list[Step] = field(default_factory=list)
    training: dict[int, dict[str, Any]] = field(default_factory=dict)
    evaluations: list[Evaluation] = field(default_factory=list)
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)
    stored_inferences: dict[str, int] = field(default_factory=dict)
    feedback: dict[str, int] = field(default_factory=dict)
    alert: dict[str, Any] | None = None
    retraining: dict[str, Any] | None = None
    production: str = "-"
    audit: list[str] = field(default_factory=list)
    cleanup: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def step(self, number: int, title: str) -> Step:
        step = Step(number, title)
        self.steps.append(step)
        return step

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.status == PASSED for step in self.steps)

    def to_text(self) -> str:
        out = [
            f"Flywheel demo - the loop - {self.started_at:%Y-%m-%d %H:%M:%S} UTC, {self.seconds:.0f} s",
            f"home: {self.home}",
            f"kafka: {self.bootstrap}; http: {self.http}",
            "",
        ]
        for step in self.steps:
            mark = {PASSED: "PASS", FAILED: "FAIL"}.get(step.status, "----")
            out.append(
                f"[{mark}] step {step.number}: {step.title} ({step.seconds:.0f} s{', reused' if step.reused else ''})"
            )
            out.extend(f"       {line}" for line in step.lines)
            if step.reason:
                out.append(f"       reason: {step.reason}")
        out.append("")
        for evaluation in self.evaluations:
            verdict = "PASS" if evaluation.passed else "FAIL"
            out.append(
                f"gate adapter v{evaluation.adapter_version} vs {evaluation.baseline} on {evaluation.golden} ({evaluation.gate_policy}): {verdict} [{evaluation.evaluation_id}]"
            )
            out.extend(f"       {reason}" for reason in evaluation.reasons)
        for phase, routes in self.traffic.items():
            out.append(f"traffic {phase}: " + ", ".join(f"{name} {count}" for name, count in sorted(routes.items())))
        if self.stored_inferences:
            out.append(
                "stored in ClickHouse: "
                + ", ".join(f"{name} {value}" for name, value in self.stored_inferences.items())
            )
        if self.feedback:
            out.append("feedback: " + ", ".join(f"{name} {value}" for name, value in self.feedback.items()))
        if self.alert:
            out.append(
                f"alert: {self.alert.get('rule_name')} {self.alert.get('metric')} = {float(self.alert.get('value', 0)):.3f} > {self.alert.get('threshold')} ({self.alert.get('alert_id')})"
            )
        if self.retraining:
            out.append("retraining: " + ", ".join(f"{name} {value}" for name, value in self.retraining.items()))
        out.extend(f"audit: {line}" for line in self.audit)
        out.append(f"final production version: {self.production}")
        out.extend(f"cleanup: {line}" for line in self.cleanup)
        out.append(f"result: {'every step passed' if self.ok else 'not every step passed (see FAIL and ---- lines)'}")
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        e = html.escape
        rows = "".join(
            f"<tr class='{step.status.replace(' ', '-')}'><td>{step.number}</td><td>{e(step.title)}</td><td>{e(step.status)}{' (reused)' if step.reused else ''}</td>"
            f"<td>{step.seconds:.0f} s</td><td>{'<br>'.join(e(line) for line in step.lines)}{('<br><b>reason:</b> ' + e(step.reason)) if step.reason else ''}</td></tr>"
            for step in self.steps
        )
        gates = ""
        for evaluation in self.evaluations:
            bars = [
                (
                    metric["metric"],
                    float(metric["candidate"]),
                    float(metric["baseline"]) if metric.get("baseline") is not None else None,
                )
                for metric in evaluation.metrics
                if metric["metric"]
                in ("token_f1", "fact_numbers", "rouge_l", "groundedness", "hallucination_rate", "exact_match")
            ]
            intervals = "".join(
                f"<tr><td>{e(metric['metric'])}</td><td>{_num(metric.get('baseline'))}</td><td>{_num(metric['candidate'])}</td><td>{_num(metric.get('difference'))}</td>"
                f"<td>[{_num(metric.get('ci_low'))}, {_num(metric.get('ci_high'))}]</td><td>{metric.get('examples')}</td></tr>"
                for metric in evaluation.metrics
            )
            link = f" <a href='{e(evaluation.report_path)}'>full evaluator report</a>" if evaluation.report_path else ""
            gates += (
                f"<h3>adapter v{evaluation.adapter_version} vs {e(evaluation.baseline)} on {e(evaluation.golden)}: "
                f"{'PASS' if evaluation.passed else 'FAIL'} ({e(evaluation.gate_policy)}){link}</h3>"
                + _grouped_bars(bars, ("baseline", "candidate"))
                + "<ul>"
                + "".join(f"<li>{e(reason)}</li>" for reason in evaluation.reasons)
                + "</ul>"
                + f"<table><tr><th>metric</th><th>baseline</th><th>candidate</th><th>difference</th><th>95% CI</th><th>n</th></tr>{intervals}</table>"
            )
        traffic = "".join(
            f"<h3>{e(phase)}</h3>" + _bars(sorted(routes.items())) for phase, routes in self.traffic.items()
        )
        feedback = _bars(sorted(self.feedback.items())) if self.feedback else "<p>none</p>"
        alert = e(str(self.alert)) if self.alert else "none"
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>Flywheel demo</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;text-align:left}}tr.passed td:nth-child(3){{color:#070}}
tr.failed td:nth-child(3){{color:#b00;font-weight:bold}}tr.not-reached td:nth-child(3){{color:#888}}</style></head><body>
<h1>Flywheel demo: the loop</h1><p>{self.started_at:%Y-%m-%d %H:%M:%S} UTC, {self.seconds:.0f} s; home {e(self.home)}; kafka {e(self.bootstrap)}</p>
<p><b>final production version: {e(self.production)}</b>; {"every step passed" if self.ok else "not every step passed"}</p>
<h2>Steps</h2><table><tr><th>#</th><th>step</th><th>status</th><th>time</th><th>what happened</th></tr>{rows}</table>
<h2>Gate decisions</h2>{gates or "<p>none</p>"}
<h2>Traffic served (by the version that answered)</h2>{traffic or "<p>none</p>"}
<h2>Feedback collected</h2>{feedback}
<h2>Alert and retraining</h2><p>{alert}</p><p>{e(str(self.retraining or "none"))}</p>
<h2>Audit (approvals)</h2><ul>{"".join(f"<li>{e(line)}</li>" for line in self.audit)}</ul>
<h2>Cleanup</h2><ul>{"".join(f"<li>{e(line)}</li>" for line in self.cleanup)}</ul>
</body></html>
"""


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _bars(items: list[tuple[str, int | float]], width: int = 520) -> str:
    """A horizontal bar chart as inline SVG: one bar per (label, value)."""
    if not items:
        return ""
    top = max(float(value) for _, value in items) or 1.0
    height = 22 * len(items) + 6
    bars = "".join(
        f"<text x='0' y='{22 * i + 16}' font-size='12'>{html.escape(label)}</text>"
        f"<rect x='180' y='{22 * i + 4}' width='{max(1.0, (width - 240) * float(value) / top):.1f}' height='16' fill='#4a7bd0'/>"
        f"<text x='{185 + (width - 240) * float(value) / top:.1f}' y='{22 * i + 16}' font-size='12'>{value}</text>"
        for i, (label, value) in enumerate(items)
    )
    return f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>{bars}</svg>"


def _grouped_bars(items: list[tuple[str, float, float | None]], legend: tuple[str, str], width: int = 520) -> str:
    """Baseline and candidate means side by side per metric (all metrics here lie in [0, 1])."""
    if not items:
        return ""
    span = width - 240
    height = 40 * len(items) + 24
    parts = [
        f"<text x='180' y='12' font-size='11' fill='#999'>{legend[0]}</text><text x='260' y='12' font-size='11' fill='#4a7bd0'>{legend[1]}</text>"
    ]
    for i, (label, candidate, baseline) in enumerate(items):
        y = 40 * i + 20
        parts.append(f"<text x='0' y='{y + 16}' font-size='12'>{html.escape(label)}</text>")
        if baseline is not None:
            parts.append(
                f"<rect x='180' y='{y}' width='{max(1.0, span * min(baseline, 1.0)):.1f}' height='14' fill='#bbb'/><text x='{184 + span * min(baseline, 1.0):.1f}' y='{y + 12}' font-size='11'>{baseline:.3f}</text>"
            )
        parts.append(
            f"<rect x='180' y='{y + 16}' width='{max(1.0, span * min(candidate, 1.0)):.1f}' height='14' fill='#4a7bd0'/><text x='{184 + span * min(candidate, 1.0):.1f}' y='{y + 28}' font-size='11'>{candidate:.3f}</text>"
        )
    return f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg>"
