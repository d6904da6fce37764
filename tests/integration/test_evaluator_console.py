"""The evaluator's console pages over the real evaluator store (SQLite), the real result rows (chDB) and a
golden set in the real artifact store: runs are seeded as the worker records them, with verdicts from the
real gate, so no model runs. A viewer reads the list and one run; hostile prompts and answers come out as
text; filters, paging and unknown ids answer with pages; running a request again takes an operator and
the session's CSRF token, and a refused form queues nothing."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from contracts.events import DatasetRef, EvaluationCompleted, EvaluationRequested, ModelTarget
from contracts.http import Role
from services.evaluator.console import create_console_router
from services.evaluator.gate import POLICIES, compare, decide
from services.evaluator.golden import parse_golden
from services.evaluator.service import Evaluator
from services.evaluator.store import DatasetPointer, EvaluatorStore, ResultRow, write_results
from services.registry.store import RegistryStore
from services.runtime.auth import Authenticator, KeyStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.console import Console
from services.runtime.scoring import Embedder
from tests.evaluator_support import MODEL, evaluator_for, golden_lines
from tests.fixtures.clickhouse import ClickHouseTarget

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
HOSTILE_PROMPT = '<img src=x onerror="alert(1)"> How do I reset the hub?'
HOSTILE_ANSWER = "<script>alert('answer')</script> hold the button"
HOSTILE_ERROR = "base model <b>gone</b> & <script>alert('error')</script>"
OTHER_MODEL = "other-model"
LIST = "/evaluator/console/evaluations"


@dataclass
class Site:
    app: FastAPI
    store: EvaluatorStore
    keys: KeyStore
    published: list[tuple[Any, str | None]]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")

    def key(self, role: Role) -> str:
        return self.keys.create(principal=f"console-{role.value}", role=role, created_by="test")[0]


def golden_jsonl() -> str:
    hostile = {
        "id": "hostile",
        "messages": [
            {"role": "user", "content": HOSTILE_PROMPT},
            {"role": "assistant", "content": "Hold the button for 10 seconds."},
        ],
    }
    return "\n".join([json.dumps(hostile), *golden_lines(4)])


def finished_result(
    evaluation_id: str, model: str, examples: list, candidate_f1: list[float]
) -> tuple[EvaluationCompleted, list[ResultRow]]:
    """A completed run as the evaluator records it: per-metric comparisons and the verdict of the real
    gate (default@v1) on scores given per example, and the rows it writes to ClickHouse."""
    baseline_f1 = [0.2] * len(examples)
    scores = {
        "candidate": {
            "token_f1": candidate_f1,
            "groundedness": [0.8] * len(examples),
            "unsafe_rate": [0.0] * len(examples),
        },
        "baseline": {
            "token_f1": baseline_f1,
            "groundedness": [0.8] * len(examples),
            "unsafe_rate": [0.0] * len(examples),
        },
    }
    policy = POLICIES["default@v1"]
    comparisons = {
        metric: compare(metric, values, scores["baseline"][metric], resamples=200)
        for metric, values in scores["candidate"].items()
    }
    verdict = decide(policy, comparisons)
    result = EvaluationCompleted(
        evaluation_id=evaluation_id,
        candidate=ModelTarget(model_name=model, adapter_version=2),
        baseline=ModelTarget(model_name=model, adapter_version=1),
        golden=DatasetRef(name="acme-golden", version=1),
        passed=verdict.passed,
        reasons=[*verdict.reasons, f"POLICY {policy.key} (declared for {model}): {policy.description}"],
        gate_policy=policy.key,
        metrics=list(comparisons.values()),
        report_uri=f"file:///reports/evaluation-{evaluation_id}.html",
    )
    rows = [
        ResultRow(
            example.example_id,
            model,
            2 if target == "candidate" else 1,
            target,
            metric,
            values[i],
            None,
            HOSTILE_ANSWER if example.example_id == "hostile" else f"{target} answer {i}",
            example.reference,
        )
        for target, by_metric in scores.items()
        for metric, values in by_metric.items()
        for i, example in enumerate(examples)
    ]
    return result, rows


def request(evaluation_id: str, model: str = MODEL) -> EvaluationRequested:
    return EvaluationRequested(
        evaluation_id=evaluation_id,
        candidate=ModelTarget(model_name=model, adapter_version=2),
        baseline=ModelTarget(model_name=model, adapter_version=1),
        golden=DatasetRef(name="acme-golden", version=1),
        requested_by="test <ops>",
    )


def seed(evaluator: Evaluator, clickhouse: ClickHouseStore) -> None:
    """Five runs, oldest first: a pass and a fail of MODEL, one that could not run, one of another model, one queued."""
    store, artifacts = evaluator.store, evaluator.artifacts
    golden = artifacts.put_bytes(golden_jsonl().encode(), kind="jsonl")
    store.remember_dataset(DatasetPointer("acme-golden", 1, "golden", golden.uri, golden.sha256, MODEL))
    examples = parse_golden(golden_jsonl())
    finished = {
        "ev-01-pass": (MODEL, [0.9, 0.85, 0.95, 0.8, 0.9]),
        "ev-02-fail": (MODEL, [0.1, 0.15, 0.2, 0.1, 0.25]),
        "ev-04-other": (OTHER_MODEL, [0.9, 0.85, 0.95, 0.8, 0.9]),
    }
    for evaluation_id in ("ev-01-pass", "ev-02-fail", "ev-03-broken", "ev-04-other", "ev-05-queued"):
        model = finished.get(evaluation_id, (MODEL,))[0]
        store.claim(evaluation_id, request(evaluation_id, model).model_dump(mode="json"), correlation_id=evaluation_id)
        if evaluation_id in finished:
            result, rows = finished_result(evaluation_id, model, examples, finished[evaluation_id][1])
            store.set_status(evaluation_id, "running")
            write_results(evaluator.clickhouse, evaluation_id, rows, datetime.now(UTC))
            store.set_status(evaluation_id, "completed", result.model_dump(mode="json"))
        elif evaluation_id == "ev-03-broken":
            failed = EvaluationCompleted(
                evaluation_id=evaluation_id,
                candidate=ModelTarget(model_name=MODEL, adapter_version=2),
                baseline=ModelTarget(model_name=MODEL, adapter_version=1),
                golden=DatasetRef(name="acme-golden", version=1),
                passed=False,
                reasons=[f"FAIL evaluation could not run: {HOSTILE_ERROR}"],
                gate_policy="default@v1",
                status="failed",
                error=HOSTILE_ERROR,
            )
            store.set_status(evaluation_id, "failed", failed.model_dump(mode="json"))


@pytest.fixture
async def site(tmp_path: Path, chdb_target: ClickHouseTarget) -> AsyncIterator[Site]:
    clickhouse = chdb_target.open()
    clickhouse.migrate()
    evaluator = evaluator_for(tmp_path, clickhouse, Embedder())  # the embedder loads on first use: never here
    seed(evaluator, clickhouse)
    registry = RegistryStore(f"sqlite:///{tmp_path}/keys.db")
    registry.migrate()
    keys = KeyStore(registry.engine)
    console = Console(Authenticator(keys))
    published: list[tuple[Any, str | None]] = []

    async def publish(payload: Any, *, correlation_id: str | None = None) -> None:
        published.append((payload, correlation_id))

    app = FastAPI()
    console.install(app)
    app.include_router(
        create_console_router(
            evaluator.store, console, golden=evaluator.load_golden, clickhouse=evaluator.clickhouse, publish=publish
        )
    )
    yield Site(app, evaluator.store, keys, published)
    evaluator.store.close()


async def sign_in(client: httpx.AsyncClient, key: str) -> str:
    """Sign in through the console's form; the session's CSRF token, read from the page it lands on."""
    form = await client.get("/console/login")
    token = CSRF_FIELD.search(form.text)
    assert token, form.text
    landed = await client.post(
        "/console/login", data={"csrf_token": token.group(1), "api_key": key, "next": LIST}, follow_redirects=True
    )
    assert landed.status_code == 200 and str(landed.url).endswith(LIST), landed.text
    csrf = CSRF_FIELD.search(landed.text)
    assert csrf
    return csrf.group(1)


def ids_on(page: str) -> list[str]:
    return re.findall(r'<a href="/evaluator/console/evaluations/(ev-[^"/]+)">', page)


async def test_a_viewer_reads_the_runs_newest_first_with_verdicts_and_key_metrics(site: Site) -> None:
    async with site.client() as client:
        await sign_in(client, site.key(Role.viewer))
        page = await client.get(LIST)

    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert "script-src" not in page.headers["content-security-policy"]
    assert ids_on(page.text) == ["ev-05-queued", "ev-04-other", "ev-03-broken", "ev-02-fail", "ev-01-pass"]
    rows = {run_id: row for row in page.text.split("<tr>")[2:] for run_id in ids_on(row)}
    assert f"{MODEL}:v2" in rows["ev-01-pass"] and f"{MODEL}:v1" in rows["ev-01-pass"]
    assert "acme-golden v1 / default" in rows["ev-01-pass"]
    assert '<span class="pass">pass</span>' in rows["ev-01-pass"] and "default@v1" in rows["ev-01-pass"]
    assert "token_f1 0.880 (Δ +0.680)" in rows["ev-01-pass"]
    assert '<span class="fail">fail</span>' in rows["ev-02-fail"]
    assert "could not run" in rows["ev-03-broken"] and "pending" in rows["ev-05-queued"]
    assert "run again" not in page.text  # a viewer gets no form it could not use
    assert "<script>" not in page.text


async def test_one_finished_run_shows_its_gate_checks_metrics_and_escaped_answers(site: Site) -> None:
    async with site.client() as client:
        await sign_in(client, site.key(Role.viewer))
        passed = await client.get(f"{LIST}/ev-01-pass")
        failed = await client.get(f"{LIST}/ev-02-fail")

    assert passed.status_code == 200
    text = passed.text
    assert 'Gate decision: <span class="pass">pass</span>' in text and "policy default@v1" in text
    checks = text.split("<th>passed</th></tr>")[1].split("</table>")[0]
    token_f1 = checks.split("<tr>")[1]
    assert "token_f1" in token_f1 and "interval on candidate − baseline lies above 0" in token_f1
    assert "+0.6800, CI [" in token_f1 and '<span class="pass">yes</span>' in token_f1
    assert "groundedness" in checks and "may drop by at most 0.0500" in checks
    assert "PASS token_f1: improved by +0.6800" in text  # the gate's own reasons
    # The answers, in the golden set's order, with the hostile prompt and answer as text.
    answers = text.split("Answers (first 50, token_f1)")[1]
    assert answers.index("hostile") < answers.index("candidate answer 1")
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt; How do I reset the hub?" in answers
    assert "&lt;script&gt;alert(&#39;answer&#39;)&lt;/script&gt; hold the button" in answers
    assert "Hold the button for 10 seconds." in answers and "0.900" in answers
    assert "<script>" not in text and "<img" not in text
    assert "test &lt;ops&gt;" in text  # who asked, escaped too

    checks = failed.text.split("<th>passed</th></tr>")[1].split("</table>")[0]
    assert 'Gate decision: <span class="fail">fail</span>' in failed.text
    assert "token_f1" in checks.split("<tr>")[1] and '<span class="fail">no</span>' in checks.split("<tr>")[1]


async def test_a_run_that_could_not_run_shows_why_and_a_queued_one_that_it_waits(site: Site) -> None:
    async with site.client() as client:
        await sign_in(client, site.key(Role.viewer))
        broken = await client.get(f"{LIST}/ev-03-broken")
        queued = await client.get(f"{LIST}/ev-05-queued")

    assert broken.status_code == 200 and "could not run" in broken.text
    assert "base model &lt;b&gt;gone&lt;/b&gt; &amp; &lt;script&gt;alert(&#39;error&#39;)&lt;/script&gt;" in broken.text
    assert "<script>" not in broken.text and "<b>gone" not in broken.text
    assert queued.status_code == 200 and "Not finished yet" in queued.text and "queued" in queued.text


async def test_filters_and_paging_narrow_the_list_and_bad_values_are_refused(site: Site) -> None:
    async with site.client() as client:
        await sign_in(client, site.key(Role.viewer))
        other = await client.get(LIST, params={"model": OTHER_MODEL})
        completed = await client.get(LIST, params={"model": MODEL, "status": "completed"})
        first = await client.get(LIST, params={"limit": "2"})
        older = re.search(r'<a href="(/evaluator/console/evaluations\?[^"]+)">older', first.text)
        assert older
        second = await client.get(older.group(1).replace("&amp;", "&"))
        nothing = await client.get(LIST, params={"status": "failed", "model": OTHER_MODEL})
        refused = [
            await client.get(LIST, params=params)
            for params in ({"status": "done"}, {"model": "../etc"}, {"limit": "0"}, {"limit": "x"})
        ]
        unknown_cursor = await client.get(LIST, params={"before": "ev-99"})

    assert ids_on(other.text) == ["ev-04-other"]
    assert ids_on(completed.text) == ["ev-02-fail", "ev-01-pass"]
    assert ids_on(first.text) == ["ev-05-queued", "ev-04-other"]
    assert ids_on(second.text) == ["ev-03-broken", "ev-02-fail"]
    assert ids_on(nothing.text) == [] and "No evaluations match these filters" in nothing.text
    assert [page.status_code for page in refused] == [400, 400, 400, 400]
    assert all("Refused" in page.text and "text/html" in page.headers["content-type"] for page in refused)
    assert unknown_cursor.status_code == 404


async def test_an_unknown_or_malformed_id_is_a_404_page(site: Site) -> None:
    async with site.client() as client:
        await sign_in(client, site.key(Role.viewer))
        unknown = await client.get(f"{LIST}/ev-nope")
        malformed = await client.get(f"{LIST}/..%2F..%2Fetc")
        hostile = await client.get(f"{LIST}/%3Cscript%3E")

    for page in (unknown, malformed, hostile):
        assert page.status_code == 404 and "text/html" in page.headers["content-type"]
        assert "there is no evaluation" in page.text and "Traceback" not in page.text
    assert "<script>" not in hostile.text


async def test_without_a_session_the_pages_send_the_browser_to_sign_in(site: Site) -> None:
    async with site.client() as client:
        listing = await client.get(LIST, params={"status": "completed"})
        one = await client.get(f"{LIST}/ev-01-pass")
        post = await client.post(f"{LIST}/ev-01-pass/rerun", data={"csrf_token": "x"})

    assert listing.status_code == 303
    assert (
        listing.headers["location"] == "/console/login?next=%2Fevaluator%2Fconsole%2Fevaluations%3Fstatus%3Dcompleted"
    )
    assert one.headers["location"] == "/console/login?next=%2Fevaluator%2Fconsole%2Fevaluations%2Fev-01-pass"
    assert post.status_code == 303 and site.published == []


async def test_running_a_request_again_needs_an_operator_and_the_csrf_token(site: Site) -> None:
    before = len(site.store.evaluation_page(limit=100))
    async with site.client() as client:
        viewer_csrf = await sign_in(client, site.key(Role.viewer))
        as_viewer = await client.post(f"{LIST}/ev-02-fail/rerun", data={"csrf_token": viewer_csrf})
    async with site.client() as client:
        csrf = await sign_in(client, site.key(Role.operator))
        listing = await client.get(LIST)
        missing = await client.post(f"{LIST}/ev-02-fail/rerun", data={})
        wrong = await client.post(f"{LIST}/ev-02-fail/rerun", data={"csrf_token": "not-the-token"})
        assert len(site.store.evaluation_page(limit=100)) == before and site.published == []
        still_queued = await client.post(f"{LIST}/ev-05-queued/rerun", data={"csrf_token": csrf})
        unknown = await client.post(f"{LIST}/ev-nope/rerun", data={"csrf_token": csrf})
        again = await client.post(f"{LIST}/ev-02-fail/rerun", data={"csrf_token": csrf})
        landed = await client.get(again.headers["location"])

    assert as_viewer.status_code == 403 and "this needs operator" in as_viewer.text
    assert "run again" in listing.text
    assert listing.text.count('action="/evaluator/console/evaluations/') == 4  # finished runs only, not the queued one
    assert missing.status_code == 403 and wrong.status_code == 403 and "CSRF" in wrong.text
    assert still_queued.status_code == 409 and unknown.status_code == 404
    assert again.status_code == 303
    new_id = again.headers["location"].rsplit("/", 1)[1]
    assert new_id.startswith("ev-") and new_id != "ev-02-fail"
    queued = site.store.evaluation(new_id)
    assert queued is not None and queued.status == "queued"
    original = site.store.evaluation("ev-02-fail")
    assert original is not None
    assert {k: v for k, v in queued.request.items() if k not in ("evaluation_id", "requested_by")} == {
        k: v for k, v in original.request.items() if k not in ("evaluation_id", "requested_by")
    }
    assert queued.request["requested_by"] == "console-operator"
    [(event, correlation_id)] = site.published
    assert isinstance(event, EvaluationRequested) and event.evaluation_id == new_id == correlation_id
    assert landed.status_code == 200 and "Not finished yet" in landed.text
