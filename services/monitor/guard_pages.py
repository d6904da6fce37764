"""The console's page about the gateway's guards, /monitor/console/guards: what the input and output guards
decided since a moment (calls per outcome and per label found, on each side) and the latest calls a guard
did something to (flagged, redacted, blocked), each with the guard policy version that decided and linked to
its trace. Viewer or above.

The figures come from inference_log, where each call's verdicts travel on its inference.logged; the
queries run on the monitor's read-only handle under the query door's caps, like the trace pages'.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import suppress
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from services.monitor.store import MonitorStore
from services.monitor.trace_pages import PREFIX, refused_as, when
from services.monitor.traces import BadValue, checked_trace_id, since_ms
from services.runtime.clickhouse.query_guard import QueryLimits, QueryOverLimit
from services.runtime.console import Console, ConsoleRefused, ConsoleUser

GUARDS = f"{PREFIX}/guards"
DEFAULT_SINCE = "24h"
RECENT = 50
SIDES = ("input", "output")
OUTCOMES = ("passed", "flagged", "redacted", "blocked")
# occurred_at, not started_at: every event has it (an app's logged inference may carry no start), and
# the table is partitioned by it.
_SINCE = "occurred_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')"
_GUARDED = "(guard_input_outcome IS NOT NULL OR guard_output_outcome IS NOT NULL)"

# One row per distinct verdict pair: few (four outcomes a side, a handful of label sets), counted in Python.
VERDICTS_SQL = (
    "SELECT guard_input_outcome AS input_outcome, guard_input_found AS input_found, "
    "guard_output_outcome AS output_outcome, guard_output_found AS output_found, count() AS calls "
    f"FROM inference_log FINAL WHERE {_SINCE} AND {_GUARDED} "
    "GROUP BY input_outcome, input_found, output_outcome, output_found LIMIT 10000"
)
ACTED_SQL = (
    "SELECT coalesce(started_at, occurred_at) AS at, inference_id, trace_id, model_name, adapter_version, route, status, "
    "guard_input_outcome, guard_input_found, guard_output_outcome, guard_output_found, guard_policy "
    f"FROM inference_log FINAL WHERE {_SINCE} AND "
    "(guard_input_outcome IN ('flagged', 'redacted', 'blocked') OR guard_output_outcome IN ('flagged', 'redacted', 'blocked')) "
    f"ORDER BY occurred_at DESC, inference_id LIMIT {RECENT}"
)


def verdict_tables(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Calls per side and outcome, and per side and label found, from VERDICTS_SQL's rows."""
    outcomes: dict[str, Counter[str]] = {side: Counter() for side in SIDES}
    labels: dict[str, Counter[str]] = {side: Counter() for side in SIDES}
    guarded = 0
    for row in rows:
        guarded += row["calls"]
        for side in SIDES:
            if row[f"{side}_outcome"] is None:
                continue
            outcomes[side][row[f"{side}_outcome"]] += row["calls"]
            for label in row[f"{side}_found"] or ():
                labels[side][label] += row["calls"]
    return {
        "guarded": guarded,
        "outcomes": [
            {"side": side, "checked": sum(outcomes[side].values()), **{o: outcomes[side][o] for o in OUTCOMES}}
            for side in SIDES
        ],
        "labels": [
            {"side": side, "label": label, "calls": calls}
            for side in SIDES
            for label, calls in sorted(labels[side].items(), key=lambda item: (-item[1], item[0]))
        ],
    }


def _verdict(outcome: str | None, found: list[str] | None) -> str:
    if outcome is None:
        return ""
    return f"{outcome}: {', '.join(found)}" if found else outcome


def acted_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    listed = []
    for row in rows:
        trace_id = None
        with suppress(BadValue):  # a trace id of another shape is shown, not linked
            trace_id = checked_trace_id(row["trace_id"]) if row["trace_id"] else None
        version = f"{row['model_name']}:v{row['adapter_version']}" if row["adapter_version"] else row["model_name"]
        listed.append(
            {
                "at": when(row["at"]),
                "inference_id": row["inference_id"],
                "trace_id": trace_id,
                "version": version,
                "route": row["route"],
                "status": row["status"],
                "policy": row["guard_policy"] or "settings",
                "input": _verdict(row["guard_input_outcome"], row["guard_input_found"]),
                "output": _verdict(row["guard_output_outcome"], row["guard_output_found"]),
                "blocked": "blocked" in (row["guard_input_outcome"], row["guard_output_outcome"]),
            }
        )
    return listed


def create_guard_pages(store: MonitorStore, console: Console, limits: QueryLimits) -> APIRouter:
    """The page's route, for the monitor's router (prefix /monitor) to include."""
    router = APIRouter(prefix=PREFIX.removeprefix("/monitor"), tags=["console"], include_in_schema=False)
    templates = console.templates("services.monitor")

    @router.get("/guards", response_class=HTMLResponse)
    async def guards(
        request: Request, since: str | None = None, user: ConsoleUser = Depends(console.viewer)
    ) -> HTMLResponse:
        since = (since or "").strip()[:40] or DEFAULT_SINCE
        with refused_as(422, user):
            parameters = {"since_ms": since_ms(since)}
        try:
            verdicts = await asyncio.to_thread(store.read, (VERDICTS_SQL, parameters), limits)
            acted = await asyncio.to_thread(store.read, (ACTED_SQL, parameters), limits)
        except QueryOverLimit as over:
            raise ConsoleRefused(400, f"{over}: choose a shorter since", user) from None
        return console.page(
            request,
            templates,
            "guards.html",
            user,
            title="Guards",
            since=since,
            recent=RECENT,
            acted=acted_rows(acted),
            **verdict_tables(verdicts),
        )

    return router
