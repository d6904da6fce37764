"""The feedback service's part of the `flywheel` command, by group in `app` (services/cli/main.py mounts it,
finding this module by name): `flywheel feedback give|list`, giving feedback on an inference and reading
what is stored; `flywheel feedback review ...`, the review queues; `flywheel ops replay`, rebuilding the sink's tables from Kafka (the sink's job); and
`flywheel bench ingest` and `flywheel bench traces`, the sink's and the OTLP intake's benchmarks, also
`flywheel bench all`'s."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from contracts.events import FeedbackReviewed, FeedbackSource, Thumbs
from contracts.http import ReviewChoice
from services.runtime.bench import Benchmark, Echo, Row
from services.runtime.doors import api_key_headers
from services.runtime.errors import FlywheelError
from services.runtime.settings import FlywheelSettings, load_settings

app = typer.Typer()
feedback_app = typer.Typer(
    help="Give feedback on an inference, span, trace or session, and read inference feedback back.",
    no_args_is_help=True,
)
review_app = typer.Typer(
    help="Review queues: define one on a registry rubric, fill it, and work it as a reviewer (through the door, with FLYWHEEL_API_KEY).",
    no_args_is_help=True,
)
ops_app = typer.Typer()
bench_app = typer.Typer()
feedback_app.add_typer(review_app, name="review")
app.add_typer(feedback_app, name="feedback")
app.add_typer(ops_app, name="ops")
app.add_typer(bench_app, name="bench")


@feedback_app.command()
def give(
    inference_id: Annotated[
        str | None,
        typer.Argument(
            help="The inference id (the completion response's `id`); leave out for a span, trace or session."
        ),
    ] = None,
    trace_id: Annotated[
        str | None, typer.Option(help="A trace (32 hex digits); with --span-id, the trace of the span.")
    ] = None,
    span_id: Annotated[str | None, typer.Option(help="A span (16 hex digits) of --trace-id.")] = None,
    session_id: Annotated[str | None, typer.Option(help="A session (conversation) id.")] = None,
    thumbs: Annotated[Thumbs | None, typer.Option(help="up or down.")] = None,
    rating: Annotated[int | None, typer.Option(help="1 to 5.")] = None,
    comment: Annotated[str | None, typer.Option(help="Free-text comment.")] = None,
    correction: Annotated[str | None, typer.Option(help="The answer that should have been given.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A label; repeat for several.")] = None,
    source: Annotated[FeedbackSource, typer.Option(help="Who gives it.")] = FeedbackSource.end_user,
    actor: Annotated[
        str | None,
        typer.Option(help="Id of the person or judge; a reviewer's is stored as given, cli:<user> when left out."),
    ] = None,
) -> None:
    """Publish feedback on one target, an inference, a span (--trace-id and --span-id), a trace (--trace-id) or a
    session (--session-id), as `feedback.received` (`feedback.reviewed` with --source reviewer); the sink stores
    it, also before what it is about lands."""
    from pydantic import ValidationError

    from contracts.http import FeedbackCreate
    from contracts.publisher import EventPublisher
    from services.feedback.service import InvalidFeedback, feedback_event
    from services.runtime.privacy import PrivacySettings

    settings = load_settings(FlywheelSettings)
    try:
        event = feedback_event(
            FeedbackCreate(
                inference_id=inference_id,
                trace_id=trace_id,
                span_id=span_id,
                session_id=session_id,
                thumbs=thumbs,
                rating=rating,
                comment=comment,
                correction=correction,
                tags=tag or [],
                source=source,
                # Reviewers are counted one by one (their agreement): one who gives no name is this user.
                actor=actor or (f"cli:{getpass.getuser()}" if source is FeedbackSource.reviewer else None),
            )
        )
    except ValidationError as error:
        first = error.errors()[0]
        # A rule over several fields (the one-target rule) has no field of its own.
        where = ".".join(str(part) for part in first["loc"]) or "target"
        raise FlywheelError(f"invalid feedback: {where}: {first['msg']}") from None
    except InvalidFeedback as error:
        raise FlywheelError(f"invalid feedback: {error}") from None

    async def publish() -> str:
        from aiokafka.admin import AIOKafkaAdminClient

        from contracts.topics import topic_for
        from services.runtime.broker import check_reachable

        bootstrap = settings.resolved_kafka_bootstrap()
        # Feedback is what apps may publish: the `app` principal where the broker has identities. A
        # reviewer's travels on feedback.reviewed, which only the feedback service's principal may write.
        security = settings.resolved_kafka_security("feedback" if isinstance(event, FeedbackReviewed) else "app")
        await check_reachable(bootstrap, security=security)
        # Without this check the producer retries a missing topic for a minute, logging each attempt.
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.client_options())
        await admin.start()
        try:
            topic = topic_for(event, settings.topic_prefix)
            if topic not in await admin.list_topics():
                raise FlywheelError(
                    f"topic {topic} does not exist on {bootstrap}: create the topics with `flywheel infra topics`"
                )
        finally:
            await admin.close()
        async with EventPublisher(
            bootstrap, producer="flywheel-cli", topic_prefix=settings.topic_prefix, security=security
        ) as publisher:
            # Scrubbed as the feedback door scrubs: raw personal data never sits in the topic.
            return str(
                (await publisher.publish(load_settings(PrivacySettings).redactor().scrub_feedback(event))).event_id
            )

    event_id = asyncio.run(publish())
    typer.echo(f"feedback {event.feedback_id} published (event {event_id})")


@feedback_app.command(name="list")
def list_(
    inference_id: Annotated[str | None, typer.Argument(help="The inference id.")] = None,
    trace_id: Annotated[str | None, typer.Option(help="A trace's feedback; with --span-id, a span's.")] = None,
    span_id: Annotated[str | None, typer.Option(help="A span's feedback, within --trace-id.")] = None,
    session_id: Annotated[str | None, typer.Option(help="A session's feedback.")] = None,
) -> None:
    """Print the stored feedback on one inference, span, trace or session, as JSON: through a running
    process's door, else from the store."""
    import httpx

    target = {"inference_id": inference_id, "trace_id": trace_id, "span_id": span_id, "session_id": session_id}
    named = {name: value for name, value in target.items() if value is not None}
    settings = load_settings(FlywheelSettings)
    url = f"http://{settings.http_host}:{settings.http_port}/feedback/v1/feedback"
    try:
        response = httpx.get(url, params=named, headers=api_key_headers(), timeout=10)
    except httpx.ConnectError:
        typer.echo(_from_store(settings, named))
        return
    if response.status_code != 200:
        raise FlywheelError(
            f"{url} answered {response.status_code}: {response.json().get('error', {}).get('message', response.text)}"
        )
    typer.echo(json.dumps(response.json(), indent=2))


