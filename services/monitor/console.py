"""The read-only ops console: one server-rendered HTML page with inline SVG charts (matplotlib), no scripts,
and its sign-in sessions, kept in this process's memory."""

from __future__ import annotations

import hmac
import io
import math
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any

_DRIFT_KINDS = ("psi", "embedding", "unsafe", "hallucination")
# matplotlib's pyplot state is global; the console may render from several request threads.
_PLOT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ConsoleSession:
    """One sign-in: who, with which key (kept here to re-check revocation on every page), its CSRF token, and when it ends."""

    principal: str
    key_id: str
    key: str = field(repr=False)
    csrf: str = field(repr=False)
    expires_at: float = 0.0


class ConsoleSessions:
    """Server-side console sessions: the browser's cookie holds only a random id, never the API key.

    In memory, so a restart signs everyone out (a console sign-in is cheap to repeat) and several
    monitor replicas behind one address need sticky sessions. Bounded: a flood of sign-ins evicts the
    sessions closest to their end rather than growing without limit.
    """

    def __init__(self, lifetime_s: int, *, max_sessions: int = 10_000, clock: Any = time.monotonic) -> None:
        self.lifetime_s = lifetime_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: dict[str, ConsoleSession] = {}
        self._lock = threading.Lock()

    def open(self, principal: str, key_id: str, key: str) -> tuple[str, ConsoleSession]:
        """A new session id (256 random bits) and its session."""
        session_id = secrets.token_urlsafe(32)
        session = ConsoleSession(principal, key_id, key, secrets.token_urlsafe(32), self._clock() + self.lifetime_s)
        with self._lock:
            self._prune()
            while len(self._sessions) >= self._max:
                del self._sessions[min(self._sessions, key=lambda sid: self._sessions[sid].expires_at)]
            self._sessions[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        """The live session with this id, or None (unknown, or expired: then forgotten)."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= self._clock():
                del self._sessions[session_id]
                return None
            return session

    def close(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _prune(self) -> None:
        now = self._clock()
        for sid in [sid for sid, session in self._sessions.items() if session.expires_at <= now]:
            del self._sessions[sid]


def same_token(expected: str | None, presented: str | None) -> bool:
    """Constant-time comparison of CSRF tokens; a missing one never matches."""
    return bool(expected) and bool(presented) and hmac.compare_digest(expected.encode(), presented.encode())


def _version(row: dict[str, Any]) -> str:
    adapter = row.get("adapter_version")
    prompt = row.get("prompt_version")
    label = f"{row['model_name']}:v{adapter}" if adapter is not None else f"{row['model_name']}:base"
    return label + (f" prompt v{prompt}" if prompt is not None else "")


def _series(rows: Sequence[dict[str, Any]], column: str) -> dict[str, tuple[list[datetime], list[float]]]:
    series: dict[str, tuple[list[datetime], list[float]]] = {}
    for row in rows:
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        xs, ys = series.setdefault(_version(row), ([], []))
        xs.append(row["bucket"])
        ys.append(float(value))
    return series


def _chart(title: str, lines: dict[str, tuple[list[datetime], list[float]]], ylabel: str) -> str:
    if not lines:
        return f'<figure><figcaption>{escape(title)}</figcaption><p class="empty">no data in this window</p></figure>'
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    with _PLOT_LOCK:
        figure, axes = plt.subplots(figsize=(6.0, 2.6))
        for label, (xs, ys) in sorted(lines.items()):
            axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, label=label)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        axes.legend(fontsize=7, loc="best")
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg")
        plt.close(figure)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    return f"<figure><figcaption>{escape(title)}</figcaption>{svg}</figure>"


def _drift(evaluations: Sequence[dict[str, Any]]) -> dict[str, tuple[list[datetime], list[float]]]:
    lines: dict[str, tuple[list[datetime], list[float]]] = {}
    for evaluation in evaluations:
        if evaluation["kind"] not in _DRIFT_KINDS or _missing(evaluation["value"]):
            continue
        xs, ys = lines.setdefault(f"{evaluation['metric']} · {_version(evaluation)}", ([], []))
        xs.append(evaluation["window_end"])
        ys.append(float(evaluation["value"]))
    return lines


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape('' if c is None else str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5rem; color: #1d2330; background: #fafbfc; }
h1 { font-size: 1.4rem; margin: 0 0 .2rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
.meta { color: #667; } .badge { display: inline-block; padding: .1rem .5rem; border-radius: .6rem; background: #c62828; color: #fff; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1rem; }
figure { margin: 0; padding: .5rem; background: #fff; border: 1px solid #dde; border-radius: 6px; }
figcaption { font-weight: 600; margin-bottom: .3rem; } svg { width: 100%; height: auto; }
table { border-collapse: collapse; background: #fff; width: 100%; } th, td { border: 1px solid #dde; padding: .3rem .5rem; text-align: left; font-size: 13px; }
th { background: #eef1f6; } .empty { color: #889; font-style: italic; }
form.inline { display: inline; } .error { color: #c62828; font-weight: 600; }
input[type=password] { width: 28rem; max-width: 90%; padding: .3rem; }
"""


def _signed_in(name: str | None, csrf: str | None) -> str:
    if not name:
        return ""
    if not csrf:  # signed in with a bearer header: there is no session to end
        return f" · signed in as {escape(name)}"
    return (
        f' · signed in as {escape(name)} <form class="inline" method="post" action="/monitor/console/logout">'
        f'<input type="hidden" name="csrf_token" value="{escape(csrf)}"><button type="submit">sign out</button></form>'
    )


def render_login(error: str | None = None, *, csrf: str = "") -> str:
    """The sign-in page: an API key (viewer or above) in a form, since a browser cannot send a bearer header."""
    message = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Flywheel monitor · sign in</title><style>{_STYLE}</style></head><body>
<h1>Flywheel monitor</h1>
<p class="meta">The console is read-only. Sign in with an API key (role viewer or above); the key stays on the server, and this browser keeps only a session id in an HttpOnly cookie for this console.</p>
{message}
<form method="post" action="/monitor/console/login">
<input type="hidden" name="csrf_token" value="{escape(csrf)}">
<label for="api_key">API key</label><br>
<input id="api_key" name="api_key" type="password" autocomplete="off" required>
<button type="submit">Sign in</button>
</form>
</body></html>"""


def render_console(
    buckets: Sequence[dict[str, Any]],
    alerts: Sequence[dict[str, Any]],
    evaluations: Sequence[dict[str, Any]],
    lineage: dict[str, Any] | None,
    *,
    canaries: dict[str, dict[str, Any]] | None = None,
    generated_at: datetime,
    signed_in: str | None = None,
    csrf: str | None = None,
) -> str:
    """The whole page: traffic, latency quantiles, feedback, drift, alerts, canaries under watch, and the production adapter's lineage."""
    latency = {f"{k} p{q}": v for q in (50, 95, 99) for k, v in _series(buckets, f"latency_p{q}_ms").items()}
    charts = [
        _chart("Traffic (requests per bucket)", _series(buckets, "requests"), "requests"),
        _chart("Latency quantiles (ms)", latency, "ms"),
        _chart("Thumbs-down rate", _series(buckets, "thumbs_down_rate"), "share"),
        _chart("Mean rating (1-5)", _series(buckets, "mean_rating"), "rating"),
        _chart("Error rate", _series(buckets, "error_rate"), "share"),
        _chart("Drift and live quality over time", _drift(evaluations), "value"),
    ]
    active = [a for a in alerts if a["state"] != "resolved"]
    alert_rows = [
        (
            a["severity"],
            a["state"],
            a["rule_name"],
            _version(a),
            f"{a['value']:.4g}",
            f"{a['threshold']:g}",
            a["window_end"],
            a["message"],
        )
        for a in alerts
    ]
    canary_rows = [
        (
            f"{model}:v{watched['version']}",
            f"{watched.get('percent'):g}%" if watched.get("percent") is not None else None,
            watched["since"],
            (watched.get("last_review") or {}).get("action", "not reviewed yet"),
            f"v{watched['last_review']['control_version']}" if watched.get("last_review") else None,
            (watched.get("last_review") or {}).get("summary"),
        )
        for model, watched in sorted((canaries or {}).items())
    ]
    lineage_html = '<p class="empty">no production adapter known (or the registry door is not configured)</p>'
    if lineage:
        adapter = lineage["adapter"]
        dataset = lineage.get("dataset") or {}
        evaluations = lineage.get("evaluations") or []
        lineage_html = _table(
            ["adapter", "stage", "base model", "training job", "dataset", "provenance", "evaluations"],
            [
                (
                    f"{adapter['model_name']}:v{adapter['version']}",
                    adapter["stage"],
                    lineage["base_model"]["name"],
                    lineage.get("training_job_id"),
                    f"{dataset.get('name')}:v{dataset.get('version')}" if dataset else None,
                    dataset.get("provenance"),
                    ", ".join(f"{e['gate_policy']} {'passed' if e['passed'] else 'failed'}" for e in evaluations),
                )
            ],
            "",
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Flywheel monitor</title>
<style>{_STYLE}</style></head><body>
<h1>Flywheel monitor</h1>
<p class="meta">generated {escape(generated_at.strftime("%Y-%m-%d %H:%M:%S UTC"))} · <span class="badge">{len(active)} open alerts</span>{_signed_in(signed_in, csrf)}</p>
<h2>Alerts</h2>
{_table(["severity", "state", "rule", "version", "value", "threshold", "at", "message"], alert_rows, "no alerts")}
<h2>Per model version</h2>
<div class="charts">{"".join(charts)}</div>
<h2>Canaries under watch</h2>
{_table(["canary", "traffic", "watched since", "last decision", "control", "checks"], canary_rows, "no canary under watch (or no canary policy)")}
<h2>Lineage of the production adapter</h2>
{lineage_html}
</body></html>"""
