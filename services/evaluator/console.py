"""The evaluator's pages in the shared console: the evaluation runs, and one run with its gate decision,
its metrics and its first answers beside the golden prompts; an operator can run a finished request again.

The report the evaluator writes (report.py) is a standalone HTML file in the artifact store; these pages
do not embed it but render the same data (verdict, reasons, metrics, answers) through their own
templates, so everything shown is escaped by Jinja, prompts and answers included.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import TypeAdapter

from contracts.events import DatasetRef, EvaluationCompleted, EvaluationRequested, MetricComparison, ModelTarget
from contracts.http import Role
from contracts.ids import EvaluationId, ModelName
from services.evaluator.gate import POLICIES
from services.evaluator.golden import GoldenExample, GoldenSetError
from services.evaluator.service import EvaluationFailed, label, new_evaluation_id, queue_evaluation
from services.evaluator.store import EvaluationRecord, EvaluatorStore, ResultRow, read_results
from services.runtime.artifacts import ArtifactError
from services.runtime.clickhouse import ClickHouseError, ClickHouseStore
from services.runtime.console import Console, ConsoleRefused, ConsoleUser, checked

PREFIX = "/evaluator/console"
STATUSES = ("queued", "running", "completed", "failed")
FINISHED = ("completed", "failed")
EXAMPLES_SHOWN = 50
PAGE_SIZE = 50
PAGE_SIZES = range(1, 201)
# The metric a run is summed up by when its policy is unknown (a worker's internal failure records `n/a`).
FALLBACK_METRIC = "token_f1"
# The gate's reason lines start with their outcome and the metric they judge (gate.decide).
_REASON = re.compile(r"(PASS|FAIL|SKIP) ([^\s:]+):")

_evaluation_id: TypeAdapter[str] = TypeAdapter(EvaluationId)
_model_name: TypeAdapter[str] = TypeAdapter(ModelName)

GoldenLoader = Callable[[DatasetRef], list[GoldenExample]]
Publish = Callable[..., Awaitable[object]]


@dataclass(frozen=True)
class Check:
    """One rule of the gate policy as this run met it: what it demands, what was measured, and the
    outcome the gate recorded (pass, fail, skipped; none when the gate did not reach it)."""

    metric: str
    threshold: str
    value: str
    outcome: str | None


@dataclass(frozen=True)
class Example:
    """One golden example and the candidate's answer to it, scored on the policy's primary metric."""

    example_id: str
    prompt: str
    expected: str
    answer: str
    score: float | None
    error: str | None


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")


def _target(raw: dict[str, Any] | None) -> str:
    return label(ModelTarget.model_validate(raw)) if raw else "current production"


def _primary(result: EvaluationCompleted) -> str:
    policy = POLICIES.get(result.gate_policy)
    return policy.primary if policy else FALLBACK_METRIC


def _interval(summary: MetricComparison) -> str:
    if summary.difference is None or summary.ci_low is None or summary.ci_high is None:
        return f"{summary.candidate:.4f} (no paired baseline)"
    return f"{summary.difference:+.4f}, CI [{summary.ci_low:+.4f}, {summary.ci_high:+.4f}]"


def gate_checks(result: EvaluationCompleted) -> list[Check]:
    """The rules of the policy the verdict applied, each with its measured value; the outcome is read from
    the verdict's own reason lines, so the page shows what the gate decided, never a second opinion."""
    policy = POLICIES.get(result.gate_policy)
    if policy is None:
        return []
    outcomes: dict[str, str] = {}
    for reason in result.reasons:
        match = _REASON.match(reason)
        if match and outcomes.get(match.group(2)) != "fail":
            outcomes[match.group(2)] = {"PASS": "pass", "FAIL": "fail", "SKIP": "skipped"}[match.group(1)]
    metrics = {summary.metric: summary for summary in result.metrics}
    errors = f"errors on at most {policy.max_error_rate:.0%} of examples"
    confidence = f"{policy.confidence:.0%}"
    checks = []
    for metric in (policy.primary, *policy.also_improve):
        summary = metrics.get(metric)
        checks.append(
            Check(
                metric,
                f"improves: the {confidence} interval on candidate − baseline lies above 0; {errors}",
                "not measured" if summary is None else f"{_interval(summary)}; {summary.errors} errors",
                outcomes.get(metric),
            )
        )
    for guard in policy.guards:
        summary = metrics.get(guard.metric)
        direction = "drop" if guard.higher_is_better else "rise"
        value = "not measured"
        if summary is not None and summary.ci_low is not None and summary.ci_high is not None:
            worst = -summary.ci_low if guard.higher_is_better else summary.ci_high
            value = (
                f"may {direction} by {worst if worst > 0 else 0.0:.4f} ({_interval(summary)}); {summary.errors} errors"
            )
        checks.append(
            Check(
                guard.metric,
                f"may {direction} by at most {guard.margin:.4f} ({confidence} interval); {errors}",
                value,
                outcomes.get(guard.metric),
            )
        )
    return checks


