"""Chosen spans as a dataset version (`flywheel ops dataset-from-spans`): the query that picks spans by
kind, name, service, age and the feedback given on them, the query for that feedback, and one chat
record per span with where it came from.

A record is the registry's chat format plus a `provenance` object. The registry validates `messages`
alone and keeps other keys (services/registry/datasets.py), the trainer and the evaluator read
`messages` alone, and DatasetCreate has no description or metadata field: so provenance travels in
each record, where it stays beside the example it explains, rather than in a field of the version.

Every value reaches the engine as a bound parameter; the LIMIT is a whole number this module bounds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from contracts.events import SpanKind
from services.monitor.traces import NAME_MAX, BadValue, checked_service

# Spans one dataset is built from at most: at the span table's 64,000 characters of input and of output
# each, a thousand spans stay under the query door's result cap (256 MiB, QueryLimits.max_result_bytes).
MAX_SPANS = 1000
# Feedback rows read for the chosen spans at most, under the 10,000 rows the monitor's query door returns
# by default (QueryRequest.max_rows), so one row more is seen rather than cut: past it the provenance
# would be partial, and the command refuses instead.
MAX_FEEDBACK_ROWS = 9_999
ROLES = ("system", "user", "assistant")


class FeedbackChoice(StrEnum):
    """Which feedback a span must have to be chosen."""

    thumbs_down = "thumbs-down"
    thumbs_up = "thumbs-up"
    corrected = "corrected"
    any = "any"


# Reviewer corrections only, as automatic retraining takes them (services/monitor/store.py): any app may
# send an end user's correction, and a correction becomes what the model is taught to say.
_CORRECTION = "source = 'reviewer' AND correction IS NOT NULL AND trimBoth(correction) != ''"
_PREDICATE = {
    FeedbackChoice.thumbs_down: "thumbs = 'down'",
    FeedbackChoice.thumbs_up: "thumbs = 'up'",
    FeedbackChoice.corrected: _CORRECTION,
    FeedbackChoice.any: "1",
}
# Each feedback row has one target (migration 0009): an inference (inference_id set), else a span
# (trace_id and span_id), a trace (trace_id alone) or a session (session_id alone).
_ON_SPAN = (
    "(trace_id, span_id) IN (SELECT assumeNotNull(trace_id), assumeNotNull(span_id) FROM feedback FINAL "
    "WHERE inference_id = '' AND trace_id IS NOT NULL AND span_id IS NOT NULL AND {p})"
)
_ON_INFERENCE = "ifNull(inference_id, '') IN (SELECT inference_id FROM feedback FINAL WHERE inference_id != '' AND {p})"
_ON_TRACE = (
    "trace_id IN (SELECT assumeNotNull(trace_id) FROM feedback FINAL "
    "WHERE inference_id = '' AND trace_id IS NOT NULL AND span_id IS NULL AND {p})"
)
_ON_SESSION = (
    "ifNull(session_id, '') IN (SELECT assumeNotNull(session_id) FROM feedback FINAL "
    "WHERE inference_id = '' AND trace_id IS NULL AND session_id IS NOT NULL AND {p})"
)

SPANS_SQL = (
    "SELECT trace_id, span_id, session_id, inference_id, name, kind, service_name, model_name, truncated, "
    "input_text, output_text FROM span FINAL WHERE {where} "
    "ORDER BY started_at DESC, trace_id, span_id LIMIT {limit}"
)
FEEDBACK_SQL = (
    "SELECT feedback_id, inference_id, trace_id, span_id, session_id, thumbs, rating, correction, source "
    "FROM feedback FINAL WHERE "
    "(inference_id = '' AND trace_id IN {trace_ids:Array(String)}) "
    "OR (inference_id != '' AND inference_id IN {inference_ids:Array(String)}) "
    "OR (inference_id = '' AND trace_id IS NULL AND session_id IN {session_ids:Array(String)}) "
    f"ORDER BY occurred_at, feedback_id LIMIT {MAX_FEEDBACK_ROWS + 1}"
)


@dataclass(frozen=True)
class SpanChoice:
    """Which spans become records: of `kind`, started since `since_ms`, and each other field that is set.
    `name` is exact, or a prefix when it ends with `*`."""

    since_ms: int
    kind: SpanKind = SpanKind.llm
    name: str | None = None
    service: str | None = None
    feedback: FeedbackChoice | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        where = ["kind = {kind:String}", "started_at >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')"]
        parameters: dict[str, Any] = {"kind": SpanKind(self.kind).value, "since_ms": self.since_ms}
        if self.name is not None:
            prefix = self.name.endswith("*")
            name = self.name[:-1] if prefix else self.name
            if not name or len(name) > NAME_MAX or "*" in name:
                raise BadValue(
                    f"a span name is 1 to {NAME_MAX} characters, matched exactly or as a prefix with one trailing *",
                    "name",
                )
            # startsWith, not LIKE: a `%` or `_` in a name is a character, not a wildcard.
            where.append("startsWith(name, {name:String})" if prefix else "name = {name:String}")
            parameters["name"] = name
        if self.service is not None:
            where.append("service_name = {service:String}")
            parameters["service"] = checked_service(self.service)
        if self.feedback is not None:
            predicate = _PREDICATE[self.feedback]
            # A correction is an answer to one model call: only feedback on the span or its inference has one.
            targets = [_ON_SPAN, _ON_INFERENCE]
            if self.feedback is not FeedbackChoice.corrected:
                targets += [_ON_TRACE, _ON_SESSION]
            where.append("(" + " OR ".join(target.format(p=predicate) for target in targets) + ")")
        return " AND ".join(where), parameters


def spans_query(chosen: SpanChoice, limit: int) -> tuple[str, dict[str, Any]]:
    """The spans `chosen` lets through, newest first, each once (FINAL: a span an exporter sent twice is one row)."""
    if not 1 <= limit <= MAX_SPANS:
        raise BadValue(f"a dataset is built from 1 to {MAX_SPANS} spans", "limit")
    where, parameters = chosen.where()
    return SPANS_SQL.format(where=where, limit=limit), parameters


def feedback_query(spans: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The feedback on the spans' traces and their spans, on the inferences they name, and on their sessions."""
    return FEEDBACK_SQL, {
        "trace_ids": sorted({span["trace_id"] for span in spans}),
        "inference_ids": sorted({span["inference_id"] for span in spans if span["inference_id"]}),
        "session_ids": sorted({span["session_id"] for span in spans if span["session_id"]}),
    }


