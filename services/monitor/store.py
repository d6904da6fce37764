"""The monitor's only connections: the process's ClickHouse store (windows, alerts) and a read-only one (the query door)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from contracts.envelope import Envelope
from contracts.events import AlertRaised, SpanSelector
from contracts.http import QueryResult
from services.monitor.preference_datasets import feedback_query as preference_feedback_query
from services.monitor.rules import Rule
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.clickhouse.query_guard import QueryGuard, QueryLimits

_TIME = pa.timestamp("ms", "UTC")

# One row per inference (deduplicated) with its feedback folded in; rule queries read these columns.
# Rules judge a model version by its answers, so only feedback on an inference counts: feedback on a
# span, trace or session (inference_id '') names no model version and is left to the trace views.
MONITORED = """(
    SELECT i.*, fb.thumbs_down AS thumbs_down, fb.thumbs_given AS thumbs_given,
           fb.rating_sum AS rating_sum, fb.ratings_given AS ratings_given
    FROM (SELECT * FROM inference_log FINAL) AS i
    LEFT JOIN (
        SELECT inference_id, countIf(thumbs = 'down') AS thumbs_down, countIf(thumbs IS NOT NULL) AS thumbs_given,
               sum(ifNull(rating, 0)) AS rating_sum, count(rating) AS ratings_given
        FROM feedback FINAL WHERE inference_id != '' GROUP BY inference_id
    ) AS fb ON i.inference_id = fb.inference_id
)"""

_WINDOW = "occurred_at >= {start:DateTime64(3, 'UTC')} AND occurred_at < {end:DateTime64(3, 'UTC')}"
_ANSWERED = "status = 'ok' AND trimBoth(output_text) != ''"

# A span counts in the window it ended in: only then are its duration, status and cost known. The span
# table is ordered by trace, not time, so the bound that skips old data is on occurred_at (the partition
# key, with a min-max per part): the intake stamps it when it takes the span, after the span ended. The
# hour allows for an app's clock running ahead of the intake's; a span stamped earlier than that is missed.
_SPAN_WINDOW = (
    "ended_at >= {start:DateTime64(3, 'UTC')} AND ended_at < {end:DateTime64(3, 'UTC')} "
    "AND occurred_at >= {start:DateTime64(3, 'UTC')} - INTERVAL 1 HOUR"
)


class MonitorStore:
    """Windowed reads for rules, the alert table, corrections for retraining, and read-only SQL."""

    def __init__(self, clickhouse: Callable[[], ClickHouseStore], readonly: Callable[[], ClickHouseStore]) -> None:
        # Callables: the stores open (and migrate) on first use, not when the app is built.
        self._clickhouse = clickhouse
        self._readonly = readonly
        # One lock per handle: the query door then waits for at most the query in flight on its own
        # handle, never behind a whole tick's run of window queries on the other.
        self._lock = threading.Lock()
        self._readonly_lock = threading.Lock()

    def _query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return self._clickhouse().query(sql, parameters)

    def check_rule(self, rule: Rule) -> None:
        """Run the rule's SQL over no rows on the read-only handle; the engine's refusal is the reason."""
        if rule.spans is not None:
            # An empty window now: the selector's values bound as they will be on every tick.
            now = datetime.now(UTC)
            sql, parameters = self._span_aggregate_sql(rule, rule.spans)
            with self._readonly_lock:
                self._readonly().query(sql, {**parameters, "start": now, "end": now})
            return
        sql = self._aggregate_sql(rule) if rule.spec.kind == "sql" else self._values_sql(rule, rule.expression)
        with self._readonly_lock:
            self._readonly().query(sql.replace(_WINDOW, "0"), None if rule.spec.kind == "sql" else {"limit": 1})

    @staticmethod
    def _scope(rule: Rule) -> str:
        return ", ".join(rule.scope)

    def _aggregate_sql(self, rule: Rule) -> str:
        return (
            f"SELECT {self._scope(rule)}, toFloat64({rule.expression}) AS value, toUInt64({rule.spec.samples}) AS samples "
            f"FROM {MONITORED} WHERE {_WINDOW} GROUP BY {self._scope(rule)}"
        )

    def _values_sql(self, rule: Rule, expression: str) -> str:
        # A deterministic sample: the same inferences are looked at on every tick, so a value does not flicker.
        # A scorer judges answers: an errored request or an empty answer states nothing to judge.
        answered = f" AND {_ANSWERED}" if rule.spec.scorer else ""
        return (
            f"SELECT {self._scope(rule)}, {expression} AS value, input_text, output_text FROM {MONITORED} "
            f"WHERE {_WINDOW}{answered} ORDER BY cityHash64(inference_id) LIMIT {{limit:UInt32}} BY {self._scope(rule)}"
        )

    @staticmethod
    def _span_aggregate_sql(rule: Rule, spans: SpanSelector) -> tuple[str, dict[str, Any]]:
        # Which conditions apply depends only on which fields the selector has; their values are
        # parameters, so a span name never becomes SQL text.
        conditions, parameters = [_SPAN_WINDOW], {}
        if spans.kind is not None:
            conditions.append("kind = {span_kind:String}")
            parameters["span_kind"] = spans.kind.value
        if spans.name_prefix is not None:
            conditions.append("startsWith(name, {span_name_prefix:String})")
            parameters["span_name_prefix"] = spans.name_prefix
        elif spans.name is not None:
            conditions.append("name = {span_name:String}")
            parameters["span_name"] = spans.name
        if spans.service is not None:
            conditions.append("service_name = {span_service:String}")
            parameters["span_service"] = spans.service
        # Spans without a model (retrieval, tools) are one scope, '' as alerts name no model.
        scope = "ifNull(model_name, '') AS span_model, " if rule.scope else ""
        group = "GROUP BY span_model " if rule.scope else ""
        sql = (
            f"SELECT {scope}toFloat64({rule.expression}) AS value, toUInt64({rule.spec.samples}) AS samples "
            # LIMIT 1 BY folds the copies of a span an exporter sent twice, as FINAL would; FINAL itself
            # would read every part, as ClickHouse does not prune by partition under it.
            f"FROM (SELECT * FROM span WHERE {' AND '.join(conditions)} LIMIT 1 BY trace_id, span_id) {group}"
            # Without it, a rule with no scope would get one row of nothing from an empty window.
            "HAVING count() > 0"
        )
        return sql, parameters

    def aggregate(self, rule: Rule, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Per scope: the rule's aggregate `value` and its `samples` over [start, end) (its spans, for a span rule)."""
        if rule.spans is not None:
            sql, parameters = self._span_aggregate_sql(rule, rule.spans)
            rows = self._query(sql, {**parameters, "start": start, "end": end})
            for row in rows:
                if rule.scope:
                    row["model_name"] = row.pop("span_model")
            return rows
        return self._query(self._aggregate_sql(rule), {"start": start, "end": end})

    def values(self, rule: Rule, start: datetime, end: datetime, limit: int) -> list[dict[str, Any]]:
        """Per scope, up to `limit` rows of the metric's column (with input and output text) over [start, end)."""
        return self._query(self._values_sql(rule, rule.expression), {"start": start, "end": end, "limit": limit})

    # ------------------------------------------------------------------------------------ alerts

    def open_alert(self, rule_name: str, scope: dict[str, Any]) -> dict[str, Any] | None:
        """The open or acknowledged alert of this rule and scope, if any."""
        rows = self._query(
            "SELECT * FROM alert FINAL WHERE rule_name = {rule:String} AND model_name = {model:String} "
            "AND ifNull(adapter_version, 0) = {adapter:UInt32} AND ifNull(prompt_version, 0) = {prompt:UInt32} "
            "AND state != 'resolved' ORDER BY window_end DESC LIMIT 1",
            _scope_parameters(rule_name, scope),
        )
        return rows[0] if rows else None

    def last_opened(self, rule_name: str, scope: dict[str, Any]) -> datetime | None:
        """When this rule last opened an alert for this scope (the cooldown's start)."""
        rows = self._query(
            "SELECT max(window_end) AS at, count() AS n FROM alert FINAL WHERE rule_name = {rule:String} AND model_name = {model:String} "
            "AND ifNull(adapter_version, 0) = {adapter:UInt32} AND ifNull(prompt_version, 0) = {prompt:UInt32}",
            _scope_parameters(rule_name, scope),
        )
        return rows[0]["at"] if rows and rows[0]["n"] else None

    def write_alert(self, envelope: Envelope[AlertRaised]) -> None:
        """Store one state of an alert; the latest `occurred_at` per alert_id wins."""
        alert = envelope.payload
        table = pa.table(
            {
                "event_id": pa.array([str(envelope.event_id)], pa.string()),
                "occurred_at": pa.array([envelope.occurred_at], _TIME),
                "producer": pa.array([envelope.producer], pa.string()),
                "correlation_id": pa.array([envelope.correlation_id or ""], pa.string()),
                "alert_id": pa.array([alert.alert_id], pa.string()),
                "rule_name": pa.array([alert.rule_name], pa.string()),
                "rule_version": pa.array([alert.rule_version], pa.uint32()),
                "severity": pa.array([alert.severity.value], pa.string()),
                "state": pa.array([alert.state.value], pa.string()),
                "model_name": pa.array([alert.model_name], pa.string()),
                "adapter_version": pa.array([alert.adapter_version], pa.uint32()),
                "prompt_version": pa.array([alert.prompt_version], pa.uint32()),
                "metric": pa.array([alert.metric], pa.string()),
                "value": pa.array([alert.value], pa.float64()),
                "threshold": pa.array([alert.threshold], pa.float64()),
                "window_start": pa.array([alert.window_start], _TIME),
                "window_end": pa.array([alert.window_end], _TIME),
                "message": pa.array([alert.message], pa.string()),
                "spans": pa.array(
                    [alert.spans.model_dump_json(exclude_none=True) if alert.spans else None], pa.string()
                ),
            }
        )
        with self._lock:
            self._clickhouse().insert_arrow("alert", table, dedup_token=str(envelope.event_id))

    def alerts(self, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Current state of alerts, newest first."""
        where = "WHERE state = {state:String}" if state else ""
        return self._query(
            f"SELECT * FROM alert FINAL {where} ORDER BY occurred_at DESC LIMIT {{limit:UInt32}}",
            {"state": state or "", "limit": limit},
        )

    def alert(self, alert_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM alert FINAL WHERE alert_id = {id:String} LIMIT 1", {"id": alert_id})
        return rows[0] if rows else None

    # ------------------------------------------------------------------------------ evaluations

    def write_evaluations(self, rows: list[dict[str, Any]]) -> None:
        """Store one tick's evaluations (what the console charts over time)."""
        if not rows:
            return
        columns = {name: [row[name] for row in rows] for name in rows[0]}
        table = pa.table(
            {
                "evaluation_id": pa.array(columns["evaluation_id"], pa.string()),
                "evaluated_at": pa.array(columns["evaluated_at"], _TIME),
                "rule_name": pa.array(columns["rule_name"], pa.string()),
                "rule_version": pa.array(columns["rule_version"], pa.uint32()),
                "metric": pa.array(columns["metric"], pa.string()),
                "kind": pa.array(columns["kind"], pa.string()),
                "model_name": pa.array(columns["model_name"], pa.string()),
                "adapter_version": pa.array(columns["adapter_version"], pa.uint32()),
                "prompt_version": pa.array(columns["prompt_version"], pa.uint32()),
                "window_start": pa.array(columns["window_start"], _TIME),
                "window_end": pa.array(columns["window_end"], _TIME),
                "value": pa.array(columns["value"], pa.float64()),
                "samples": pa.array(columns["samples"], pa.uint64()),
                "firing": pa.array(columns["firing"], pa.bool_()),
                "reason": pa.array(columns["reason"], pa.string()),
            }
        )
        with self._lock:
            self._clickhouse().insert_arrow("monitor_evaluation", table, dedup_token=columns["evaluation_id"][0])

    def evaluations(
        self, since: datetime, kinds: tuple[str, ...] | None = None, limit: int = 5000
    ) -> list[dict[str, Any]]:
        """Stored evaluations whose window ended after `since`, oldest first; `kinds` narrows to metric kinds."""
        where = "AND kind IN {kinds:Array(String)}" if kinds else ""
        return self._query(
            f"SELECT * FROM monitor_evaluation FINAL WHERE window_end >= {{since:DateTime64(3, 'UTC')}} {where} "
            "ORDER BY window_end DESC, rule_name LIMIT {limit:UInt32}",
            {"since": since, "kinds": list(kinds or ()), "limit": limit},
        )[::-1]

    # ------------------------------------------------------------------------------------ canary

    def canary_arms(
        self, model_name: str, versions: tuple[int, int], start: datetime, end: datetime, latency_sample: int = 2000
    ) -> list[dict[str, Any]]:
        """Per adapter version of `versions` over [start, end): inferences, errors, thumbs, samples of ok latencies and of ratings."""
        # A uniform sample of latencies keeps the bootstrap's memory bounded (resamples x sample); its interval
        # then also carries the sampling error, so it only errs towards waiting longer. A response-cache hit
        # (route 'cache') counts as the version's inference, with its errors and feedback, but not its latency:
        # the canary arm is never cached, so the control's hits would make it look faster than it is.
        return self._query(
            "SELECT adapter_version, count() AS inferences, countIf(status = 'error') AS errors, "
            "toUInt64(sum(thumbs_given)) AS thumbs_given, toUInt64(sum(thumbs_down)) AS thumbs_down, "
            "groupArraySampleIf({sample:UInt32}, 1)(latency_total_ms, status = 'ok' AND route != 'cache') AS latencies, "
            "groupArraySampleIf({sample:UInt32}, 2)(rating_sum / ratings_given, ratings_given > 0) AS ratings "
            f"FROM {MONITORED} WHERE model_name = {{model:String}} AND adapter_version IN {{versions:Array(UInt32)}} AND {_WINDOW} "
            "GROUP BY adapter_version",
            {"model": model_name, "versions": list(versions), "start": start, "end": end, "sample": latency_sample},
        )

    def answers(
        self, model_name: str, versions: tuple[int, int], start: datetime, end: datetime, limit: int
    ) -> list[dict[str, Any]]:
        """Up to `limit` answered inferences per adapter version (a deterministic sample) with prompt and answer;
        generated ones only, since a response-cache hit repeats an answer already in the sample's population."""
        return self._query(
            f"SELECT adapter_version, input_text, output_text FROM {MONITORED} "
            f"WHERE model_name = {{model:String}} AND adapter_version IN {{versions:Array(UInt32)}} AND {_ANSWERED} AND route != 'cache' AND {_WINDOW} "
            "ORDER BY cityHash64(inference_id) LIMIT {limit:UInt32} BY adapter_version",
            {"model": model_name, "versions": list(versions), "start": start, "end": end, "limit": limit},
        )

    # ---------------------------------------------------------------------------------- feedback

    def preference_feedback(self, model_name: str) -> list[dict[str, Any]]:
        """The model's answered inferences with feedback, as `flywheel ops preference-dataset` reads them."""
        return self._query(*preference_feedback_query(model_name))

    def corrections(self, model_name: str, limit: int = 10_000) -> list[dict[str, Any]]:
        """Reviewers' corrected answers for `model_name` with their prompts (redacted by the sink), one per (prompt, correction).

        Only `source = 'reviewer'`: the feedback door accepts that source from reviewer keys alone and
        publishes it as feedback.reviewed, which only the feedback service may write (the sink dead-letters
        the claim on feedback.received), while any app may send end-user corrections, and those must not
        steer what the model learns. Only corrections of an inference: a correction of a span, trace or
        session has no prompt of this model to pair with, so it is not a training example (yet)."""
        return self._query(
            "SELECT input_messages, input_text, correction FROM ("
            "  SELECT i.input_messages AS input_messages, i.input_text AS input_text, trimBoth(f.correction) AS correction, f.occurred_at AS at"
            "  FROM (SELECT * FROM feedback FINAL WHERE inference_id != '') AS f INNER JOIN (SELECT * FROM inference_log FINAL) AS i ON f.inference_id = i.inference_id"
            "  WHERE i.model_name = {model:String} AND f.source = 'reviewer' AND f.correction IS NOT NULL AND trimBoth(f.correction) != '' AND i.input_text != ''"
            ") ORDER BY at DESC LIMIT 1 BY input_text, correction LIMIT {limit:UInt32}",
            {"model": model_name, "limit": limit},
        )

    def summary(self, since: datetime, bucket_s: int) -> list[dict[str, Any]]:
        """inference_metrics per bucket, model and version since `since` (the ops view)."""
        # toDateTime64: a plain DateTime comes back from Arrow as epoch seconds, not a timestamp.
        return self._query(
            "SELECT * REPLACE (toDateTime64(bucket, 0, 'UTC') AS bucket) FROM inference_metrics(bucket_s = {bucket:UInt32}) WHERE bucket >= {since:DateTime64(3, 'UTC')} "
            "ORDER BY bucket, model_name, adapter_version",
            {"bucket": bucket_s, "since": since},
        )

    # ----------------------------------------------------------------------------------- read-only

    def read(self, query: tuple[str, dict[str, Any]], limits: QueryLimits) -> list[dict[str, Any]]:
        """Rows of one of the monitor's own read queries (traces.py) on the read-only handle, under the door's caps."""
        # Through the guard like `flywheel ops traces` beside no process: the same SQL, judged alike, and a
        # console page never waits behind a tick's queries on the other handle.
        sql, parameters = query
        with self._readonly_lock:
            handle = self._readonly()
            rows: list[dict[str, Any]] = QueryGuard(handle.database).run(handle, sql, parameters, limits).to_pylist()
        return rows

    def read_only_query(
        self, sql: str, parameters: dict[str, Any], max_rows: int, limits: QueryLimits | None = None
    ) -> QueryResult:
        """Run `sql` through the query guard (one SELECT over Flywheel's tables, allowed functions) under `limits`,
        on the handle opened with readonly=1; QueryRefused, QueryOverLimit or ClickHouseError say why not."""
        started = time.perf_counter()
        with self._readonly_lock:
            handle = self._readonly()
            table = QueryGuard(handle.database).run(handle, sql, parameters, limits or QueryLimits())
        rows = table.slice(0, max_rows).to_pylist()
        return QueryResult(
            columns=list(table.column_names),
            rows=[list(row.values()) for row in rows],
            row_count=len(rows),
            truncated=table.num_rows > max_rows,
            elapsed_ms=(time.perf_counter() - started) * 1000,
        )


def _scope_parameters(rule_name: str, scope: dict[str, Any]) -> dict[str, Any]:
    return {
        "rule": rule_name,
        "model": scope.get("model_name", ""),
        "adapter": scope.get("adapter_version") or 0,
        "prompt": scope.get("prompt_version") or 0,
    }
