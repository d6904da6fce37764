"""The monitor's part of the `flywheel` command, by group in `app` (services/cli/main.py mounts it, finding
this module by name): `flywheel ops traffic|latency|feedback|alerts|drift|models`, readable tables over
the ops views; `flywheel ops traces|sessions|trace`, the pipelines' traces (migration 0008);
`flywheel ops dataset-from-spans`, chosen spans published as a registry dataset version;
`flywheel ops preference-dataset`, preference pairs built from a model's feedback, published likewise; and
`flywheel ops sql`, read-only SQL; the query door is the monitor's.

Beside a live `flywheel up` the queries go through the monitor's read-only door `/monitor/v1/query`
(chDB lets one process own its data directory); when nothing answers, the store is opened read-only
behind the same guard and caps as the door.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from contracts.events import SpanKind
from services.monitor.preference_datasets import MAX_INFERENCES, MAX_PAIRS, build_pairs
from services.monitor.preference_datasets import feedback_query as preference_feedback_query
from services.monitor.span_datasets import (
    MAX_FEEDBACK_ROWS,
    MAX_SPANS,
    FeedbackChoice,
    SpanChoice,
    build_records,
)
from services.monitor.span_datasets import feedback_query as span_feedback_query
from services.monitor.span_datasets import spans_query as span_datasets_query
from services.monitor.trace_judging import (
    DEFAULT_BUDGET,
    DEFAULT_RUBRICS,
    MAX_BUDGET,
    MAX_JUDGED,
    MIN_BUDGET,
    Level,
    Verdict,
    judge_all,
    recent_targets,
    transcripts_of,
)
from services.monitor.traces import (
    MAX_LISTED,
    MAX_TREE_SPANS,
    BadValue,
    SessionFilter,
    TraceFeedback,
    TraceFilter,
    checked_session_id,
    checked_trace_id,
    feedback_summary,
    sessions_query,
    since_ms,
    spans_query,
    trace_feedback_query,
    traces_query,
)
from services.runtime.span_tree import Placed, tree_order
from services.runtime.doors import bearer_header
from services.runtime.errors import FlywheelError
from services.runtime.settings import FlywheelSettings, load_settings
from services.runtime.spans import RetrainingTrace

app = typer.Typer()
ops_app = typer.Typer()
app.add_typer(ops_app, name="ops")

READONLY = 164  # ClickHouse's error code for a statement refused on a read-only connection

SQL = {
    "traffic": "SELECT bucket, model_name, adapter_version, prompt_version, requests, round(error_rate, 4) AS error_rate, tokens_in, tokens_out, round(cost_usd, 4) AS cost_usd "
    "FROM inference_metrics(bucket_s = {bucket:UInt32}) WHERE bucket >= now() - toIntervalHour({hours:UInt32}) ORDER BY bucket, model_name, adapter_version",
    "latency": "SELECT bucket, model_name, adapter_version, requests, round(latency_p50_ms, 1) AS p50_ms, round(latency_p95_ms, 1) AS p95_ms, round(latency_p99_ms, 1) AS p99_ms "
    "FROM inference_metrics(bucket_s = {bucket:UInt32}) WHERE bucket >= now() - toIntervalHour({hours:UInt32}) ORDER BY bucket, model_name, adapter_version",
    "feedback": "SELECT bucket, model_name, adapter_version, requests, round(feedback_coverage, 3) AS coverage, round(thumbs_down_rate, 3) AS thumbs_down_rate, round(mean_rating, 2) AS mean_rating "
    "FROM inference_metrics(bucket_s = {bucket:UInt32}) WHERE bucket >= now() - toIntervalHour({hours:UInt32}) ORDER BY bucket, model_name, adapter_version",
    "alerts": "SELECT alert_id, severity, state, rule_name, rule_version, model_name, adapter_version, round(value, 4) AS value, threshold, window_end, message "
    "FROM alert FINAL WHERE window_end >= now() - toIntervalHour({hours:UInt32}) ORDER BY occurred_at DESC",
    # Every evaluation the monitor stored, firing or not: the drift itself over time, not only its alerts.
    "drift": "SELECT window_end, rule_name, rule_version, model_name, adapter_version, metric, round(value, 4) AS value, samples, firing, reason FROM monitor_evaluation FINAL "
    "WHERE kind IN ('psi', 'embedding', 'unsafe', 'hallucination') AND window_end >= now() - toIntervalHour({hours:UInt32}) ORDER BY window_end DESC, rule_name LIMIT 1000",
}


def door_and_key(settings: FlywheelSettings, service: str) -> tuple[str, str | None]:
    """Where `service`'s door is and the key to present: the live process recorded under FLYWHEEL_HOME
    (whatever its port), else FLYWHEEL_HTTP_HOST:PORT; FLYWHEEL_API_KEY, else the home's admin.key
    (services/runtime/running.py), else FLYWHEEL_MONITOR_API_KEY."""
    from services.runtime.running import client_key, door_of

    door = door_of(settings.home, service) or f"http://{settings.http_host}:{settings.http_port}"
    return door, client_key(settings.home) or os.environ.get("FLYWHEEL_MONITOR_API_KEY")


def run_query(sql: str, parameters: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Through the live monitor's query door when one answers, else on the store opened read-only."""
    import httpx

    settings = load_settings(FlywheelSettings)
    door, key = door_and_key(settings, "monitor")
    url = f"{door}/monitor/v1/query"
    try:
        response = httpx.post(url, json={"sql": sql, "parameters": parameters}, headers=bearer_header(key), timeout=60)
    except httpx.TransportError:
        from services.monitor.settings import MonitorSettings
        from services.runtime.clickhouse import open_clickhouse
        from services.runtime.clickhouse.query_guard import QueryGuard, QueryOverLimit

        with open_clickhouse(settings.clickhouse_url, settings.home, readonly=True) as store:
            try:
                # The same guard and caps as the monitor's door, so the views read alike with or without a running process.
                table = QueryGuard(store.database).run(
                    store, sql, parameters, load_settings(MonitorSettings).query_limits()
                )
            except QueryOverLimit as over:
                raise typer.BadParameter(str(over)) from None
        return list(table.column_names), [list(row.values()) for row in table.to_pylist()]
    if response.status_code != 200:
        raise typer.BadParameter(
            f"{url} answered {response.status_code}: {response.text[:500]} (set FLYWHEEL_API_KEY to a viewer key)"
        )
    body = response.json()
    return body["columns"], body["rows"]


