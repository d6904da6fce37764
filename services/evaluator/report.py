"""The HTML report of one evaluation: verdict and reasons, metric bars with intervals, score distributions,
and the worst examples side by side. Plots are inline SVG, so the file is one self-contained artifact."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence

from contracts.events import EvaluationCompleted
from services.evaluator.golden import GoldenExample
from services.evaluator.suite import LOWER_IS_BETTER, TargetScores

DISTRIBUTION_METRICS = ("token_f1", "rouge_l", "groundedness", "bleu")
WORST = 10


def _svg(figure) -> str:  # noqa: ANN001 - a matplotlib Figure
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _bars(result: EvaluationCompleted) -> str:
    from matplotlib.figure import Figure

    rows = [
        m
        for m in result.metrics
        if m.difference is not None
        and m.ci_low is not None
        and m.metric not in ("latency_ms", "output_tokens", "perplexity")
    ]
    if not rows:
        return "<p>No paired metrics to plot.</p>"
    figure = Figure(figsize=(9, 0.5 * len(rows) + 1.5))
    left, right = figure.subplots(1, 2, sharey=True)
    names = [m.metric for m in rows]
    y = list(range(len(rows)))
    left.barh([v - 0.2 for v in y], [m.baseline or 0.0 for m in rows], height=0.4, label="baseline", color="#9aa5b1")
    left.barh([v + 0.2 for v in y], [m.candidate for m in rows], height=0.4, label="candidate", color="#2b6cb0")
    left.set_yticks(y, names)
    left.set_title("mean score")
    left.legend(loc="lower right", fontsize=8)
    differences = [m.difference for m in rows]
    errors = [[m.difference - m.ci_low for m in rows], [m.ci_high - m.difference for m in rows]]
    better = [(d > 0) != (m.metric in LOWER_IS_BETTER) for d, m in zip(differences, rows, strict=True)]
    right.barh(y, differences, xerr=errors, color=["#38a169" if b else "#e53e3e" for b in better], capsize=4)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_title("candidate − baseline (95% CI)")
    return _svg(figure)


def _distributions(candidate: TargetScores, baseline: TargetScores | None) -> str:
    from matplotlib.figure import Figure

    metrics = [m for m in DISTRIBUTION_METRICS if m in candidate.scores]
    if not metrics:
        return ""
    figure = Figure(figsize=(3.2 * len(metrics), 2.8))
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    bins = [i / 10 for i in range(11)]
    for axis, metric in zip(axes, metrics, strict=True):
        if baseline is not None and metric in baseline.scores:
            axis.hist(
                [v for v in baseline.scores[metric] if v is not None],
                bins=bins,
                alpha=0.6,
                label="baseline",
                color="#9aa5b1",
            )
        axis.hist(
            [v for v in candidate.scores[metric] if v is not None],
            bins=bins,
            alpha=0.6,
            label="candidate",
            color="#2b6cb0",
        )
        axis.set_title(metric)
        axis.legend(fontsize=7)
    return _svg(figure)


def _worst(
    primary: str, examples: Sequence[GoldenExample], candidate: TargetScores, baseline: TargetScores | None
) -> str:
    scores = candidate.scores.get(primary, [])
    base = baseline.scores.get(primary, []) if baseline else []

    def key(i: int) -> float:
        c = scores[i] if i < len(scores) and scores[i] is not None else -1.0
        b = base[i] if i < len(base) and base[i] is not None else 0.0
        return c - b if baseline else c

    order = sorted(range(len(examples)), key=key)[:WORST]
    cells = []
    for i in order:
        example = examples[i]
        c = scores[i] if i < len(scores) else None
        b = base[i] if i < len(base) else None
        cells.append(
            "<tr>"
            f"<td>{html.escape(example.example_id)}</td><td>{html.escape(example.question)}</td><td>{html.escape(example.reference)}</td>"
            f"<td>{html.escape(baseline.predictions[i]) if baseline else ''}<br><small>{primary} {_fmt(b)}</small></td>"
            f"<td>{html.escape(candidate.predictions[i])}<br><small>{primary} {_fmt(c)}</small></td>"
            "</tr>"
        )
    return f"<table class='worst'><tr><th>id</th><th>question</th><th>reference</th><th>baseline</th><th>candidate</th></tr>{''.join(cells)}</table>"


def _fmt(value: float | None) -> str:
    return "error" if value is None else f"{value:.3f}"


def _target(target) -> str:  # noqa: ANN001 - a ModelTarget or None
    if target is None:
        return "none"
    prompt = f" + prompt {target.prompt_name}:v{target.prompt_version}" if target.prompt_name else ""
    return html.escape(
        target.model_name + (f":v{target.adapter_version}" if target.adapter_version else " (base)") + prompt
    )


def render_report(
    result: EvaluationCompleted,
    examples: Sequence[GoldenExample],
    candidate: TargetScores,
    baseline: TargetScores | None,
    *,
    primary: str,
) -> str:
    verdict = "PASSED" if result.passed else "FAILED"
    colour = "#276749" if result.passed else "#9b2c2c"
    metric_rows = "".join(
        f"<tr><td>{html.escape(m.metric)}</td><td>n/a</td><td>n/a</td><td></td><td></td><td>0</td><td>0</td></tr>"
        if m.examples == 0 and m.errors == 0  # applies to no example (format validity without schemas)
        else f"<tr><td>{html.escape(m.metric)}</td><td>{_fmt(m.baseline)}</td><td>{_fmt(m.candidate)}</td><td>{_fmt(m.difference)}</td>"
        f"<td>{'' if m.ci_low is None else f'[{m.ci_low:+.4f}, {m.ci_high:+.4f}]'}</td><td>{m.examples}</td><td>{m.errors}</td></tr>"
        for m in result.metrics
    )
    reasons = "".join(f"<li>{html.escape(reason)}</li>" for reason in result.reasons)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Evaluation {html.escape(result.evaluation_id)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}} .verdict{{color:{colour};font-size:1.6em}}
table.worst td{{max-width:260px}}</style></head><body>
<h1>Evaluation {html.escape(result.evaluation_id)}</h1>
<p class="verdict">Gate {verdict} — policy {html.escape(result.gate_policy)}</p>
<p>candidate <b>{_target(result.candidate)}</b> vs baseline <b>{_target(result.baseline)}</b> on golden set
<b>{html.escape(result.golden.name)} v{result.golden.version}</b> ({len(examples)} examples)</p>
<h2>Reasons</h2><ul>{reasons}</ul>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>baseline</th><th>candidate</th><th>difference</th><th>95% CI (paired bootstrap)</th><th>examples</th><th>errors</th></tr>{metric_rows}</table>
<h2>Metric bars with intervals</h2><div class="plot" id="bars">{_bars(result)}</div>
<h2>Score distributions</h2><div class="plot" id="distributions">{_distributions(candidate, baseline)}</div>
<h2>Worst examples ({html.escape(primary)}, candidate − baseline)</h2>{_worst(primary, examples, candidate, baseline)}
</body></html>
"""