def _summary(record: EvaluationRecord) -> dict[str, Any]:
    """What the list shows of one run."""
    request = record.request
    result = EvaluationCompleted.model_validate(record.result) if record.result else None
    key_metric = None
    if result is not None and result.status == "completed":
        primary = _primary(result)
        key_metric = next((m for m in result.metrics if m.metric == primary), None)
    return {
        "id": record.evaluation_id,
        "status": record.status,
        "candidate": _target(request.get("candidate")),
        "baseline": _target(result.baseline.model_dump() if result and result.baseline else request.get("baseline")),
        "golden": request.get("golden", {}),
        "suite": request.get("metric_suite", "default"),
        "result": result,
        "key_metric": key_metric,
        "when": _when(record.created_at),
        "finished": record.status in FINISHED,
    }


def _prompt_text(example: GoldenExample) -> str:
    return "\n\n".join(f"{message.get('role', '?')}: {message['content']}" for message in example.messages)


def create_console_router(
    store: EvaluatorStore,
    console: Console,
    *,
    golden: GoldenLoader,
    clickhouse: Callable[[], ClickHouseStore],
    publish: Publish,
) -> APIRouter:
    """The evaluator's console pages under /evaluator/console (serve them with `console.install(app)`)."""
    router = APIRouter(prefix=PREFIX, tags=["console"], include_in_schema=False)
    templates: jinja2.Environment = console.templates("services.evaluator")

    def examples_of(result: EvaluationCompleted) -> tuple[list[Example], str | None]:
        """The first answers of the candidate beside their golden prompts, and why some could not be shown."""
        primary = _primary(result)
        golden_examples: Sequence[GoldenExample] = ()
        problem = None
        try:
            golden_examples = golden(result.golden)[:EXAMPLES_SHOWN]
        except (EvaluationFailed, GoldenSetError, ArtifactError) as error:
            problem = f"the golden set's prompts cannot be shown: {error}"
        try:
            rows = read_results(
                clickhouse,
                result.evaluation_id,
                target="candidate",
                metric=primary,
                example_ids=[example.example_id for example in golden_examples] if golden_examples else None,
                limit=EXAMPLES_SHOWN,
            )
        except ClickHouseError as error:
            return [], f"the per-example results cannot be read: {error}"
        by_id: dict[str, ResultRow] = {row.example_id: row for row in rows}
        prompts = {example.example_id: _prompt_text(example) for example in golden_examples}
        order = [example.example_id for example in golden_examples if example.example_id in by_id] or sorted(
            by_id, key=_natural
        )
        return [
            Example(
                example_id,
                prompts.get(example_id, ""),
                by_id[example_id].reference,
                by_id[example_id].prediction,
                by_id[example_id].score,
                by_id[example_id].error,
            )
            for example_id in order
        ], problem

    @router.get("/evaluations", response_class=HTMLResponse)
    async def evaluations(
        request: Request,
        model: str | None = None,
        status: str | None = None,
        before: str | None = None,
        limit: str | None = None,
        user: ConsoleUser = Depends(console.viewer),
    ) -> HTMLResponse:
        # Query parameters are read as text and checked here, so a bad one is a console page that says
        # why rather than the JSON doors' 422.
        model = model or None
        status = status or None
        if model is not None:
            checked(
                _model_name, model, f"{model!r} is not a model name (letters, digits, '.', '_', '-')", user, status=400
            )
        if status is not None and status not in STATUSES:
            raise ConsoleRefused(400, f"status must be one of {', '.join(STATUSES)}", user)
        if limit is not None and not (limit.isdigit() and int(limit) in PAGE_SIZES):
            raise ConsoleRefused(400, f"limit must be a whole number from 1 to {PAGE_SIZES[-1]}", user)
        page_size = int(limit) if limit else PAGE_SIZE
        if before is not None:
            no_cursor = "the page cursor names no evaluation; start again from the newest"
            if await asyncio.to_thread(store.evaluation, checked(_evaluation_id, before, no_cursor, user)) is None:
                raise ConsoleRefused(404, no_cursor, user)
        records = await asyncio.to_thread(
            store.evaluation_page, model_name=model, status=status, before=before, limit=page_size + 1
        )
        runs = [_summary(record) for record in records[:page_size]]
        older = None
        if len(records) > page_size:
            filters = {name: value for name, value in (("model", model), ("status", status)) if value}
            older = f"?{urlencode(filters | {'before': runs[-1]['id'], 'limit': page_size})}"
        return console.page(
            request,
            templates,
            "evaluations.html",
            user,
            title="Evaluations",
            runs=runs,
            # `status` is the page's HTTP status in console.page: the filters go by other names.
            chosen_model=model or "",
            chosen_status=status or "",
            statuses=STATUSES,
            older=older,
            may_run=user.csrf is not None and user.principal.may(Role.operator),
        )

    # `:path`, so that an id holding an (encoded) slash still reaches this page and its 404, not the router's.
    @router.get("/evaluations/{evaluation_id:path}", response_class=HTMLResponse)
    async def evaluation(
        request: Request, evaluation_id: str, user: ConsoleUser = Depends(console.viewer)
    ) -> HTMLResponse:
        record = await _known(evaluation_id, user)
        run = _summary(record)
        result: EvaluationCompleted | None = run["result"]
        examples: list[Example] = []
        problem = None
        if result is not None and result.status == "completed":
            examples, problem = await asyncio.to_thread(examples_of, result)
        return console.page(
            request,
            templates,
            "evaluation.html",
            user,
            title=f"Evaluation {record.evaluation_id}",
            run=run,
            record=record,
            checks=gate_checks(result) if result else [],
            primary=_primary(result) if result else FALLBACK_METRIC,
            examples=examples,
            examples_problem=problem,
            examples_shown=EXAMPLES_SHOWN,
            when_updated=_when(record.updated_at),
            may_run=user.csrf is not None and user.principal.may(Role.operator),
        )

    @router.post("/evaluations/{evaluation_id}/rerun")
    async def rerun(request: Request, evaluation_id: str, user: ConsoleUser = Depends(console.viewer)) -> Response:
        """Queue the request of a finished evaluation again, under a new id, as the JSON door's POST does."""
        await console.form(request, user, Role.operator)
        record = await _known(evaluation_id, user)
        if record.status not in FINISHED:
            raise ConsoleRefused(
                409, f"evaluation {evaluation_id} is {record.status}; run it again once it finished", user
            )
        again = EvaluationRequested.model_validate(record.request).model_copy(
            update={"evaluation_id": new_evaluation_id(), "requested_by": user.principal.name}
        )
        await queue_evaluation(store, publish, again)
        return RedirectResponse(f"{PREFIX}/evaluations/{again.evaluation_id}", status_code=303)

    async def _known(evaluation_id: str, user: ConsoleUser) -> EvaluationRecord:
        """The evaluation the URL names; an id of the wrong shape is as unknown as a missing one."""
        unknown = f"there is no evaluation {evaluation_id!r}"
        record = await asyncio.to_thread(store.evaluation, checked(_evaluation_id, evaluation_id, unknown, user))
        if record is None:
            raise ConsoleRefused(404, unknown, user)
        return record

    return router


def _natural(example_id: str) -> tuple[int, int, str]:
    """Golden examples numbered 1, 2, ... 10 in that order, not as text (1, 10, 2); other ids after, by text."""
    return (0, int(example_id), "") if example_id.isdigit() else (1, 0, example_id)