def print_table(title: str, columns: list[str], rows: list[list[Any]], *, whole: tuple[str, ...] = ()) -> None:
    """`whole`: columns folded onto more lines where others are cut with an ellipsis (ids a user copies)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold" if column in whole else "ellipsis")
    for row in rows:
        # Text, not a markup string: a span's name is an app's text, and `[/]` in it must print, not style.
        table.add_row(*(Text("" if value is None else _printable(value)) for value in row))
    Console().print(table if rows else f"{title}: no rows")


def _view(name: str, help_text: str) -> Any:
    def command(
        hours: int = typer.Option(24, help="Hours of history."),
        bucket_s: int = typer.Option(3600, "--bucket-s", help="Bucket width in seconds."),
    ) -> None:
        columns, rows = run_query(SQL[name], {"hours": hours, "bucket": bucket_s})
        print_table(f"{name} (last {hours} h)", columns, rows)

    command.__doc__ = help_text
    return command


def models() -> None:
    """Adapter versions and their stages, from the registry's door."""
    from services.runtime.registry_client import RegistryError, RegistrySyncClient

    door, key = door_and_key(load_settings(FlywheelSettings), "registry")
    try:
        page = RegistrySyncClient(door, key).adapters(limit=500)
    except RegistryError as error:
        raise typer.BadParameter(str(error)) from None
    items = [adapter.model_dump(mode="json") for adapter in page.items]
    columns = ["model_name", "version", "stage", "canary_percent", "dataset_name", "dataset_version", "created_at"]
    print_table("adapters", columns, [[item.get(c) for c in columns] for item in items])


ops_app.command("traffic")(_view("traffic", "Requests, errors, tokens and cost per bucket and model version."))
ops_app.command("latency")(_view("latency", "Latency quantiles per bucket and model version."))
ops_app.command("feedback")(
    _view("feedback", "Feedback coverage, thumbs-down rate and mean rating per bucket and model version.")
)
ops_app.command("alerts")(_view("alerts", "Alerts and their states."))
ops_app.command("drift")(_view("drift", "Drift and live-quality values per rule evaluation (firing or not)."))
ops_app.command("models")(models)


