"""The feedback service's only door to ClickHouse: existence checks, Arrow inserts, feedback reads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import pyarrow as pa

from contracts.events import FeedbackTarget
from contracts.http import ReviewSelect, ReviewTarget
from services.runtime import failpoints
from services.runtime.clickhouse import ClickHouseError, ClickHouseStore

TABLES = ("inference_log", "feedback", "span")
UNAVAILABLE_FAILPOINT = "feedback.clickhouse_unavailable"


class FeedbackStore:
    """Serialises access to one ClickHouse handle: the sink and the HTTP door share it, and a chDB
    connection is not meant to run two statements at once."""

    def __init__(self, clickhouse: Callable[[], ClickHouseStore]) -> None:
        # A callable, so the store is opened (and migrated) on first use, not when the app is built.
        self._clickhouse = clickhouse
        self._lock = threading.Lock()

    def stored_event_ids(self, table: str, event_ids: list[UUID], first: datetime, last: datetime) -> set[str]:
        """Which of `event_ids` `table` already holds (as strings); the time range prunes partitions to those
        the events live in."""
        # UUIDs, not strings: the client binds a UUID as it is, a string character by character (escaping),
        # which for a batch of thousands of ids cost more than the query.
        # Stored times are cut to milliseconds; a margin keeps the bounds from excluding the rows they
        # came from. The alias is not `event_id`: ClickHouse would let it shadow the column in WHERE.
        margin = timedelta(seconds=1)
        rows = self._query(
            f"SELECT DISTINCT toString(event_id) AS stored_id FROM {_table(table)} "
            "WHERE occurred_at BETWEEN fromUnixTimestamp64Milli({first:Int64}, 'UTC') AND fromUnixTimestamp64Milli({last:Int64}, 'UTC') "
            "AND event_id IN {ids:Array(UUID)}",
            {
                "first": int((first - margin).timestamp() * 1000),
                "last": int((last + margin).timestamp() * 1000),
                "ids": event_ids,
            },
        )
        return {row["stored_id"] for row in rows}

    def insert(self, table: str, rows: pa.Table, dedup_token: str) -> None:
        """Insert one columnar batch; the same token again is a no-op on the server."""
        with self._lock:
            _fail_if_unavailable()
            self._clickhouse().insert_arrow(_table(table), rows, dedup_token=dedup_token)

    def ping(self) -> None:
        """Raise ClickHouseError unless the store answers."""
        self._query("SELECT 1 AS ok", None)

    def feedback_on(self, target: FeedbackTarget, ids: dict[str, str]) -> list[dict[str, Any]]:
        """Feedback on exactly this target (`ids` names it as the feedback did), deduplicated, oldest first."""
        return self._query(
            # inference_id as stored ('' for other targets): an alias of the same name would shadow the column in WHERE.
            "SELECT feedback_id, inference_id, trace_id, span_id, session_id, occurred_at, "
            "thumbs, rating, comment, correction, tags, source, actor "
            f"FROM feedback FINAL WHERE {_FEEDBACK_ON[target]} ORDER BY occurred_at, feedback_id",
            ids,
        )

    def target_stored(self, target: FeedbackTarget, ids: dict[str, str]) -> bool:
        """Whether the target itself is stored: the inference, the span, or any span of the trace or session."""
        return bool(self._query(f"SELECT 1 AS found FROM {_STORED[target]} LIMIT 1", ids))

    def review_candidates(
        self, model_name: str, *, hours: int, share: float, route: str | None, select: ReviewSelect, limit: int
    ) -> list[dict[str, Any]]:
        """A model's answered calls of the last `hours`, newest first: the `share` of them whose inference id
        hashes under it (the same calls on every read; for `pairs`, whose prompt does, so both answers to a
        prompt are in or out together), on `route` when given, and those whose feedback the `select` rule names
        (thumbs down, a judge and an end user disagreeing); the caller scores groundedness or pairs them."""
        where = [
            "model_name = {model_name:String}",
            "status = 'ok'",
            "output_text != ''",
            "occurred_at >= now64(3) - toIntervalHour({hours:UInt32})",
            f"cityHash64({'input_text' if select is ReviewSelect.pairs else 'inference_id'}) % 10000 < {{share:UInt32}}",
        ]
        parameters: dict[str, Any] = {
            "model_name": model_name,
            "hours": hours,
            "share": round(share * 10_000),
            "limit": limit,
        }
        if route is not None:
            where.append("route = {route:String}")
            parameters["route"] = route
        if select in _SELECTED_BY_FEEDBACK:
            where.append(_SELECTED_BY_FEEDBACK[select])
        return self._query(
            "SELECT inference_id, input_text, output_text, occurred_at, adapter_version, route, mean_token_logprob "
            "FROM inference_log FINAL "
            f"WHERE {' AND '.join(where)} ORDER BY occurred_at DESC LIMIT {{limit:UInt32}}",
            parameters,
        )

    def review_trace_candidates(
        self,
        target: ReviewTarget,
        *,
        model_name: str | None,
        hours: int,
        share: float,
        select: ReviewSelect,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Stored traces (or sessions) that began in the last `hours`, newest first, as (target_id,
        began_at): the `share` of them whose id hashes under it, with a span or a logged inference of
        `model_name` when given, and those the `select` rule names (negative feedback, an error span)."""
        key = "trace_id" if target is ReviewTarget.trace else "assumeNotNull(session_id)"
        having = [
            "began_at >= now64(3) - toIntervalHour({hours:UInt32})",
            "cityHash64(target_id) % 10000 < {share:UInt32}",
        ]
        parameters: dict[str, Any] = {"hours": hours, "share": round(share * 10_000), "limit": limit}
        if model_name is not None:
            having.append(
                "(countIf(model_name = {model_name:String}) > 0 OR hasAny(groupUniqArray(trace_id), "
                "(SELECT groupUniqArray(assumeNotNull(trace_id)) FROM inference_log "
                "WHERE model_name = {model_name:String} AND trace_id IS NOT NULL)))"
            )
            parameters["model_name"] = model_name
        if select is ReviewSelect.errored:
            having.append("countIf(status = 'error') > 0")
        elif select is ReviewSelect.thumbs_down:
            negative = _NEGATIVE_TRACES if target is ReviewTarget.trace else _NEGATIVE_SESSIONS
            having.append(f"target_id IN ({negative})")
        return self._query(
            f"SELECT {key} AS target_id, min(started_at) AS began_at FROM span FINAL "
            f"{'WHERE session_id IS NOT NULL ' if target is ReviewTarget.session else ''}"
            f"GROUP BY target_id HAVING {' AND '.join(having)} ORDER BY began_at DESC LIMIT {{limit:UInt32}}",
            parameters,
        )

    def trace_for_review(self, trace_id: str, *, limit: int) -> list[dict[str, Any]]:
        """What a reviewer reads of one stored trace: its first `limit` spans by start (none when it is no
        longer stored)."""
        return self._query(
            "SELECT span_id, parent_span_id, name, kind, input_text, output_text, status, error, duration_ms, "
            "model_name, adapter_version, session_id, started_at FROM span FINAL "
            "WHERE trace_id = {trace_id:String} ORDER BY started_at, span_id LIMIT {limit:UInt32}",
            {"trace_id": trace_id, "limit": limit},
        )

    def session_for_review(self, session_id: str) -> list[dict[str, Any]]:
        """A stored session's turns in order: each trace's root (its earliest span while the root is not
        stored), whether any of its spans failed, and its first LLM span's model; none when it is gone."""
        return self._query(
            "SELECT trace_id, "
            "if(countIf(parent_span_id IS NULL) > 0, argMinIf(name, started_at, parent_span_id IS NULL), argMin(name, started_at)) AS turn_name, "
            "if(countIf(parent_span_id IS NULL) > 0, argMinIf(input_text, started_at, parent_span_id IS NULL), argMin(input_text, started_at)) AS turn_input, "
            "if(countIf(parent_span_id IS NULL) > 0, argMinIf(output_text, started_at, parent_span_id IS NULL), argMin(output_text, started_at)) AS turn_output, "
            "if(countIf(status = 'error') > 0, 'error', "
            "if(countIf(parent_span_id IS NULL) > 0, argMinIf(status, started_at, parent_span_id IS NULL), argMin(status, started_at))) AS turn_status, "
            "argMinIf(model_name, started_at, kind = 'llm') AS turn_model, min(started_at) AS turn_start "
            "FROM span FINAL WHERE session_id = {session_id:String} GROUP BY trace_id ORDER BY turn_start, trace_id",
            {"session_id": session_id},
        )

    def inference_for_review(self, inference_id: str) -> dict[str, Any] | None:
        """What a reviewer reads of one stored call: its messages, answer, model, version, route and trace."""
        rows = self._query(
            "SELECT inference_id, model_name, adapter_version, route, input_messages, input_text, output_text, trace_id "
            "FROM inference_log FINAL WHERE inference_id = {inference_id:String} LIMIT 1",
            {"inference_id": inference_id},
        )
        return rows[0] if rows else None

    def count(self, table: str) -> tuple[int, int]:
        """Rows and distinct event ids of `table`, read without FINAL: equal when nothing was stored twice."""
        row = self._query(f"SELECT count() AS rows, uniqExact(event_id) AS events FROM {_table(table)}", None)[0]
        return int(row["rows"]), int(row["events"])

    def _query(self, sql: str, parameters: dict[str, Any] | None) -> list[dict[str, Any]]:
        with self._lock:
            _fail_if_unavailable()
            return self._clickhouse().query(sql, parameters)


