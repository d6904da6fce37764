"""What the monitor's console page shows, as values for its template (templates/console.html): the alerts,
per-version charts drawn by matplotlib as inline SVG, canaries under watch and the production adapter's lineage.
Sign-in, sessions, layout and CSRF are the runtime's console (services/runtime/console)."""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from markupsafe import Markup

from contracts.events import AlertState

DRIFT_KINDS = ("psi", "embedding", "unsafe", "hallucination")
# matplotlib's pyplot state is global; the console may render from several request threads.
_PLOT_LOCK = threading.Lock()

Lines = dict[str, tuple[list[datetime], list[float]]]


@dataclass(frozen=True)
class Chart:
    """One figure of the page: its caption (escaped by the template) and its SVG, or None when there is no data."""

    title: str
    svg: Markup | None


def _version(row: dict[str, Any]) -> str:
    adapter = row.get("adapter_version")
    prompt = row.get("prompt_version")
    label = f"{row['model_name']}:v{adapter}" if adapter is not None else f"{row['model_name']}:base"
    return label + (f" prompt v{prompt}" if prompt is not None else "")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _series(rows: Sequence[dict[str, Any]], column: str) -> Lines:
    series: Lines = {}
    for row in rows:
        value = row.get(column)
        if _missing(value):
            continue
        xs, ys = series.setdefault(_version(row), ([], []))
        xs.append(row["bucket"])
        ys.append(float(value))
    return series


def _drift(evaluations: Sequence[dict[str, Any]]) -> Lines:
    lines: Lines = {}
    for evaluation in evaluations:
        if evaluation["kind"] not in DRIFT_KINDS or _missing(evaluation["value"]):
            continue
        xs, ys = lines.setdefault(f"{evaluation['metric']} · {_version(evaluation)}", ([], []))
        xs.append(evaluation["window_end"])
        ys.append(float(evaluation["value"]))
    return lines


def _plain(label: str) -> str:
    """A legend label drawn as written: two `$` in a logged model name would otherwise be matplotlib's mathtext,
    and mathtext it cannot parse (`$\\foo$`) would fail the whole page."""
    return label.replace("$", r"\$")


def _chart(title: str, lines: Lines, ylabel: str, window: tuple[datetime, datetime]) -> Chart:
    if not lines:
        return Chart(title, None)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    with _PLOT_LOCK:
        figure, axes = plt.subplots(figsize=(6.0, 2.6))
        for label, (xs, ys) in sorted(lines.items()):
            axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, label=_plain(label))
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        # The console's window, not the data's span: a lone point would otherwise stretch the axis over years.
        axes.set_xlim(*window)
        locator = mdates.AutoDateLocator()
        axes.xaxis.set_major_locator(locator)
        axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        axes.legend(fontsize=7, loc="best")
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg")
        plt.close(figure)
    svg = buffer.getvalue()
    # Markup, so the template inserts the figure rather than showing its source. Safe because the markup is
    # matplotlib's own: it draws text as glyph paths and writes every string it was given (legend labels from
    # logged model names, metric names, axis labels) XML-escaped, in comments whose `--` it breaks. The caption
    # is not part of it: the template escapes the title.
    return Chart(title, Markup(svg[svg.index("<svg") :]))  # noqa: S704 - matplotlib's escaped SVG, see above


def page_context(
    buckets: Sequence[dict[str, Any]],
    alerts: Sequence[dict[str, Any]],
    evaluations: Sequence[dict[str, Any]],
    lineage: dict[str, Any] | None,
    *,
    canaries: dict[str, dict[str, Any]] | None,
    generated_at: datetime,
    since: datetime,
) -> dict[str, Any]:
    """The values templates/console.html shows: alerts, traffic, latency quantiles, feedback, drift,
    canaries under watch, and the production adapter's lineage."""
    window = (since, generated_at)
    latency = {f"{k} p{q}": v for q in (50, 95, 99) for k, v in _series(buckets, f"latency_p{q}_ms").items()}
    charts = [
        _chart("Traffic (requests per bucket)", _series(buckets, "requests"), "requests", window),
        _chart("Latency quantiles (ms)", latency, "ms", window),
        _chart("Thumbs-down rate", _series(buckets, "thumbs_down_rate"), "share", window),
        _chart("Mean rating (1-5)", _series(buckets, "mean_rating"), "rating", window),
        _chart("Error rate", _series(buckets, "error_rate"), "share", window),
        _chart("Drift and live quality over time", _drift(evaluations), "value", window),
    ]
    alert_rows = [
        {
            "alert_id": a["alert_id"],
            "severity": a["severity"],
            "state": a["state"],
            "rule": a["rule_name"],
            "version": _version(a),
            "value": f"{a['value']:.4g}",
            "threshold": f"{a['threshold']:g}",
            "at": a["window_end"],
            "message": a["message"],
            "may_acknowledge": a["state"] == AlertState.open.value,
            "may_resolve": a["state"] != AlertState.resolved.value,
        }
        for a in alerts
    ]
    canary_rows = [
        {
            "canary": f"{model}:v{watched['version']}",
            "traffic": f"{watched.get('percent'):g}%" if watched.get("percent") is not None else None,
            "since": watched["since"],
            "decision": (watched.get("last_review") or {}).get("action", "not reviewed yet"),
            "control": f"v{watched['last_review']['control_version']}" if watched.get("last_review") else None,
            "checks": (watched.get("last_review") or {}).get("summary"),
        }
        for model, watched in sorted((canaries or {}).items())
    ]
    production = None
    if lineage:
        adapter = lineage["adapter"]
        dataset = lineage.get("dataset") or {}
        production = {
            "adapter": f"{adapter['model_name']}:v{adapter['version']}",
            "stage": adapter["stage"],
            "base_model": lineage["base_model"]["name"],
            "training_job": lineage.get("training_job_id"),
            "dataset": f"{dataset.get('name')}:v{dataset.get('version')}" if dataset else None,
            "provenance": dataset.get("provenance"),
            "evaluations": ", ".join(
                f"{e['gate_policy']} {'passed' if e['passed'] else 'failed'}" for e in lineage.get("evaluations") or []
            ),
        }
    return {
        "generated_at": generated_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "open_alerts": sum(1 for a in alerts if a["state"] != AlertState.resolved.value),
        "alerts": alert_rows,
        "charts": charts,
        "canaries": canary_rows,
        "lineage": production,
    }