@ops_app.command()
def sql(
    query: Annotated[
        str,
        typer.Argument(help='A read-only ClickHouse query, e.g. "SELECT * FROM inference_metrics(bucket_s = 3600)".'),
    ],
    max_rows: Annotated[int, typer.Option(help="Rows printed at most.")] = 1000,
) -> None:
    """Run a read-only query and print tab-separated rows with a header; the engine refuses writes."""
    import httpx

    settings = load_settings(FlywheelSettings)
    # chDB lets one process open the data directory: beside a live monitor, ask its query door instead.
    door, key = door_and_key(settings, "monitor")
    url = f"{door}/monitor/v1/query"
    try:
        response = httpx.post(url, json={"sql": query, "max_rows": max_rows}, headers=bearer_header(key), timeout=60)
    except httpx.ConnectError:
        columns, rows = _query_store(settings, query, max_rows)
    else:
        if response.status_code == 401 and not key:
            raise FlywheelError(
                f"a Flywheel process serves the monitor at {door} and holds the ClickHouse data: set FLYWHEEL_API_KEY to a viewer's key (`flywheel registry keys create NAME --role viewer`); no {settings.home / 'admin.key'} was found"
            )
        if response.status_code != 200:
            raise FlywheelError(
                f"{url} answered {response.status_code}: {response.json().get('error', {}).get('message', response.text)}"
            )
        body = response.json()
        columns, rows = body["columns"], body["rows"]
    typer.echo("\t".join(columns))
    for row in rows:
        typer.echo("\t".join("" if value is None else str(value) for value in row))


def _query_store(settings: FlywheelSettings, query: str, max_rows: int) -> tuple[list[str], list[list[Any]]]:
    from services.monitor.settings import MonitorSettings
    from services.runtime.clickhouse import ClickHouseError, open_clickhouse
    from services.runtime.clickhouse.query_guard import (
        QueryGuard,
        QueryOverLimit,
        QueryRefused,
    )

    with open_clickhouse(settings.clickhouse_url, settings.home, readonly=True) as store:
        try:
            # The same guard and caps as the monitor's door: a query behaves alike with or without a running process.
            table = QueryGuard(store.database).run(store, query, None, load_settings(MonitorSettings).query_limits())
        except (QueryRefused, QueryOverLimit) as refused:
            raise FlywheelError(f"refused: {refused}") from None
        except ClickHouseError as error:
            if error.code == READONLY:
                raise FlywheelError(
                    "refused: `flywheel ops sql` is read-only and this statement writes or changes settings"
                ) from None
            raise FlywheelError(f"ClickHouse refused the query: {str(error).splitlines()[0]}") from None
    rows = table.slice(0, max_rows).to_pylist()
    return table.column_names, [list(row.values()) for row in rows]


# ------------------------------------------------------------------------------------------- traces

Since = Annotated[
    str,
    typer.Option(help="How far back: a duration (30m, 24h, 7d) or an ISO 8601 time (UTC unless it names a zone)."),
]
Limit = Annotated[int, typer.Option(min=1, max=MAX_LISTED, help="Rows at most, newest first.")]
ErrorsOnly = Annotated[bool, typer.Option("--errors-only", help="Only those with a span in error.")]
_HINTS = {
    "since": "--since",
    "session": "--session",
    "service": "--service",
    "trace_id": "TRACE_ID",
    "name": "--name",
    "limit": "--limit",
}


@contextmanager
def _as_bad_parameter() -> Iterator[None]:
    """What traces.py refuses, as typer's usage error naming the option that was typed."""
    try:
        yield
    except BadValue as bad:
        raise typer.BadParameter(str(bad), param_hint=_HINTS.get(bad.field, bad.field)) from None