def feedback_on(span: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows about `span`, each with its `target`: the span, its inference, its trace or its session."""
    found = []
    for row in rows:
        if row["inference_id"]:
            target = "inference" if row["inference_id"] == span["inference_id"] else None
        elif row["trace_id"] is not None:
            if row["trace_id"] != span["trace_id"]:
                target = None
            elif row["span_id"] is None:
                target = "trace"
            else:
                target = "span" if row["span_id"] == span["span_id"] else None
        else:
            target = "session" if span["session_id"] and row["session_id"] == span["session_id"] else None
        if target is not None:
            found.append({**row, "target": target})
    return found


def input_messages(text: str) -> list[dict[str, str]]:
    """The conversation a span's input holds: its messages when the input is a JSON list of them (or an
    object with `messages`, as OpenInference records a request), else the whole text as one user message."""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        parsed = parsed.get("messages")
    if isinstance(parsed, list) and parsed:
        messages = [message for message in map(_message, parsed) if message is not None]
        # Only a conversation the trainer can take whole: every turn a known role with text, ending with
        # the user's. A tool turn or an image part is not dropped silently: the input is kept as text instead.
        if len(messages) == len(parsed) and messages[-1]["role"] == "user":
            return messages
    return [{"role": "user", "content": text}]


def output_text(text: str) -> str:
    """The answer a span's output holds: the assistant's text when the output is a JSON message list or
    an OpenAI-style response (OpenInference records those), else the text as it is."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    if isinstance(parsed, dict) and isinstance(parsed.get("choices"), list) and parsed["choices"]:
        choice = parsed["choices"][0]
        parsed = [choice.get("message")] if isinstance(choice, dict) else None
    if isinstance(parsed, list) and parsed:
        last = _message(parsed[-1])
        if last is not None and last["role"] == "assistant":
            return last["content"]
    return text


def _message(item: Any) -> dict[str, str] | None:
    if not isinstance(item, dict) or item.get("role") not in ROLES:
        return None
    content = item.get("content")
    if content is None and isinstance(item.get("parts"), list):
        # The GenAI conventions' gen_ai.input.messages: text parts under `parts`.
        texts = [
            part["content"]
            for part in item["parts"]
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("content"), str)
        ]
        content = "".join(texts) if texts and len(texts) == len(item["parts"]) else None
    return {"role": str(item["role"]), "content": content} if isinstance(content, str) else None


def correction_of(feedback: list[dict[str, Any]]) -> str | None:
    """The newest reviewer correction given on the span or its inference (rows come oldest first)."""
    corrections = [
        row["correction"].strip()
        for row in feedback
        if row["target"] in ("span", "inference")
        and row["source"] == "reviewer"
        and row["correction"]
        and row["correction"].strip()
    ]
    return corrections[-1] if corrections else None


def span_record(span: dict[str, Any], feedback: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One chat record: the span's input, then its output or, when a reviewer corrected it, the correction;
    with `provenance`. None when there is nothing to learn from (no input, or no answer)."""
    correction = correction_of(feedback)
    answer = correction if correction is not None else output_text(span["output_text"] or "")
    if not (span["input_text"] or "").strip() or not answer.strip():
        return None
    return {
        "messages": [*input_messages(span["input_text"]), {"role": "assistant", "content": answer}],
        "provenance": {
            "trace_id": span["trace_id"],
            "span_id": span["span_id"],
            "session_id": span["session_id"],
            "inference_id": span["inference_id"],
            "span_name": span["name"],
            "model_name": span["model_name"],
            "assistant": "correction" if correction is not None else "output",
            "feedback": [
                {
                    "feedback_id": row["feedback_id"],
                    "target": row["target"],
                    "thumbs": row["thumbs"],
                    "rating": row["rating"],
                    "source": row["source"],
                    "corrected": bool(row["correction"] and row["correction"].strip()),
                }
                for row in feedback
            ],
        },
    }


@dataclass(frozen=True)
class Built:
    """The records built from the chosen spans, and how many spans gave none, by reason."""

    records: list[dict[str, Any]]
    truncated: int
    empty: int

    @property
    def all_corrections(self) -> bool:
        return bool(self.records) and all(r["provenance"]["assistant"] == "correction" for r in self.records)

    def jsonl(self) -> str:
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in self.records)


def build_records(spans: list[dict[str, Any]], feedback: list[dict[str, Any]]) -> Built:
    """One record per span (the first row of a span seen twice), in the order the spans come."""
    records, seen, truncated, empty = [], set(), 0, 0
    for span in spans:
        key = (span["trace_id"], span["span_id"])
        if key in seen:
            continue
        seen.add(key)
        if span["truncated"]:
            # Text cut at intake is not the conversation that happened: as a target it would teach a cut answer.
            truncated += 1
            continue
        record = span_record(span, feedback_on(span, feedback))
        if record is None:
            empty += 1
            continue
        records.append(record)
    return Built(records, truncated, empty)
