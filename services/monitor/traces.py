"""How the monitor reads the pipelines' traces and sessions (span table and views, migrations 0008 and 0009):
the queries with their filters, the checks on the ids and times people type, and the span tree. One module
for both readers, `flywheel ops traces|sessions|trace` (cli.py) and the console's pages (trace_pages.py), so
the terminal and the browser show the same rows.

Every value reaches the engine as a bound parameter; LIMIT and OFFSET are whole numbers this module bounds.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError

from contracts.ids import SessionId, TraceId

MAX_LISTED = 1000
# More spans than a person reads as a tree; past it, `flywheel ops sql` reads the rest.
MAX_TREE_SPANS = 5000
# A span name is at most 256 characters (SpanLogged.name): a longer search matches nothing.
NAME_MAX = 256
# Feedback rows one trace or session shows at most.
MAX_FEEDBACK = 1000
_DURATION = re.compile(r"(\d{1,6})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_TRACE_ID: TypeAdapter[str] = TypeAdapter(TraceId)
_SESSION_ID: TypeAdapter[str] = TypeAdapter(SessionId)

TRACES_SQL = (
    "SELECT trace_id, started_at, round(duration_ms, 1) AS duration_ms, root_name, service_name, session_id, "
    "span_count AS spans, llm_span_count AS llm_spans, prompt_tokens AS tokens_in, completion_tokens AS tokens_out, "
    "round(cost_usd, 6) AS cost_usd, error_spans AS errors, feedback_count AS feedback, thumbs_down "
    "FROM trace_summary WHERE {where} ORDER BY started_at {order}, trace_id LIMIT {limit} OFFSET {offset}"
)
SESSIONS_SQL = (
    "SELECT session_id, first_at, last_at, round(duration_ms, 1) AS duration_ms, traces, turns, services, "
    "span_count AS spans, prompt_tokens AS tokens_in, completion_tokens AS tokens_out, round(cost_usd, 6) AS cost_usd, "
    "error_spans AS errors, errored_traces, feedback_count AS feedback, thumbs_down, "
    "session_feedback AS on_session, session_thumbs_down AS on_session_down, round(session_mean_rating, 2) AS session_rating "
    "FROM session_summary WHERE {where} ORDER BY last_at DESC, session_id LIMIT {limit} OFFSET {offset}"
)
_SPAN_COLUMNS = (
    "span_id, parent_span_id, name, kind, service_name, toUnixTimestamp64Micro(started_at) AS start_us, "
    "duration_ms, status, error, model_name, prompt_tokens, completion_tokens, cost_usd, inference_id"
)
# What a page shows of each span beyond the tree's columns: the text cut to `text_max` characters (a span
# may hold 64,000 of each, and a page of a thousand spans must stay a page) with its full length beside it.
_SPAN_DETAIL_COLUMNS = (
    ", session_id, adapter_version, truncated, attributes, "
    "substringUTF8(input_text, 1, {text_max:UInt32}) AS input_text, lengthUTF8(input_text) AS input_chars, "
    "substringUTF8(output_text, 1, {text_max:UInt32}) AS output_text, lengthUTF8(output_text) AS output_chars"
)
_SPANS_SQL = (
    "SELECT {columns} FROM span FINAL WHERE trace_id = {{trace_id:String}} ORDER BY started_at, span_id LIMIT {limit}"
)
SPANS_SQL = _SPANS_SQL.format(columns=_SPAN_COLUMNS, limit=MAX_TREE_SPANS + 1)
# The feedback a trace's tree shows: on the trace (span_id NULL), on one of its spans, and on the inferences
# its spans name. Feedback on a span, trace or session has inference_id '', one range of the table's key.
TRACE_FEEDBACK_SQL = (
    "SELECT span_id, inference_id, thumbs, rating, comment, source, occurred_at FROM feedback FINAL "
    "WHERE (inference_id = '' AND trace_id = {trace_id:String}) OR inference_id IN {inference_ids:Array(String)} "
    f"ORDER BY occurred_at, feedback_id LIMIT {MAX_FEEDBACK}"
)
SESSION_FEEDBACK_SQL = (
    "SELECT thumbs, rating, comment, source, occurred_at FROM feedback FINAL "
    "WHERE inference_id = '' AND session_id = {session:String} "
    f"ORDER BY occurred_at, feedback_id LIMIT {MAX_FEEDBACK}"
)


class BadValue(ValueError):
    """A filter or id as typed is not one: the message says how to write it; `field` names what was typed."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def since_moment(since: str, now: datetime) -> datetime:
    """The moment `since` names: `now` less a duration (30m, 24h, 7d), or an ISO 8601 time (UTC unless it names a zone)."""
    duration = _DURATION.fullmatch(since.strip())
    if duration:
        try:
            return now - timedelta(**{_UNITS[duration.group(2)]: int(duration.group(1))})
        except OverflowError:
            raise BadValue(f"{since} reaches back before the year 1", "since") from None
    try:
        moment = datetime.fromisoformat(since.strip())
    except ValueError:
        raise BadValue(
            f"{since[:40]!r} is neither a duration nor a time: write e.g. 30m, 24h, 7d or 2026-01-31T08:00", "since"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def since_ms(since: str) -> int:
    """`since` as the epoch milliseconds the trace and session queries compare with."""
    return int(since_moment(since, datetime.now(UTC)).timestamp() * 1000)


def checked_session_id(session: str) -> str:
    """`session` if it is a session id as the contract defines it (it goes into a query and a URL)."""
    try:
        return str(_SESSION_ID.validate_python(session))
    except ValidationError:
        raise BadValue(
            f"{session[:80]!r} is not a session id: at most 128 letters, digits and . _ : / - (no spaces)", "session"
        ) from None


def checked_trace_id(trace_id: str) -> str:
    """`trace_id` if it is a W3C trace id as the contract defines it, not all zero."""
    try:
        return str(_TRACE_ID.validate_python(trace_id))
    except ValidationError as refused:
        if refused.errors()[0]["type"] == "value_error":
            raise BadValue("an all-zero trace id is invalid (W3C trace context)", "trace_id") from None
        raise BadValue(
            f"{trace_id[:80]!r} is not a trace id: a trace id is 32 lowercase hex digits, as `flywheel ops traces` lists them",
            "trace_id",
        ) from None


def checked_service(service: str) -> str:
    if not service or len(service) > 256:
        raise BadValue("a service name has 1 to 256 characters", "service")
    return service


@dataclass(frozen=True)
class TraceFilter:
    """Which traces a list shows: started since `since_ms`, and each other field that is set."""

    since_ms: int
    service: str | None = None
    session: str | None = None
    errors_only: bool = False
    name_contains: str | None = None
    min_duration_ms: float | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        where = ["started_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')"]
        parameters: dict[str, Any] = {"since_ms": self.since_ms}
        if self.service is not None:
            where.append("service_name = {service:String}")
            parameters["service"] = checked_service(self.service)
        if self.session is not None:
            where.append("session_id = {session:String}")
            parameters["session"] = checked_session_id(self.session)
        if self.errors_only:
            where.append("errored")
        if self.name_contains is not None:
            # position, not LIKE: a `%` or `_` someone types is a character to find, not a wildcard.
            where.append("positionCaseInsensitive(root_name, {name:String}) > 0")
            parameters["name"] = self.name_contains
        if self.min_duration_ms is not None:
            where.append("duration_ms >= {min_duration_ms:Float64}")
            parameters["min_duration_ms"] = self.min_duration_ms
        return " AND ".join(where), parameters


@dataclass(frozen=True)
class SessionFilter:
    """Which sessions a list shows: active since `since_ms`, and each other field that is set."""

    since_ms: int
    service: str | None = None
    session: str | None = None
    errors_only: bool = False
    thumbs_down: bool = False

    def where(self) -> tuple[str, dict[str, Any]]:
        where = ["last_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')"]
        parameters: dict[str, Any] = {"since_ms": self.since_ms}
        if self.service is not None:
            where.append("has(services, {service:String})")
            parameters["service"] = checked_service(self.service)
        if self.session is not None:
            where.append("session_id = {session:String}")
            parameters["session"] = checked_session_id(self.session)
        if self.errors_only:
            where.append("error_spans > 0")
        if self.thumbs_down:
            # Any thumbs-down given within the session: on it, its traces, their spans or inferences.
            where.append("thumbs_down > 0")
        return " AND ".join(where), parameters


def _bounded(limit: int, offset: int) -> tuple[int, int]:
    if not 1 <= limit <= MAX_LISTED + 1 or not 0 <= offset <= MAX_LISTED:
        raise BadValue(f"a list reads at most {MAX_LISTED} rows from its newest: narrow the filters", "page")
    return limit, offset


def traces_query(
    chosen: TraceFilter, limit: int, offset: int = 0, *, oldest_first: bool = False
) -> tuple[str, dict[str, Any]]:
    """The trace_summary rows `chosen` lets through, newest first (or oldest first: a session's turns in order)."""
    where, parameters = chosen.where()
    limit, offset = _bounded(limit, offset)
    order = "ASC" if oldest_first else "DESC"
    return TRACES_SQL.format(where=where, order=order, limit=limit, offset=offset), parameters


def sessions_query(chosen: SessionFilter, limit: int, offset: int = 0) -> tuple[str, dict[str, Any]]:
    """The session_summary rows `chosen` lets through, most recently active first."""
    where, parameters = chosen.where()
    limit, offset = _bounded(limit, offset)
    return SESSIONS_SQL.format(where=where, limit=limit, offset=offset), parameters


def spans_query(trace_id: str, *, limit: int, text_max: int | None = None) -> tuple[str, dict[str, Any]]:
    """A trace's spans by start; with `text_max`, also their session, attributes and cut input and output."""
    columns = _SPAN_COLUMNS + (_SPAN_DETAIL_COLUMNS if text_max is not None else "")
    parameters: dict[str, Any] = {"trace_id": trace_id}
    if text_max is not None:
        parameters["text_max"] = text_max
    return _SPANS_SQL.format(columns=columns, limit=min(limit, MAX_TREE_SPANS + 1)), parameters


def trace_feedback_query(trace_id: str, spans: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The feedback on the trace, on its spans, and on the inferences `spans` name."""
    inference_ids = sorted({span["inference_id"] for span in spans if span["inference_id"]})
    return TRACE_FEEDBACK_SQL, {"trace_id": trace_id, "inference_ids": inference_ids}


# ------------------------------------------------------------------------------------------- tree


@dataclass(frozen=True)
class TraceFeedback:
    """A trace's feedback by what it is about: the trace itself, a span, or the inference a span names."""

    on_trace: list[dict[str, Any]]
    by_span: dict[str, list[dict[str, Any]]]
    by_inference: dict[str, list[dict[str, Any]]]

    @classmethod
    def of(cls, rows: list[dict[str, Any]]) -> TraceFeedback:
        on_trace, by_span, by_inference = [], defaultdict(list), defaultdict(list)
        for row in rows:
            if row["inference_id"]:
                by_inference[row["inference_id"]].append(row)
            elif row["span_id"] is not None:
                by_span[row["span_id"]].append(row)
            else:
                on_trace.append(row)
        return cls(on_trace, dict(by_span), dict(by_inference))

    def on_span(self, span: dict[str, Any]) -> list[dict[str, Any]]:
        """The feedback given on `span`, then on the inference it names."""
        inference = span["inference_id"]
        return self.by_span.get(span["span_id"], []) + (self.by_inference.get(inference, []) if inference else [])


def feedback_summary(rows: list[dict[str, Any]]) -> str:
    """`feedback 3 (1 up, 2 down, rating 2.5)`: how many, the thumbs given, and the mean of the ratings given."""
    up = sum(row["thumbs"] == "up" for row in rows)
    down = sum(row["thumbs"] == "down" for row in rows)
    ratings = [int(row["rating"]) for row in rows if row["rating"] is not None]
    details = [f"{up} up" if up else "", f"{down} down" if down else ""]
    if ratings:
        details.append(f"rating {sum(ratings) / len(ratings):.1f}")
    shown = ", ".join(detail for detail in details if detail)
    return f"feedback {len(rows)}" + (f" ({shown})" if shown else "")