def _rows(query: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    columns, rows = run_query(*query)
    return [dict(zip(columns, row, strict=True)) for row in rows]


def _print_rows(title: str, query: tuple[str, dict[str, Any]]) -> None:
    columns, rows = run_query(*query)
    print_table(title, columns, rows)


@ops_app.command()
def traces(
    since: Since = "24h",
    service: Annotated[str | None, typer.Option(help="Only traces whose root span this service sent.")] = None,
    session: Annotated[str | None, typer.Option(help="Only the traces of this session.")] = None,
    errors_only: ErrorsOnly = False,
    limit: Limit = 50,
) -> None:
    """Recent traces: root span, duration, spans, tokens, cost, errors and feedback (the trace_summary view)."""
    with _as_bad_parameter():
        query = traces_query(TraceFilter(since_ms(since), service, session, errors_only), limit)
    _print_rows(f"traces since {since}", query)


@ops_app.command()
def sessions(
    since: Since = "24h",
    service: Annotated[
        str | None, typer.Option(help="Only sessions with a trace whose root this service sent.")
    ] = None,
    session: Annotated[str | None, typer.Option(help="Only this session.")] = None,
    errors_only: ErrorsOnly = False,
    limit: Limit = 50,
) -> None:
    """Recent sessions (conversations): traces, turns, duration, tokens, cost, errors and feedback (session_summary)."""
    with _as_bad_parameter():
        query = sessions_query(SessionFilter(since_ms(since), service, session, errors_only), limit)
    _print_rows(f"sessions active since {since}", query)


@ops_app.command()
def trace(
    trace_id: Annotated[str | None, typer.Argument(help="The trace id (32 lowercase hex digits).")] = None,
    retraining: Annotated[
        str | None,
        typer.Option(
            help="Instead of a trace id: a retraining's correlation id (the alert id it answers, or the job id "
            "of a training asked for without one), whose spans share the trace it derives."
        ),
    ] = None,
) -> None:
    """One trace as a tree: each span under its parent, with kind, start, duration, tokens, status and feedback."""
    if (trace_id is None) == (retraining is None):
        raise typer.BadParameter("give either a trace id or --retraining CORRELATION_ID")
    with _as_bad_parameter():
        checked = RetrainingTrace(retraining).trace_id if retraining is not None else checked_trace_id(str(trace_id))
    spans = _rows(spans_query(checked, limit=MAX_TREE_SPANS + 1))
    if not spans:
        raise FlywheelError(f"no spans stored for trace {checked}: list recent ones with `flywheel ops traces`")
    shown = spans[:MAX_TREE_SPANS]
    feedback = _rows(trace_feedback_query(checked, shown))
    for line in span_tree(checked, shown, feedback):
        typer.echo(line)
    if len(spans) > MAX_TREE_SPANS:
        typer.echo(f"... more than {MAX_TREE_SPANS} spans: read the rest with `flywheel ops sql`")


def span_tree(trace_id: str, spans: list[dict[str, Any]], feedback: list[dict[str, Any]] | None = None) -> list[str]:
    """Lines of the tree (span_tree.tree_order: roots first by start, children indented under their parent, a
    span whose parent is not stored marked, a cycle printed once). `feedback` rows (span_id, inference_id,
    thumbs, rating) show on the trace's line when about the trace, and on a span's line when about the span
    or the inference it names."""
    given = TraceFeedback.of(feedback or [])
    start = min(int(span["start_us"]) for span in spans)
    end = max(int(span["start_us"]) + float(span["duration_ms"]) * 1000 for span in spans)
    errors = sum(span["status"] == "error" for span in spans)
    lines = [
        f"trace {trace_id}: {len(spans)} spans, {(end - start) / 1000:.1f} ms, "
        f"tokens {sum(int(s['prompt_tokens']) for s in spans)} in / {sum(int(s['completion_tokens']) for s in spans)} out, "
        f"{errors} in error" + (f", {feedback_summary(given.on_trace)} on the trace" if given.on_trace else "")
    ]
    for placed in tree_order(spans):
        on_span = given.on_span(placed.span)
        line = _span_line(placed, start)
        lines.append("  " * placed.depth + (f"{line}  {feedback_summary(on_span)}" if on_span else line))
    return lines


def _span_line(placed: Placed, trace_start_us: int) -> str:
    span = placed.span
    parts = [
        _printable(span["name"]),
        f"[{span['kind']}]",
        f"+{(int(span['start_us']) - trace_start_us) / 1000:.1f} ms",
        f"{float(span['duration_ms']):.1f} ms",
        str(span["status"]),
    ]
    if span["prompt_tokens"] or span["completion_tokens"]:
        parts.append(f"tokens {span['prompt_tokens']}/{span['completion_tokens']}")
    if span["model_name"]:
        parts.append(f"model {_printable(span['model_name'])}")
    if span["service_name"]:
        parts.append(f"service {_printable(span['service_name'])}")
    if span["inference_id"]:
        parts.append(f"inference {_printable(span['inference_id'])}")
    parts.append(f"span {span['span_id']}")
    if placed.parent_missing:
        parts.append(f"(parent {span['parent_span_id']} not stored)")
    if span["error"]:
        parts.append(f"error: {_printable(span['error'])[:160]}")
    return "  ".join(parts)


def _printable(text: object) -> str:
    # Names and errors are the app's text: an escape sequence must not reach the terminal.
    return "".join(char if char.isprintable() else "?" for char in str(text))


# ------------------------------------------------------------------------------------------- datasets

# Records a dry run prints: enough to see what the dataset will hold.
DRY_RUN_SHOWN = 3


@ops_app.command("dataset-from-spans")
def dataset_from_spans(
    name_dataset: Annotated[
        str, typer.Option("--name-dataset", help="The registry dataset to publish as its next version.")
    ],
    kind: Annotated[SpanKind, typer.Option(help="Only spans of this kind.")] = SpanKind.llm,
    name: Annotated[
        str | None, typer.Option(help="Only spans of this name; a trailing * matches a prefix (chat*).")
    ] = None,
    service: Annotated[str | None, typer.Option(help="Only spans this service sent.")] = None,
    since: Since = "24h",
    feedback: Annotated[
        FeedbackChoice | None,
        typer.Option(
            help="Only spans with this feedback: thumbs-down or thumbs-up (on the span, its inference, its trace "
            "or its session), corrected (a reviewer's correction of the span or its inference: it becomes the "
            "answer), any (some feedback on any of those). Unset: whatever feedback."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_SPANS, help="Spans at most, newest first.")] = 500,
    split: Annotated[str, typer.Option(help="train, or golden (for evaluation).")] = "train",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print how many records and the first ones; publish nothing.")
    ] = False,
) -> None:
    """Publish chosen spans as a dataset version: one chat record per span (its input, then its output or
    its correction) with a `provenance` object naming the trace, span, session, inference and feedback."""
    import json

    from pydantic import ValidationError

    from contracts.http import DatasetCreate

    try:
        # Checked before anything is read: a name or split the registry would refuse fails at once.
        body = DatasetCreate(name=name_dataset, split=split, jsonl="")
    except ValidationError as invalid:
        error = invalid.errors()[0]
        hint = "--split" if error["loc"][:1] == ("split",) else "--name-dataset"
        raise typer.BadParameter(error["msg"], param_hint=hint) from None
    with _as_bad_parameter():
        query = span_datasets_query(SpanChoice(since_ms(since), kind, name, service, feedback), limit)
    spans = _rows(query)
    feedback_rows = _rows(span_feedback_query(spans)) if spans else []
    if len(feedback_rows) > MAX_FEEDBACK_ROWS:
        raise FlywheelError(
            f"the chosen spans have more than {MAX_FEEDBACK_ROWS} feedback rows: narrow --since, --name or --limit"
        )
    built = build_records(spans, feedback_rows)
    skipped = []
    if built.truncated:
        skipped.append(f"{built.truncated} cut at intake")
    if built.empty:
        skipped.append(f"{built.empty} without input or answer")
    note = f" (skipped {', '.join(skipped)})" if skipped else ""
    if not spans:
        raise FlywheelError(
            f"no spans match: nothing published. List what is stored with `flywheel ops traces --since {since}`"
        )
    if not built.records:
        raise FlywheelError(f"none of the {len(spans)} matching spans gives a record{note}: nothing published")
    body = body.model_copy(
        update={
            "jsonl": built.jsonl(),
            # The registry's "feedback" means built from corrections: only when every answer is one.
            "provenance": "feedback" if built.all_corrections else "uploaded",
        }
    )
    if dry_run:
        typer.echo(f"{len(built.records)} records from {len(spans)} spans{note}; dry run: nothing published")
        for record in built.records[:DRY_RUN_SHOWN]:
            # ASCII: the texts are the app's, and an escape sequence in them must not reach the terminal.
            typer.echo(json.dumps(record))
        return
    _publish_dataset(body, f"records from {len(spans)} spans{note}")


