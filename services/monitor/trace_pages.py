"""The console's pages about the pipelines' traces, under /monitor/console: traces and sessions listed with
filters, one trace as a tree of spans with a timeline bar each (HTML and CSS only: the console runs no
script), and one session's traces in order. Viewer or above, like the monitor's other page.

The queries are `flywheel ops traces|sessions|trace`'s (traces.py), run on the monitor's read-only handle
under the query door's caps. Ids and filters come from the URL as text and are checked here, so a bad one
is a page that says what to write: an id of the wrong shape names nothing (404), a filter that is not one
is 422. Everything an app sent (names, inputs, outputs, attributes, errors) is escaped by Jinja.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from services.monitor.store import MonitorStore
from services.monitor.traces import (
    MAX_LISTED,
    NAME_MAX,
    SESSION_FEEDBACK_SQL,
    BadValue,
    SessionFilter,
    TraceFeedback,
    TraceFilter,
    checked_session_id,
    checked_trace_id,
    since_ms,
    sessions_query,
    spans_query,
    trace_feedback_query,
    traces_query,
)
from services.runtime.span_tree import tree_order
from services.runtime.clickhouse.query_guard import QueryLimits, QueryOverLimit
from services.runtime.console import Console, ConsoleRefused, ConsoleUser

PREFIX = "/monitor/console"
TRACES = f"{PREFIX}/traces"
SESSIONS = f"{PREFIX}/sessions"
PAGE_SIZE = 50
LAST_PAGE = MAX_LISTED // PAGE_SIZE
DEFAULT_SINCE = "24h"
# A trace page shows this many spans at most, each input and output cut to TEXT_SHOWN characters: a page
# of the largest trace stays a few megabytes. `flywheel ops sql` reads the rest.
SPANS_SHOWN = 1000
TEXT_SHOWN = 4000
# A session's traces, in order; a conversation longer than this is read with `flywheel ops traces --session`.
SESSION_TRACES = MAX_LISTED
# Narrow enough to see, wide enough that a span of a few microseconds in a long trace still shows as a bar.
MIN_BAR_PERCENT = 0.3
_CHECKED = ("on", "1", "true")


@dataclass(frozen=True)
class Paging:
    """Where a list page is: its number, and the links to the pages beside it (None at either end)."""

    number: int
    newer: str | None
    older: str | None


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else ""


def _milliseconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.1f} ms"


def _feedback(count: int | None, down: int | None) -> str:
    if not count:
        return ""
    return f"{count} ({down} down)" if down else str(count)


def _cost(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"${value:.6f}".rstrip("0").rstrip(".")


def _text_field(value: str | None, field: str, maximum: int, user: ConsoleUser) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    if len(value) > maximum:
        raise ConsoleRefused(422, f"{field} is at most {maximum} characters", user)
    return value


def _flag(value: str | None, field: str, user: ConsoleUser) -> bool:
    if not value:
        return False
    if value not in _CHECKED:
        raise ConsoleRefused(422, f"{field} is a checkbox: on, or left out", user)
    return True


def _page_number(value: str | None, user: ConsoleUser) -> int:
    if not value:
        return 1
    if not (value.isdigit() and 1 <= int(value) <= LAST_PAGE):
        raise ConsoleRefused(
            422,
            f"page is a whole number from 1 to {LAST_PAGE}: a list shows the newest {MAX_LISTED} rows; narrow the filters to see older ones",
            user,
        )
    return int(value)


@contextmanager
def refused_as(status: int, user: ConsoleUser, prefix: str = "") -> Iterator[None]:
    """What traces.py refuses (a BadValue), as a refusal page with `status`."""
    try:
        yield
    except BadValue as bad:
        raise ConsoleRefused(status, f"{prefix}{bad}", user) from None


def _paging(path: str, filters: dict[str, str], number: int, more: bool) -> Paging:
    def link(to: int) -> str:
        return f"{path}?{urlencode(filters | {'page': str(to)})}"

    return Paging(number, link(number - 1) if number > 1 else None, link(number + 1) if more else None)


def create_trace_pages(store: MonitorStore, console: Console, limits: QueryLimits) -> APIRouter:
    """The pages' routes, for the monitor's router (prefix /monitor) to include."""
    router = APIRouter(prefix=PREFIX.removeprefix("/monitor"), tags=["console"], include_in_schema=False)
    templates = console.templates("services.monitor")

    async def read(user: ConsoleUser, query: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return await asyncio.to_thread(store.read, query, limits)
        except QueryOverLimit as over:
            raise ConsoleRefused(400, f"{over}: narrow the filters (a shorter since, a service)", user) from None

    @router.get("/traces", response_class=HTMLResponse)
    async def traces(
        request: Request,
        since: str | None = None,
        service: str | None = None,
        name: str | None = None,
        errors: str | None = None,
        session: str | None = None,
        min_ms: str | None = None,
        page: str | None = None,
        user: ConsoleUser = Depends(console.viewer),
    ) -> HTMLResponse:
        since = (since or "").strip() or DEFAULT_SINCE
        service = _text_field(service, "service", 256, user)
        name = _text_field(name, "name", NAME_MAX, user)
        session = _text_field(session, "session", 128, user)
        errors_only = _flag(errors, "errors", user)
        min_duration = None
        if min_ms and min_ms.strip():
            try:
                min_duration = float(min_ms)
            except ValueError:
                min_duration = -1.0
            if not (math.isfinite(min_duration) and 0 <= min_duration <= 10**10):
                raise ConsoleRefused(422, "min duration is milliseconds: a number from 0, e.g. 250 or 1500.5", user)
        number = _page_number(page, user)
        with refused_as(422, user):
            chosen = TraceFilter(since_ms(since), service, session, errors_only, name, min_duration)
            query = traces_query(chosen, PAGE_SIZE + 1, (number - 1) * PAGE_SIZE)
        rows = await read(user, query)
        filters = {
            key: value
            for key, value in (
                ("since", since),
                ("service", service),
                ("name", name),
                ("errors", "on" if errors_only else None),
                ("session", session),
                ("min_ms", min_ms.strip() if min_duration is not None and min_ms else None),
            )
            if value
        }
        listed = [
            {
                "trace_id": row["trace_id"],
                "start": when(row["started_at"]),
                "root_name": row["root_name"],
                "service": row["service_name"] or "",
                "session": row["session_id"],
                "duration": _milliseconds(row["duration_ms"]),
                "spans": row["spans"],
                "tokens": f"{row['tokens_in']} / {row['tokens_out']}",
                "cost": _cost(row["cost_usd"]),
                "errors": row["errors"],
                "feedback": _feedback(row["feedback"], row["thumbs_down"]),
            }
            for row in rows[:PAGE_SIZE]
        ]
        return console.page(
            request,
            templates,
            "traces.html",
            user,
            title="Traces",
            traces=listed,
            chosen={"service": "", "name": "", "session": "", "min_ms": "", "errors": ""} | filters,
            filtered=set(filters) - {"since"} or since != DEFAULT_SINCE,
            paging=_paging(TRACES, filters, number, len(rows) > PAGE_SIZE and number < LAST_PAGE),
            name_max=NAME_MAX,
        )

    @router.get("/sessions", response_class=HTMLResponse)
    async def sessions(
        request: Request,
        since: str | None = None,
        thumbs_down: str | None = None,
        page: str | None = None,
        user: ConsoleUser = Depends(console.viewer),
    ) -> HTMLResponse:
        since = (since or "").strip() or DEFAULT_SINCE
        down = _flag(thumbs_down, "thumbs_down", user)
        number = _page_number(page, user)
        with refused_as(422, user):
            query = sessions_query(
                SessionFilter(since_ms(since), thumbs_down=down), PAGE_SIZE + 1, (number - 1) * PAGE_SIZE
            )
        rows = await read(user, query)
        filters = {"since": since} | ({"thumbs_down": "on"} if down else {})
        listed = [
            {
                "session_id": row["session_id"],
                "traces": row["traces"],
                "turns": row["turns"],
                "first": when(row["first_at"]),
                "last": when(row["last_at"]),
                "duration": _milliseconds(row["duration_ms"]),
                "tokens": f"{row['tokens_in']} / {row['tokens_out']}",
                "errors": row["errors"],
                "feedback": _feedback(row["feedback"], row["thumbs_down"]),
                "on_session": _feedback(row["on_session"], row["on_session_down"]),
            }
            for row in rows[:PAGE_SIZE]
        ]
        return console.page(
            request,
            templates,
            "sessions.html",
            user,
            title="Sessions",
            sessions=listed,
            chosen={"thumbs_down": ""} | filters,
            filtered=down or since != DEFAULT_SINCE,
            paging=_paging(SESSIONS, filters, number, len(rows) > PAGE_SIZE and number < LAST_PAGE),
        )

    # `:path`, so an id holding an (encoded) slash still reaches this page and its precise 404.
    @router.get("/traces/{trace_id:path}", response_class=HTMLResponse)
    async def trace(request: Request, trace_id: str, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        with refused_as(404, user, "no such trace: "):
            trace_id = checked_trace_id(trace_id)
        spans = await read(user, spans_query(trace_id, limit=SPANS_SHOWN + 1, text_max=TEXT_SHOWN))
        if not spans:
            raise ConsoleRefused(404, f"no spans stored for trace {trace_id}", user)
        shown = spans[:SPANS_SHOWN]
        feedback = TraceFeedback.of(await read(user, trace_feedback_query(trace_id, shown)))
        return console.page(
            request,
            templates,
            "trace.html",
            user,
            title=f"Trace {trace_id}",
            trace_id=trace_id,
            more_spans=len(spans) > SPANS_SHOWN,
            spans_shown=SPANS_SHOWN,
            text_shown=TEXT_SHOWN,
            **trace_view(shown, feedback),
        )

    # `:path`: a session id may hold a slash (contracts/ids.py), encoded in the links.
    @router.get("/sessions/{session_id:path}", response_class=HTMLResponse)
    async def session(request: Request, session_id: str, user: ConsoleUser = Depends(console.viewer)) -> HTMLResponse:
        with refused_as(404, user, "no such session: "):
            session_id = checked_session_id(session_id)
        summary = await read(user, sessions_query(SessionFilter(0, session=session_id), 1))
        if not summary:
            raise ConsoleRefused(404, f"no traces stored for session {session_id!r}", user)
        [row] = summary
        turns = await read(user, traces_query(TraceFilter(0, session=session_id), SESSION_TRACES, oldest_first=True))
        given = await read(user, (SESSION_FEEDBACK_SQL, {"session": session_id}))
        return console.page(
            request,
            templates,
            "session.html",
            user,
            title=f"Session {session_id}",
            session_id=session_id,
            summary={
                "traces": row["traces"],
                "turns": row["turns"],
                "first": when(row["first_at"]),
                "last": when(row["last_at"]),
                "duration": _milliseconds(row["duration_ms"]),
                "tokens": f"{row['tokens_in']} / {row['tokens_out']}",
                "cost": _cost(row["cost_usd"]),
                "errors": row["errors"],
                "services": ", ".join(service for service in row["services"] if service),
                "feedback": _feedback(row["feedback"], row["thumbs_down"]),
            },
            traces=[
                {
                    "trace_id": turn["trace_id"],
                    "start": when(turn["started_at"]),
                    "root_name": turn["root_name"],
                    "duration": _milliseconds(turn["duration_ms"]),
                    "spans": turn["spans"],
                    "tokens": f"{turn['tokens_in']} / {turn['tokens_out']}",
                    "errors": turn["errors"],
                    "feedback": _feedback(turn["feedback"], turn["thumbs_down"]),
                }
                for turn in turns
            ],
            more_traces=row["traces"] > SESSION_TRACES,
            session_traces=SESSION_TRACES,
            given=[_given(entry) for entry in given],
        )

    return router


def _given(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "thumbs": row["thumbs"] or "",
        "rating": row["rating"],
        "comment": row["comment"] or "",
        "source": row["source"],
        "at": when(row["occurred_at"]),
        "on_inference": row.get("inference_id") or None,
    }


def trace_view(spans: list[dict[str, Any]], feedback: TraceFeedback) -> dict[str, Any]:
    """The trace page's values: the trace's sums, its session and feedback, and each span in tree order with
    its depth and its bar's offset and width as percentages of the trace's duration."""
    start = min(int(span["start_us"]) for span in spans)
    end = max(int(span["start_us"]) + float(span["duration_ms"]) * 1000 for span in spans)
    # A trace of one instantaneous span still has a bar: the whole width.
    total_us = max(end - start, 1.0)
    placed = []
    for place in tree_order(spans):
        span = place.span
        offset = (int(span["start_us"]) - start) / total_us * 100
        width = max(float(span["duration_ms"]) * 1000 / total_us * 100, MIN_BAR_PERCENT)
        placed.append(
            {
                "span_id": span["span_id"],
                "parent_span_id": span["parent_span_id"],
                "parent_missing": place.parent_missing,
                "depth": place.depth,
                "name": span["name"],
                "kind": span["kind"],
                "service": span["service_name"] or "",
                "model": span["model_name"] or "",
                "adapter_version": span["adapter_version"],
                "inference_id": span["inference_id"] or "",
                "offset": _milliseconds((int(span["start_us"]) - start) / 1000),
                "duration": _milliseconds(float(span["duration_ms"])),
                "duration_ms": float(span["duration_ms"]),
                "bar_left": f"{min(offset, 100 - MIN_BAR_PERCENT):.3f}",
                "bar_width": f"{min(width, 100 - min(offset, 100 - MIN_BAR_PERCENT)):.3f}",
                "tokens": (span["prompt_tokens"], span["completion_tokens"]),
                "cost": _cost(span["cost_usd"]),
                "status": span["status"],
                "error": span["error"] or "",
                "input": span["input_text"],
                "input_cut": span["input_chars"] > len(span["input_text"]),
                "input_chars": span["input_chars"],
                "output": span["output_text"],
                "output_cut": span["output_chars"] > len(span["output_text"]),
                "output_chars": span["output_chars"],
                "truncated": span["truncated"],
                "attributes": sorted(dict(span["attributes"] or {}).items()),
                "feedback": [_given(row) for row in feedback.on_span(span)],
            }
        )
    sessions = sorted({span["session_id"] for span in spans if span["session_id"]})
    return {
        "spans": placed,
        "started": datetime.fromtimestamp(start / 1_000_000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC",
        "duration": _milliseconds((end - start) / 1000),
        "span_count": len(spans),
        "tokens": (sum(int(s["prompt_tokens"]) for s in spans), sum(int(s["completion_tokens"]) for s in spans)),
        "errors": sum(span["status"] == "error" for span in spans),
        "sessions": sessions,
        "trace_feedback": [_given(row) for row in feedback.on_trace],
    }