# Feedback on a span, trace or session has inference_id '' (the table's key cannot be NULL): those rows are
# one range of the primary key.
_FEEDBACK_ON = {
    FeedbackTarget.inference: "inference_id = {inference_id:String}",
    FeedbackTarget.span: "inference_id = '' AND trace_id = {trace_id:String} AND span_id = {span_id:String}",
    FeedbackTarget.trace: "inference_id = '' AND trace_id = {trace_id:String} AND span_id IS NULL",
    FeedbackTarget.session: "inference_id = '' AND session_id = {session_id:String}",
}
_STORED = {
    FeedbackTarget.inference: "inference_log WHERE inference_id = {inference_id:String}",
    FeedbackTarget.span: "span WHERE trace_id = {trace_id:String} AND span_id = {span_id:String}",
    FeedbackTarget.trace: "span WHERE trace_id = {trace_id:String}",
    FeedbackTarget.session: "span WHERE session_id = {session_id:String}",
}

# A verdict is +1 (positive), -1 (negative) or 0 (neither). Thumbs, when given, is the verdict: a rating
# beside it may grade something else (a review's thumbs is its rubric's first thumbs dimension, its rating
# the first rating one). A rating of 3 is the middle of the scale, neither, so a lukewarm rating never
# makes a disagreement.
_VERDICT = "multiIf(thumbs = 'up', 1, thumbs = 'down', -1, rating >= 4, 1, rating <= 2, -1, 0)"
# What the rules that read feedback add to the calls' WHERE; the other rules take every answered call.
_SELECTED_BY_FEEDBACK = {
    ReviewSelect.thumbs_down: (
        "inference_id IN (SELECT inference_id FROM feedback FINAL "
        "WHERE inference_id != '' AND thumbs = 'down' AND source != 'reviewer')"
    ),
    # Each judge's and each end user's latest verdict (one who changed their mind counts as they ended; a
    # comment without thumbs or rating is no verdict and leaves the one before it standing); feedback with no
    # actor cannot be told apart from anyone else's, so it counts on its own (its feedback id stands in).
    ReviewSelect.judge_disagreement: (
        "inference_id IN (SELECT inference_id FROM ("
        f"SELECT inference_id, source, argMax({_VERDICT}, (occurred_at, feedback_id)) AS verdict "
        "FROM feedback FINAL "
        "WHERE inference_id != '' AND source IN ('judge', 'end_user') AND (thumbs IS NOT NULL OR rating IS NOT NULL) "
        "GROUP BY inference_id, source, ifNull(actor, feedback_id)) "
        "GROUP BY inference_id "
        "HAVING (countIf(source = 'judge' AND verdict = 1) > 0 AND countIf(source = 'end_user' AND verdict = -1) > 0) "
        "OR (countIf(source = 'judge' AND verdict = -1) > 0 AND countIf(source = 'end_user' AND verdict = 1) > 0))"
    ),
}