@ops_app.command("preference-dataset")
def preference_dataset(
    model: Annotated[str, typer.Option(help="The model whose answers the feedback is about.")],
    name: Annotated[str, typer.Option(help="The registry dataset to publish as its next (train) version.")],
    limit: Annotated[
        int, typer.Option(min=1, max=MAX_PAIRS, help="Pairs at most: corrections first, then thumbs, then ratings.")
    ] = 1000,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the pairs by kind and the first ones; publish nothing.")
    ] = False,
) -> None:
    """Publish preference pairs built from a model's feedback as a train dataset version (record format
    preference): a reviewer's correction against the answer it replaced; a review queue's pairwise choice
    (adjudicated, or made alike by all its reviewers) against the answer passed over; an answer given thumbs up against
    one given thumbs down, and an answer rated a point or more higher than another, to the same rendered
    prompt. Each record's `provenance` names its kind and the inferences, feedback and model versions."""
    import json

    from pydantic import ValidationError

    from contracts.http import DatasetCreate

    try:
        # Checked before anything is read: a name the registry would refuse fails at once.
        body = DatasetCreate(name=name, split="train", jsonl="", provenance="preferences", model_name=model)
    except ValidationError as invalid:
        error = invalid.errors()[0]
        hint = "--model" if error["loc"][:1] == ("model_name",) else "--name"
        raise typer.BadParameter(error["msg"], param_hint=hint) from None
    rows = _rows(preference_feedback_query(model))
    if not rows:
        raise FlywheelError(
            f"no answered inference of {model} has feedback stored: nothing published. See what is given with `flywheel ops feedback`"
        )
    notes = []
    if len(rows) > MAX_INFERENCES:
        rows = rows[:MAX_INFERENCES]
        notes.append(f"read the newest {MAX_INFERENCES} answers with feedback")
    built = build_pairs(model, rows, limit=limit)
    if built.same_text:
        notes.append(f"skipped {built.same_text} of two answers with the same text")
    if built.contradicted:
        notes.append(f"dropped {built.contradicted} contradicted by a pair the other way")
    note = f" ({'; '.join(notes)})" if notes else ""
    if not built.pairs:
        raise FlywheelError(
            f"the feedback on {len(rows)} answers of {model} gives no pair{note}: nothing published. A pair needs a "
            "reviewer's correction, a reviewer's pairwise choice, or two answers to one prompt with opposite thumbs or ratings a point apart"
        )
    print_table(f"preference pairs for {model}", ["kind", "pairs"], [[k.value, n] for k, n in built.counts().items()])
    body = body.model_copy(update={"jsonl": built.jsonl()})
    if dry_run:
        typer.echo(f"{len(built.pairs)} pairs from {len(rows)} answers with feedback{note}; dry run: nothing published")
        for pair in built.pairs[:DRY_RUN_SHOWN]:
            # ASCII: the texts are the app's, and an escape sequence in them must not reach the terminal.
            typer.echo(json.dumps(pair.record(model)))
        return
    _publish_dataset(body, f"pairs from {len(rows)} answers with feedback{note}")