def _from_store(settings: FlywheelSettings, target: dict[str, str]) -> str:
    from services.feedback.service import InvalidFeedback, list_feedback
    from services.feedback.store import FeedbackStore
    from services.runtime.clickhouse import open_clickhouse

    with open_clickhouse(settings.clickhouse_url, settings.home, readonly=True) as clickhouse:
        try:
            return list_feedback(FeedbackStore(lambda: clickhouse), **target).model_dump_json(indent=2)
        except InvalidFeedback as error:
            raise FlywheelError(str(error)) from None


def _review_door(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """`path` under the review door of the running process; None for a 204."""
    from services.runtime.doors import call_door

    return call_door(method, f"/feedback/v1/review{path}", body, service="feedback", timeout_s=120)


@review_app.command("define")
def review_define(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML or JSON: name, rule, rubric, ...")],
) -> None:
    """Define a review queue (or its next version) from a file holding a ReviewQueueCreate: name, rule
    (target: inference, trace or session; select, model_name, share, floor, route, window_hours, order), rubric (a registry rubric's name),
    rubric_version, reviewers_per_item, lease_seconds, max_items. Needs an operator key."""
    import yaml

    body = yaml.safe_load(file.read_text())
    view = _review_door("POST", "/queues", body)
    typer.echo(
        f"review queue {view['name']} v{view['version']} on rubric {view['rubric']['name']}:v{view['rubric']['version']}"
    )


@review_app.command("list")
def review_list() -> None:
    """Every review queue with its items by state."""
    for view in _review_door("GET", "/queues"):
        counts = view["counts"]
        typer.echo(
            f"{view['name']} v{view['version']} ({view['rule'].get('target', 'inference')}s)  open {counts['open']}  claimed {counts['claimed']}  "
            f"adjudication {counts['adjudication']}  done {counts['done']}  gone {counts['gone']}  skips {counts['skips']}"
        )


@review_app.command("show")
def review_show(name: Annotated[str, typer.Argument(help="Queue name.")]) -> None:
    """One queue: its definition, counts, and reviewers' agreement per rubric dimension."""
    view = _review_door("GET", f"/queues/{quote(name, safe='')}")
    typer.echo(json.dumps(view, indent=2))


@review_app.command("fill")
def review_fill(name: Annotated[str, typer.Argument(help="Queue name.")]) -> None:
    """Add what the queue's rule matches now. Needs an operator key."""
    result = _review_door("POST", f"/queues/{quote(name, safe='')}/fill")
    typer.echo(
        f"{result['queue']}: {result['added']} added of {result['considered']} matched "
        f"({result['already_queued']} already queued, {result['duplicate_prompts']} repeat a queued prompt)"
    )


@review_app.command("next")
def review_next(
    name: Annotated[str, typer.Argument(help="Queue name.")],
    text: Annotated[
        bool,
        typer.Option(
            "--text", help="Print it to read: the conversation, the answer, the trace as a tree or the session's turns."
        ),
    ] = False,
) -> None:
    """Claim the next item for the key's reviewer and print it as JSON (or, with --text, to read). Needs a
    reviewer key."""
    item = _review_door("POST", f"/queues/{quote(name, safe='')}/claim")
    if item is None:
        typer.echo("nothing is left in this queue for you")
    else:
        typer.echo("\n".join(item_lines(item)) if text else json.dumps(item, indent=2))


def item_lines(item: dict[str, Any]) -> list[str]:
    """A claimed item (ReviewItemView as JSON) as a reviewer reads it: what it is, the conversation and the
    answer, a trace's spans indented under their parents or a session's turns, and what to score."""
    target = item.get("target", "inference")
    about = {"trace": f"trace {item.get('trace_id')}", "session": f"session {item.get('session_id')}"}
    lines = [
        f"item {item['item_id']} ({item['stage']}) in {item['queue']} v{item['queue_version']}: "
        + about.get(target, f"inference {item.get('inference_id')} of {item.get('model_name')}")
    ]
    if item.get("turns"):
        for number, turn in enumerate(item["turns"], start=1):
            failed = "  [error]" if turn["status"] == "error" else ""
            lines += [
                f"turn {number}  {turn['name']}  trace {turn['trace_id']}{failed}",
                f"  in:  {turn['input']}",
                f"  out: {turn['output']}",
            ]
    else:
        lines += [f"{message['role']}: {message['content']}" for message in item["messages"]]
        lines.append(f"answer: {item['answer']}")
        if item.get("second_answer") is not None:
            lines.append(f"second answer: {item['second_answer']}")
    if item.get("spans"):
        lines.append("trace:")
        for span in item["spans"]:
            failed = f"  [error: {span['error'] or 'no message'}]" if span["status"] == "error" else ""
            lines.append(
                f"{'  ' * (span['depth'] + 1)}{span['name']}  {span['kind']}  {span['duration_ms']:.1f} ms{failed}"
            )
    dimensions = ", ".join(f"{d['name']} ({d['scale']})" for d in item["rubric"]["dimensions"])
    lines.append(f"score on {item['rubric']['name']}:v{item['rubric']['version']}: {dimensions}")
    return lines


@review_app.command("submit")
def review_submit(
    item_id: Annotated[str, typer.Argument(help="The claimed item's id.")],
    score: Annotated[
        list[str] | None, typer.Option("--score", help="DIMENSION=VALUE, once per rubric dimension.")
    ] = None,
    choice: Annotated[
        ReviewChoice | None,
        typer.Option(help="A pairwise item's pick: first (`answer`), second (`second_answer`) or tie; no --score."),
    ] = None,
    correction: Annotated[str | None, typer.Option(help="The answer that should have been given.")] = None,
    comment: Annotated[str | None, typer.Option(help="Free-text comment.")] = None,
) -> None:
    """Score a claimed item on every rubric dimension, or pick the better answer of a pairwise item with
    --choice. Needs a reviewer key."""
    scores = {}
    for given in score or []:
        dimension, sep, value = given.partition("=")
        if not sep:
            raise FlywheelError(f"--score {given!r}: write DIMENSION=VALUE, e.g. --score correct=up")
        scores[dimension.strip()] = value.strip()
    body = {"scores": scores, "choice": choice, "correction": correction, "comment": comment}
    accepted = _review_door("POST", f"/items/{quote(item_id, safe='')}/submit", body)
    typer.echo(f"item {accepted['item_id']}: feedback {accepted['feedback_id']}, {accepted['stage']}")


@review_app.command("skip")
def review_skip(
    item_id: Annotated[str, typer.Argument(help="The claimed item's id.")],
    reason: Annotated[str, typer.Option(help="Why you pass it on.")],
) -> None:
    """Pass a claimed item on with a reason. Needs a reviewer key."""
    _review_door("POST", f"/items/{quote(item_id, safe='')}/skip", {"reason": reason})
    typer.echo(f"item {item_id} skipped")


@ops_app.command()
def replay(
    from_timestamp: Annotated[
        datetime | None,
        typer.Option(
            "--from-timestamp",
            help="Replay events from this time (ISO 8601, UTC unless a zone is given); default: the earliest retained.",
        ),
    ] = None,
) -> None:
    """Rebuild inference_log and feedback from the topics, adding only events not stored yet."""
    from datetime import UTC

    from services.feedback.replay import replay as run_replay
    from services.feedback.service import Sink
    from services.feedback.settings import FeedbackSettings
    from services.feedback.store import FeedbackStore
    from services.runtime.broker import check_reachable
    from services.runtime.clickhouse import open_clickhouse
    from services.runtime.privacy import PrivacySettings

    settings = load_settings(FlywheelSettings)
    feedback = load_settings(FeedbackSettings)
    bootstrap = settings.resolved_kafka_bootstrap()
    security = settings.resolved_kafka_security(
        "feedback"
    )  # replaying is the sink's job: its principal reads both topics
    asyncio.run(check_reachable(bootstrap, security=security))
    from_ms = None
    if from_timestamp is not None:
        moment = from_timestamp if from_timestamp.tzinfo else from_timestamp.replace(tzinfo=UTC)
        from_ms = int(moment.timestamp() * 1000)
    with open_clickhouse(settings.clickhouse_url, settings.home) as clickhouse:
        clickhouse.migrate()
        sink = Sink(FeedbackStore(lambda: clickhouse), load_settings(PrivacySettings).redactor())
        counts = asyncio.run(
            run_replay(
                bootstrap,
                sink,
                topic_prefix=settings.topic_prefix,
                from_ms=from_ms,
                batch=feedback.batch_max_records,
                security=security,
            )
        )
    for count in counts:
        typer.echo(
            f"{count.topic}: read {count.read}, inserted {count.inserted}, already stored {count.read - count.inserted - count.undecodable}, undecodable {count.undecodable}"
        )


@bench_app.command("ingest")
def bench_ingest(
    events: Annotated[int, typer.Option(min=1, help="Events published and stored through the batched sink.")] = 50_000,
    baseline_events: Annotated[
        int, typer.Option(min=1, help="Events stored one insert each, for the baseline.")
    ] = 2_000,
    steady_rate: Annotated[
        int, typer.Option(min=0, help="Events/s of the steady-load phase that measures lag (0 skips it).")
    ] = 1_000,
    steady_seconds: Annotated[float, typer.Option(min=0, help="Length of the steady-load phase.")] = 10.0,
) -> None:
    """Events/s from Kafka into ClickHouse through the batched sink vs one insert per event, same run."""
    from services.feedback.settings import FeedbackSettings

    settings = load_settings(FlywheelSettings)
    feedback = load_settings(FeedbackSettings)
    result = _ingest(
        settings,
        events=events,
        baseline_events=min(baseline_events, events),
        steady_rate=steady_rate,
        steady_seconds=steady_seconds,
    )
    typer.echo(
        f"batched sink:     {result.events} events in {result.sink_seconds:.2f}s = {result.sink_rate:,.0f} events/s (batches up to {feedback.batch_max_records}, wait {feedback.batch_max_wait_ms} ms)"
    )
    typer.echo(
        f"per-event insert: {result.baseline_events} events in {result.baseline_seconds:.2f}s = {result.baseline_rate:,.0f} events/s"
    )
    typer.echo(f"ratio:            {result.sink_rate / result.baseline_rate:.1f}x")
    typer.echo(f"where the sink's time went, in {result.batches} batches (seconds, share of its wall time):")
    for stage, seconds, share in result.stage_split():
        typer.echo(f"  {stage:<32} {seconds:8.2f}s {share:6.1%}")
    if result.steady is not None:
        lag = result.steady
        typer.echo(
            f"steady load:      {lag.rate} events/s for {steady_seconds:.0f}s ({lag.sent} events): lag p50 {lag.quantile(0.5)}, "
            f"p95 {lag.quantile(0.95)}, max {max(lag.samples, default=0)} events published but not yet stored; "
            f"drained {lag.drain_seconds:.2f}s after the last one"
        )


def _ingest(settings: FlywheelSettings, **sizes: Any) -> Any:
    from services.feedback.bench import ingest_benchmark
    from services.feedback.settings import FeedbackSettings

    return asyncio.run(ingest_benchmark(settings, load_settings(FeedbackSettings), **sizes))


@contextlib.contextmanager
def _bench_settings(benchmark: str, echo: Echo) -> Iterator[FlywheelSettings]:
    """The settings a benchmark of `flywheel bench all` runs under; without a configured broker, a local one
    is started for the run in a scratch directory. The home stays: chDB opens one data directory per
    process, and the benchmarks of one run each use their own databases there, dropped afterwards."""
    import tempfile
    from pathlib import Path

    settings = load_settings(FlywheelSettings)
    if settings.kafka_bootstrap or (settings.infra_dir / "kafka" / "state.json").exists():
        yield settings
        return
    from infra.local_kafka import LocalKafka

    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as scratch:
        kafka = LocalKafka(Path(scratch), settings.cache)
        echo(f"starting a local Apache Kafka broker for the {benchmark} benchmark")
        try:
            yield settings.model_copy(update={"kafka_bootstrap": kafka.start()})
        finally:
            kafka.stop()


def _ingest_rows(size: dict[str, Any], echo: Echo) -> list[Row]:
    """`flywheel bench all`'s ingest rows."""
    with _bench_settings("ingest", echo) as settings:
        result = _ingest(settings, **size)
    echo(f"batched sink {result.sink_rate:,.0f} events/s, per-event insert {result.baseline_rate:,.0f} events/s")
    echo("sink stages: " + ", ".join(f"{stage} {share:.0%}" for stage, _, share in result.stage_split()))
    rows = [
        Row(
            "ingest",
            f"Kafka -> ClickHouse events/s ({result.events} vs {result.baseline_events} events)",
            result.sink_rate,
            result.baseline_rate,
            "events/s",
            "higher",
            "batched idempotent sink (Arrow)",
            "one insert per event",
        )
    ]
    if result.steady is not None:
        rows.append(
            Row(
                "ingest",
                f"lag p95 at {result.steady.rate} events/s (events published, not yet stored)",
                float(result.steady.quantile(0.95)),
                None,
                "events",
                "lower",
                "batched sink",
            )
        )
    return rows


INGEST = Benchmark(
    name="ingest",
    sizes={
        "quick": {"events": 5_000, "baseline_events": 500, "steady_rate": 0, "steady_seconds": 0.0},
        "full": {"events": 50_000, "baseline_events": 2_000, "steady_rate": 1_000, "steady_seconds": 10.0},
    },
    run=_ingest_rows,
)


@bench_app.command("traces")
def bench_traces(
    spans: Annotated[int, typer.Option(min=1, help="Spans exported in batches and stored.")] = 50_000,
    batch: Annotated[int, typer.Option(min=1, help="Spans per OTLP request (an exporter's batch size).")] = 500,
    baseline_spans: Annotated[
        int, typer.Option(min=1, help="Spans exported one per request, for the baseline.")
    ] = 1_000,
    steady_rate: Annotated[
        int, typer.Option(min=0, help="Spans/s of the steady-load phase that measures lag (0 skips it).")
    ] = 2_000,
    steady_seconds: Annotated[float, typer.Option(min=0, help="Length of the steady-load phase.")] = 10.0,
) -> None:
    """OTLP spans/s from POST /v1/traces into ClickHouse, batched vs one span per request, same run."""
    result = _traces(
        load_settings(FlywheelSettings),
        spans=spans,
        batch=batch,
        baseline_spans=min(baseline_spans, spans),
        steady_rate=steady_rate,
        steady_seconds=steady_seconds,
    )
    for line in _traces_report(result):
        typer.echo(line)


def _traces(settings: FlywheelSettings, **sizes: Any) -> Any:
    from services.feedback.bench_traces import traces_benchmark
    from services.feedback.settings import FeedbackSettings
    from services.runtime.privacy import PrivacySettings

    return asyncio.run(
        traces_benchmark(settings, load_settings(FeedbackSettings), load_settings(PrivacySettings), **sizes)
    )


def _traces_report(result: Any) -> list[str]:
    lines = [
        f"batched export:   {result.spans} spans in requests of {result.batch}, stored in {result.seconds:.2f}s = {result.rate:,.0f} spans/s",
        f"one per request:  {result.baseline_spans} spans in {result.baseline_seconds:.2f}s = {result.baseline_rate:,.0f} spans/s",
        f"ratio:            {result.rate / result.baseline_rate:.1f}x",
        f"span table:       {result.stored_rows} rows, {result.stored_events} distinct events",
    ]
    if result.steady is not None:
        lag = result.steady
        lines.append(
            f"steady load:      {lag.rate} spans/s ({lag.sent} spans): lag p50 {lag.quantile(0.5)}, p95 {lag.quantile(0.95)}, "
            f"max {max(lag.samples, default=0)} spans exported but not yet stored; drained {lag.drain_seconds:.2f}s after the last one"
        )
    lines.append(
        f"where the sink's time went while storing the batched spans, in {result.batches} batches (seconds, share of the wall time):"
    )
    lines += [
        f"  {stage:<32} {seconds:8.2f}s {seconds / result.seconds:6.1%}" for stage, seconds in result.stages.items()
    ]
    return lines


def _traces_rows(size: dict[str, Any], echo: Echo) -> list[Row]:
    """`flywheel bench all`'s traces rows."""
    with _bench_settings("traces", echo) as settings:
        result = _traces(settings, **size)
    for line in _traces_report(result):
        echo(line)
    rows = [
        Row(
            "traces",
            f"OTLP/HTTP -> ClickHouse spans/s ({result.spans} in requests of {result.batch} vs {result.baseline_spans} one per request)",
            result.rate,
            result.baseline_rate,
            "spans/s",
            "higher",
            f"batched export ({result.batch} spans per request)",
            "one span per request",
        )
    ]
    if result.steady is not None:
        rows.append(
            Row(
                "traces",
                f"lag p95 at {result.steady.rate} spans/s (spans exported, not yet stored)",
                float(result.steady.quantile(0.95)),
                None,
                "spans",
                "lower",
                "feedback service",
            )
        )
    return rows


TRACES = Benchmark(
    name="traces",
    sizes={
        "quick": {"spans": 5_000, "batch": 500, "baseline_spans": 200, "steady_rate": 0, "steady_seconds": 0.0},
        "full": {"spans": 50_000, "batch": 500, "baseline_spans": 1_000, "steady_rate": 2_000, "steady_seconds": 10.0},
    },
    run=_traces_rows,
)

BENCHMARKS = (INGEST, TRACES)