# Negative feedback on a trace or session (thumbs down, or a rating of 1 or 2), from anyone but a reviewer:
# a review is what a queue produces, so it must not pull its own target back in.
_NEGATIVE = "source != 'reviewer' AND (thumbs = 'down' OR rating <= 2)"
_NEGATIVE_INFERENCES = f"SELECT inference_id FROM feedback FINAL WHERE inference_id != '' AND {_NEGATIVE}"
# Traces with negative feedback on the trace, on one of its spans, or on one of its inferences (one a span
# names, or one the gateway logged with the trace's id).
_NEGATIVE_TRACES = (
    f"SELECT assumeNotNull(trace_id) FROM feedback FINAL WHERE inference_id = '' AND trace_id IS NOT NULL AND {_NEGATIVE} "
    f"UNION ALL SELECT trace_id FROM span WHERE inference_id IN ({_NEGATIVE_INFERENCES}) "
    f"UNION ALL SELECT assumeNotNull(trace_id) FROM inference_log WHERE trace_id IS NOT NULL "
    f"AND inference_id IN ({_NEGATIVE_INFERENCES})"
)
# Sessions with negative feedback on the session, or on one of its traces as above.
_NEGATIVE_SESSIONS = (
    f"SELECT assumeNotNull(session_id) FROM feedback FINAL WHERE inference_id = '' AND session_id IS NOT NULL AND {_NEGATIVE} "
    f"UNION ALL SELECT assumeNotNull(session_id) FROM span WHERE session_id IS NOT NULL AND trace_id IN ({_NEGATIVE_TRACES})"
)


def _fail_if_unavailable() -> None:
    # Embedded chDB cannot be stopped under a running process, so the outage tests arm this failpoint
    # (services/runtime/failpoints.py) to make the store fail as a stopped server would.
    failpoints.hit(UNAVAILABLE_FAILPOINT, raises=ClickHouseError)


def _table(name: str) -> str:
    if name not in TABLES:
        raise ClickHouseError(f"the feedback store writes only {', '.join(TABLES)}, not {name!r}")
    return name