def _publish_dataset(body: Any, what: str) -> None:
    """Publish `body` (a DatasetCreate) through the registry's door with the caller's key; `what` says what
    its rows are, after their count."""
    from services.runtime.registry_client import RegistryError, RegistrySyncClient

    door, key = door_and_key(load_settings(FlywheelSettings), "registry")
    try:
        dataset = RegistrySyncClient(door, key).publish_dataset(body)
    except RegistryError as error:
        raise FlywheelError(str(error)) from None
    typer.echo(f"published {dataset.name}:v{dataset.version}: {dataset.row_count} {what}")


# --------------------------------------------------------------------------------------- agreement

MAX_CONFLICTS_SHOWN = 20


@ops_app.command()
def agreement(
    since: Since = "30d",
    model: Annotated[str | None, typer.Option(help="Only feedback on this model's inferences.")] = None,
    conflicts: Annotated[
        int, typer.Option(min=0, max=1000, help="Targets in conflict listed at most, per dimension.")
    ] = MAX_CONFLICTS_SHOWN,
) -> None:
    """How far reviewers agree on the targets two or more of them judged: Krippendorff's alpha of their
    thumbs (nominal) and ratings (ordinal), Cohen's kappa when there are exactly two reviewers, the alpha
    without each reviewer (one whose absence raises it most agrees least), and the targets they disagree
    on (thumbs that differ, ratings more than one step apart)."""
    from services.monitor.agreement import judgements_query, units_of
    from services.runtime.agreement import Scale
    from services.runtime.agreement import agreement as measure

    with _as_bad_parameter():
        query = judgements_query(since_ms(since), model)
    rows = _rows(query)
    if not rows:
        raise FlywheelError(
            f"no reviewer's thumbs or rating since {since}{f' on {model}' if model else ''}: reviewers give them "
            "through the feedback door with a reviewer key and source reviewer"
        )
    results = [
        measure("thumbs", units_of(rows, "thumbs"), Scale.nominal),
        measure("rating", units_of(rows, "rating"), Scale.ordinal, conflict_spread=1),
    ]
    print_table(
        f"reviewer agreement since {since}",
        ["dimension", "scale", "alpha", "kappa", "targets", "reviewers"],
        [
            [
                result.dimension,
                result.scale,
                _figure(result.alpha),
                _figure(result.kappa),
                result.units,
                len(result.reviewers),
            ]
            for result in results
        ],
    )
    print_table(
        "alpha without each reviewer",
        ["reviewer", *(result.dimension for result in results)],
        [
            [
                reviewer,
                *(
                    _figure(result.alpha_without.get(reviewer)) if reviewer in result.reviewers else ""
                    for result in results
                ),
            ]
            for reviewer in sorted({reviewer for result in results for reviewer in result.reviewers})
        ],
        whole=("reviewer",),
    )
    for result in results:
        shown = result.conflicts[:conflicts]
        print_table(
            f"{result.dimension}: {len(result.conflicts)} targets in conflict"
            + (f", the first {len(shown)}" if len(shown) < len(result.conflicts) else ""),
            ["target", "values"],
            [
                [unit, ", ".join(f"{reviewer}: {value}" for reviewer, value in sorted(values.items()))]
                for unit, values in shown
            ],
            whole=("target",),
        )


