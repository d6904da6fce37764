"""What `flywheel ops agreement` reads: reviewers' thumbs and ratings from the feedback table, as units of
services/runtime/agreement.py (which computes alpha, kappa and the conflicts)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping

MAX_JUDGEMENTS = 200_000  # reviewer judgements read at most, newest kept: enough for any review backlog
# The target a feedback row names, as one string: an inference, a span of a trace, a trace or a session.
_TARGET = (
    "multiIf(inference_id != '', concat('inference:', inference_id), span_id IS NOT NULL, "
    "concat('span:', ifNull(trace_id, ''), '/', span_id), trace_id IS NOT NULL, concat('trace:', trace_id), "
    "concat('session:', ifNull(session_id, '')))"
)
_JUDGEMENTS_SQL = (
    "SELECT target, actor, thumbs, rating FROM ("
    f"  SELECT {_TARGET} AS target, actor, thumbs, rating, occurred_at FROM feedback FINAL"
    "  WHERE source = 'reviewer' AND actor IS NOT NULL AND (thumbs IS NOT NULL OR rating IS NOT NULL)"
    "  AND occurred_at >= fromUnixTimestamp64Milli({since:Int64}){model}"
    "  ORDER BY occurred_at DESC LIMIT {limit:UInt32}"
    ") ORDER BY occurred_at ASC"
)
_OF_MODEL = " AND inference_id IN (SELECT inference_id FROM inference_log WHERE model_name = {model_name:String})"


def judgements_query(since_ms: int, model_name: str | None = None) -> tuple[str, dict[str, object]]:
    """Reviewers' thumbs and ratings since `since_ms`, oldest first, each naming its target and reviewer.
    Only `source = 'reviewer'`: the door takes that source from reviewer keys alone and records the key's
    principal as the actor, so no one can vote twice under two names. With `model_name`, only feedback on
    that model's inferences."""
    parameters: dict[str, object] = {"since": since_ms, "limit": MAX_JUDGEMENTS}
    if model_name is not None:
        parameters["model_name"] = model_name
    return _JUDGEMENTS_SQL.replace("{model}", _OF_MODEL if model_name else ""), parameters


def units_of(rows: Iterable[Mapping[str, object]], value_key: str) -> dict[Hashable, dict[str, float | str]]:
    """Rows of (target, actor, value_key) as units: each reviewer's latest value per target wins, since
    the rows come oldest first; rows without a value are left out."""
    units: dict[Hashable, dict[str, float | str]] = defaultdict(dict)
    for row in rows:
        value = row[value_key]
        if value is not None:
            units[row["target"]][str(row["actor"])] = value  # type: ignore[assignment]
    return dict(units)