def _figure(value: float | None) -> str:
    """An agreement figure, or why there is none: no two reviewers judged a target alike in scope."""
    return "-" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------------- judge


@ops_app.command()
def judge(
    trace_id: Annotated[
        list[str] | None, typer.Option("--trace-id", help="A trace to judge (repeat for several).")
    ] = None,
    session_id: Annotated[
        list[str] | None, typer.Option("--session-id", help="A session to judge (repeat for several).")
    ] = None,
    level: Annotated[
        Level, typer.Option(help="Without ids: judge the recent traces (trace) or sessions (session) the filters pick.")
    ] = Level.trace,
    since: Annotated[
        str | None,
        typer.Option(help="Without ids: how far back, a duration (30m, 24h, 7d) or an ISO 8601 time. Default 24h."),
    ] = None,
    service: Annotated[
        str | None,
        typer.Option(help="Without ids: only traces whose root (sessions with a trace whose root) this service sent."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Without ids, level trace: only traces whose root span's name contains this.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=MAX_JUDGED, help="Without ids: traces or sessions at most, newest first.")
    ] = 20,
    rubric: Annotated[
        str | None,
        typer.Option(
            help="The transcript rubric: trace-quality@v1 for traces, session-quality@v1 for sessions (the defaults)."
        ),
    ] = None,
    judge_url: Annotated[
        str | None,
        typer.Option(
            envvar="FLYWHEEL_EVALUATOR_JUDGE_BASE_URL",
            help="OpenAI-compatible endpoint of the judge (e.g. Flywheel's gateway http://host:8080/v1); the evaluator's judge by default.",
        ),
    ] = None,
    judge_model: Annotated[
        str | None,
        typer.Option(envvar="FLYWHEEL_EVALUATOR_JUDGE_MODEL", help="Model name sent to the judge endpoint."),
    ] = None,
    judge_api_key: Annotated[
        str | None,
        typer.Option(envvar="FLYWHEEL_EVALUATOR_JUDGE_API_KEY", help="API key for the judge endpoint."),
    ] = None,
    max_chars: Annotated[
        int,
        typer.Option(
            min=MIN_BUDGET,
            max=MAX_BUDGET,
            help="Characters of transcript the judge reads at most; past it middle steps, then middle turns, are cut (marked).",
        ),
    ] = DEFAULT_BUDGET,
    max_tokens: Annotated[int, typer.Option(min=1, max=512, help="Tokens the judge may answer with.")] = 48,
    feedback_url: Annotated[
        str | None,
        typer.Option(help="The feedback service's door; default: the live process's, as other commands find it."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Judge and print; publish no feedback.")] = False,
) -> None:
    """Let an LLM judge score whole traces or sessions: each is rendered as a transcript (the question, every
    step in tree order with its input and output, the answer; a session turn by turn), graded 1-5 with a
    transcript rubric, and the score published as `source: judge` feedback on that trace or session with
    the caller's key. Exits 1 when any judgement failed or was not published."""
    import asyncio

    from services.runtime.scoring.judge import RUBRICS, Judge, judge_client

    traces_given = [_checked(checked_trace_id, value, "--trace-id") for value in trace_id or []]
    sessions_given = [_checked(checked_session_id, value, "--session-id") for value in session_id or []]
    if (traces_given or sessions_given) and (since is not None or service is not None or name is not None):
        raise typer.BadParameter(
            "give --trace-id/--session-id or filters (--since, --service, --name), not both", param_hint="--since"
        )
    if len(traces_given) + len(sessions_given) > MAX_JUDGED:
        raise typer.BadParameter(f"one run judges at most {MAX_JUDGED} traces and sessions", param_hint="--trace-id")
    if name is not None and level is Level.session:
        raise typer.BadParameter("--name picks traces: use it with --level trace", param_hint="--name")
    if not judge_url or not judge_model:
        raise typer.BadParameter(
            "the judge needs an endpoint and a model: --judge-url and --judge-model (or FLYWHEEL_EVALUATOR_JUDGE_BASE_URL and _MODEL)",
            param_hint="--judge-url",
        )
    kinds = ([Level.trace] if traces_given else []) + ([Level.session] if sessions_given else []) or [level]
    rubrics = {kind: rubric or DEFAULT_RUBRICS[kind] for kind in kinds}
    if rubric is not None and len(rubrics) > 1:
        raise typer.BadParameter("one --rubric grades traces or sessions, not both in one run", param_hint="--rubric")
    for key in rubrics.values():
        if key not in RUBRICS or not RUBRICS[key].grades_transcripts:
            known = ", ".join(k for k, r in RUBRICS.items() if r.grades_transcripts)
            raise typer.BadParameter(
                f"{key!r} is not a transcript rubric: choose one of {known}", param_hint="--rubric"
            )
    targets = [(Level.trace, t) for t in dict.fromkeys(traces_given)]
    targets += [(Level.session, s) for s in dict.fromkeys(sessions_given)]
    if not targets:
        with _as_bad_parameter():
            targets = recent_targets(level, since_ms(since or "24h"), service, name, limit, _rows)
        if not targets:
            raise FlywheelError(
                f"no {level}s match: list what is stored with `flywheel ops {level}s --since {since or '24h'}`"
            )
    transcripts, missing = transcripts_of(targets, _rows, max_chars)

    async def grade_all() -> list[Verdict]:
        client = judge_client(judge_url, judge_api_key)
        try:
            judges = {
                kind: Judge(client, model=judge_model, rubric=key, max_tokens=max_tokens)
                for kind, key in rubrics.items()
            }
            return await judge_all(transcripts, judges)
        finally:
            await client.close()

    verdicts = asyncio.run(grade_all()) + missing
    refused = {} if dry_run else _publish(verdicts, rubrics, judge_model, feedback_url)

    def stored(verdict: Verdict) -> str:
        if verdict.rating is None:
            return "-"
        if dry_run:
            return "dry run"
        return "not published" if (verdict.level, verdict.target) in refused else "published"

    print_table(
        f"judged with {', '.join(sorted(set(rubrics.values())))} by {judge_model}",
        ["level", "id", "score", "feedback", "reason"],
        [[v.level, v.target, v.rating, stored(v), v.reason] for v in verdicts],
        whole=("id",),
    )
    # In full, where the table cuts a reason to one line of its column.
    for verdict in verdicts:
        if verdict.error is not None:
            typer.echo(f"{verdict.level} {verdict.target}: not judged: {_printable(verdict.error)}", err=True)
    for (kind, target), why in refused.items():
        typer.echo(f"{kind} {target}: not published: {_printable(why)}", err=True)
    failed = sum(v.rating is None for v in verdicts) + len(refused)
    if failed:
        typer.echo(f"{failed} of {len(verdicts)} not judged or not published", err=True)
        raise typer.Exit(1)


def _checked(check: Callable[[str], str], value: str, hint: str) -> str:
    try:
        return check(value)
    except BadValue as bad:
        raise typer.BadParameter(str(bad), param_hint=hint) from None


def _publish(
    verdicts: list[Verdict], rubrics: dict[Level, str], model: str, feedback_url: str | None
) -> dict[tuple[Level, str], str]:
    """Each scored verdict as judge feedback through the feedback door with the caller's key; returns why,
    for each one the door did not take."""
    import httpx

    door, key = door_and_key(load_settings(FlywheelSettings), "feedback")
    url = f"{feedback_url or door}/feedback/v1/feedback"
    refused = {}
    with httpx.Client(headers=bearer_header(key), timeout=30) as http:
        for verdict in verdicts:
            if verdict.rating is None:
                continue
            try:
                response = http.post(url, json=verdict.feedback(rubrics[verdict.level], model))
            except httpx.TransportError as error:
                refused[verdict.level, verdict.target] = f"{type(error).__name__} at {url}"
                continue
            if response.status_code != 202:
                refused[verdict.level, verdict.target] = f"{url} answered {response.status_code} {response.text[:300]}"
    return refused
