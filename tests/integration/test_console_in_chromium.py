"""The web console as one web app in a real headless Chromium: the registry's, the evaluator's and the
monitor's pages served by one process built as `flywheel run registry evaluator monitor` builds it
(build_process on real Kafka, uvicorn running its lifespan). The data is seeded through each service's own
store, and where the services meet it comes through the process itself: the evaluator evaluates the
registry's new adapters on its own (without a golden set both runs fail) and the registry records those
verdicts from Kafka; the monitor's first tick opens an alert on the seeded traffic and its page reads the
production lineage from the registry's door.

A viewer signs in once and reads every page from the console's index; hostile text stays text; no page
offers a viewer a change form, and the viewer's session posting one anyway (its own CSRF token, read as a
script could not: the cookie is HttpOnly) changes nothing; signing out ends the session. An operator then
moves a prompt label through the page's own form, and the audit log names them. Every page is kept as a
screenshot in test-artifacts/console."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx
import pytest
import uvicorn

from infra.processes import free_port
from contracts.envelope import wrap
from contracts.events import (
    DatasetRef,
    EvaluationCompleted,
    EvaluationRequested,
    FeedbackReceived,
    GuardOutcome,
    InferenceLogged,
    ModelTarget,
    Stage,
    Thumbs,
)
from contracts.http import Role
from services.evaluator.app import create_app as create_evaluator
from services.evaluator.gate import POLICIES, compare, decide
from services.evaluator.golden import parse_golden
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.store import DatasetPointer, EvaluatorStore, ResultRow, write_results
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.monitor.app import create_app as create_monitor
from services.monitor.settings import MonitorSettings
from services.registry.app import create_app as create_registry
from services.registry.service import Registry
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.auth import KeyStore, registry_database_url
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.console.console import cookie_name
from services.runtime.privacy import Redactor
from services.runtime.service import Runtime, Service, build_process
from services.runtime.settings import FlywheelSettings
from tests.browser import ARTIFACTS, Browser, chromium
from tests.conftest import require
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.registry_support import evaluation, jsonl, seed_model, training_completed
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ADMIN = "fw_boot_console-chromium-admin-secret-0123456789"
MODEL = "acme-smol"
DATASET = "tickets"
GOLDEN = "acme-golden"
PROMPT = "support-reply"
PASSED_RUN = "ev-gate-pass"
# What the evaluator names its own run of each new adapter (handlers.when_adapter_registered_...).
AUTO_RUNS = (f"auto-{MODEL}-v1", f"auto-{MODEL}-v2")
HOSTILE_TEMPLATE = '<script>alert(1)</script> & "quotes"'
HOSTILE_RECORD = '<img src=x onerror="alert(2)"> my <b>router</b> & modem'
HOSTILE_ANSWER = "<script>alert('answer')</script> hold the button"
SHOTS = ARTIFACTS / "console"
SIGN_OUT = 'form[action="/console/logout"]'

TICKETS = [
    {
        "messages": [
            {"role": "user", "content": HOSTILE_RECORD},
            {"role": "assistant", "content": "Restart the modem, then the router."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "How do I reset my password?"},
            {"role": "assistant", "content": "Use Settings > Security > Reset."},
        ]
    },
]
GOLDEN_RECORDS = [
    {
        "id": f"q{index}",
        "messages": [
            {"role": "user", "content": f"How long is the warranty on product {index}?"},
            {"role": "assistant", "content": f"Product {index} comes with a 2-year warranty."},
        ],
    }
    for index in range(4)
]
RULES = """
rules:
  - name: thumbs-down
    version: 1
    metric: thumbs_down_rate
    threshold: 0.3
    window_s: 600
    min_samples: 10
"""


@dataclass(frozen=True)
class Process:
    base: str
    registry: Registry
    keys: KeyStore


def seed_registry(registry: Registry, tmp_path: Path) -> None:
    """acme-smol with v1 in production and v2 in staging, both trained on tickets:v1 (whose records carry
    hostile text); the prompt support-reply with v1 in production, v2 in staging and v3, whose template
    carries hostile text, under no label."""
    seed_model(registry, tmp_path, name=MODEL)
    registry.datasets.publish_dataset("alice", name=DATASET, split="train", jsonl=jsonl(TICKETS), model_name=MODEL)
    for index in range(2):
        adapter = registry.adapters.register_trained_adapter(
            training_completed(
                registry,
                tmp_path,
                job_id=f"job-{index}",
                seed=index,
                model=MODEL,
                dataset=DatasetRef(name=DATASET, version=1),
            ),
            event_id=str(uuid.uuid4()),
            correlation_id=f"corr-{index}",
        )
        registry.adapters.attach_evaluation(evaluation(MODEL, adapter.version))
        registry.adapters.transition("alice", model_name=MODEL, version=adapter.version, to_stage=Stage.staging)
    registry.approvals.approve("bob", Role.approver, object_type="adapter", name=MODEL, version=1)
    registry.adapters.transition("alice", model_name=MODEL, version=1, to_stage=Stage.production)

    prompts = registry.prompts
    prompts.publish_prompt("alice", name=PROMPT, template="You are Acme support.\nAnswer: {{ question }}")
    prompts.publish_prompt(
        "alice",
        name=PROMPT,
        template="You are Acme support. Be brief.\nAnswer: {{ question }}",
        model_name=MODEL,
        labels=["staging"],
    )
    prompts.publish_prompt(
        "alice", name=PROMPT, template=f"You are Acme support. {HOSTILE_TEMPLATE}\nAnswer: {{{{ question }}}}"
    )
    registry.approvals.approve("bob", Role.approver, object_type="prompt", name=PROMPT, version=1)
    prompts.set_prompt_label("alice", name=PROMPT, label="production", version=1)


def seed_passed_run(store: EvaluatorStore, artifacts: ArtifactStore, clickhouse: ClickHouseStore) -> None:
    """A finished run of acme-smol v2 against v1 on acme-golden, recorded as the evaluator's worker records one:
    the verdict of the real gate (default@v1) on its scores, and its per-example rows in ClickHouse."""
    text = "".join(json.dumps(record) + "\n" for record in GOLDEN_RECORDS)
    golden = artifacts.put_bytes(text.encode(), kind="jsonl")
    store.remember_dataset(DatasetPointer(GOLDEN, 1, "golden", golden.uri, golden.sha256, MODEL))
    examples = parse_golden(text)
    scores = {
        "candidate": {"token_f1": [0.9, 0.85, 0.95, 0.8], "groundedness": [0.8] * 4, "unsafe_rate": [0.0] * 4},
        "baseline": {"token_f1": [0.2] * 4, "groundedness": [0.8] * 4, "unsafe_rate": [0.0] * 4},
    }
    policy = POLICIES["default@v1"]
    comparisons = {
        metric: compare(metric, values, scores["baseline"][metric], resamples=200)
        for metric, values in scores["candidate"].items()
    }
    verdict = decide(policy, comparisons)
    request = EvaluationRequested(
        evaluation_id=PASSED_RUN,
        candidate=ModelTarget(model_name=MODEL, adapter_version=2),
        baseline=ModelTarget(model_name=MODEL, adapter_version=1),
        golden=DatasetRef(name=GOLDEN, version=1),
        requested_by="alice",
    )
    result = EvaluationCompleted(
        evaluation_id=PASSED_RUN,
        candidate=request.candidate,
        baseline=request.baseline,
        golden=request.golden,
        passed=verdict.passed,
        reasons=verdict.reasons,
        gate_policy=policy.key,
        metrics=list(comparisons.values()),
    )
    rows = [
        ResultRow(
            example.example_id,
            MODEL,
            2 if target == "candidate" else 1,
            target,
            metric,
            values[index],
            None,
            HOSTILE_ANSWER if index == 0 else f"{target} answer {index}",
            example.reference,
        )
        for target, by_metric in scores.items()
        for metric, values in by_metric.items()
        for index, example in enumerate(examples)
    ]
    store.claim(PASSED_RUN, request.model_dump(mode="json"), correlation_id=PASSED_RUN)
    store.set_status(PASSED_RUN, "running")
    write_results(lambda: clickhouse, PASSED_RUN, rows, datetime.now(UTC))
    store.set_status(PASSED_RUN, "completed", result.model_dump(mode="json"))


def seed_traffic(clickhouse: ClickHouseStore) -> None:
    """Twelve answers of acme-smol v1 over the last eight minutes, eight thumbed down: the monitor's first tick
    opens an alert, and its charts have a few buckets to draw."""
    sink = Sink(FeedbackStore(lambda: clickhouse), Redactor())
    now = datetime.now(UTC)
    inferences, feedback = [], []
    for index in range(12):
        inference_id = f"inf-{uuid.uuid4().hex[:10]}"
        inferences.append(
            InferenceLogged(
                inference_id=inference_id,
                model_name=MODEL,
                adapter_version=1,
                input_text=f"question {index}",
                output_text="Restart the modem.",
                prompt_tokens=20 + index,
                completion_tokens=8,
                latency_total_ms=300.0 + 10 * index,
                # Two of them met the gateway's guards: an injection blocked, a card in an answer redacted.
                **(
                    {"guard_input_outcome": GuardOutcome.blocked, "guard_input_found": ["PROMPT_INJECTION"]}
                    if index == 4
                    else {"guard_output_outcome": GuardOutcome.redacted, "guard_output_found": ["CARD"]}
                    if index == 7
                    else {}
                ),
            )
        )
        down = index % 3 != 0
        feedback.append(
            FeedbackReceived(
                inference_id=inference_id, thumbs=Thumbs.down if down else Thumbs.up, rating=2 if down else 5
            )
        )

    def at(events: list) -> list:
        return [
            wrap(event, producer="test").model_copy(update={"occurred_at": now - timedelta(seconds=45 * (11 - index))})
            for index, event in enumerate(events)
        ]

    sink.store_inferences(at(inferences))
    sink.store_feedback(at(feedback))


@pytest.fixture
async def process(
    settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget, tmp_path: Path
) -> AsyncIterator[Process]:
    """registry, evaluator and monitor in one process on real Kafka, served by uvicorn on a free port, seeded."""
    require(shutil.which("chromium") is not None, "Debian's chromium is not installed (apt-get install chromium)")
    settings = settings.model_copy(update={"bootstrap_admin_key": ADMIN})
    clickhouse = chdb_target.open()
    clickhouse.migrate()
    await asyncio.to_thread(seed_traffic, clickhouse)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def evaluator(runtime: Runtime) -> Service:
        # chDB allows one data directory per process: the session's, with a database of this test's own. Set
        # before the evaluator is built, which takes the process's ClickHouse as it is then.
        runtime.clickhouse = lambda: clickhouse
        return create_evaluator(runtime, EvaluatorSettings())

    def monitor(runtime: Runtime) -> Service:
        # One tick (at the start) is all the page needs. The monitor has no key of its own: its page reads the
        # production lineage from the registry's door with the viewer's key.
        # An hour of history on the page: buckets of 75 s, so the seeded minutes are several points.
        monitor_settings = MonitorSettings(rules_path=rules, tick_s=3600, registry_url=base, console_hours=1)
        return create_monitor(runtime, monitor_settings, open_readonly=partial(chdb_target.open, readonly=True))

    app, runtime = build_process(
        settings, [create_registry, evaluator, monitor], title="flywheel-registry-evaluator-monitor"
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    serving = asyncio.create_task(server.serve())
    store: RegistryStore | None = None
    runs: EvaluatorStore | None = None
    try:
        # Each service's consumer group joins in turn: the start takes a while on a busy machine.
        await eventually(lambda: server.started or serving.done(), timeout_s=120, what="the process listening")
        assert not serving.done(), f"uvicorn did not start: {serving.exception()}"
        # Seeded through second handles on the same databases, off the event loop: the served registry's
        # outbox relay holds its write transaction while it publishes through this loop.
        store = RegistryStore(registry_database_url(settings))
        registry = Registry(store, runtime.artifacts)
        await asyncio.to_thread(seed_registry, registry, tmp_path)
        runs = EvaluatorStore(settings.home / "evaluator" / "evaluator.db")

        async def evaluated_on_its_own() -> bool:
            records = [await asyncio.to_thread(runs.evaluation, run) for run in AUTO_RUNS]
            return all(record is not None and record.status == "failed" for record in records)

        await eventually(
            evaluated_on_its_own, interval_s=0.2, what="the evaluator's own runs of v1 and v2 (no golden set yet)"
        )
        # The golden set is remembered only now: known when the adapters arrived, it would have had the
        # evaluator's own runs load the (fake) base model.
        await asyncio.to_thread(seed_passed_run, runs, runtime.artifacts, clickhouse)

        async def verdict_recorded() -> bool:
            lineage = await asyncio.to_thread(registry.adapters.lineage, MODEL, 2)
            return AUTO_RUNS[1] in {judged.evaluation_id for judged in lineage.evaluations}

        await eventually(
            verdict_recorded, interval_s=0.2, what="the registry recording the evaluator's verdict from Kafka"
        )

        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as door:

            async def alert_open() -> bool:
                return bool((await door.get("/monitor/v1/alerts")).json())

            await eventually(alert_open, interval_s=0.2, what="the monitor's first tick opening an alert")
        yield Process(base, registry, KeyStore(store.engine))
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=60)
        if runs is not None:
            runs.close()
        if store is not None:
            store.close()


async def text_of(browser: Browser) -> str:
    return await browser.evaluate("document.body.innerText")


async def follow(browser: Browser, base: str, href: str) -> None:
    """Open `href` as a link of the page the browser is on."""
    selector = json.dumps(f'a[href="{href}"]')
    assert await browser.evaluate(f"document.querySelector({selector}) !== null"), f"no link to {href} on the page"
    await browser.open(base + href, href.split("?", maxsplit=1)[0])


async def submit_and_settle(browser: Browser, script: str, path: str) -> None:
    """Run `script`, which submits a form, and wait for the page it leads to at `path` (which may be the
    path of the page it left: the old page is marked, so it is not mistaken for the new one)."""
    await browser.evaluate("document.documentElement.dataset.left = 'yes'; true")
    await browser.evaluate(f"{{ {script} }} true")

    async def left() -> bool:
        with contextlib.suppress(AssertionError):  # a page being replaced refuses evaluation for a moment
            return await browser.evaluate("document.documentElement.dataset.left === undefined")
        return False

    await eventually(left, interval_s=0.1, what=f"the form's answer at {path}")
    await browser.settled_at(path)


async def check_and_keep(browser: Browser, name: str, expected: list[str]) -> None:
    """The page the browser is on rendered, shows `expected` as text, holds no markup from the data and
    no change form for a viewer; its screenshot is kept as SHOTS/`name`.png."""
    heading = await browser.evaluate("(document.querySelector('h1') || {innerText: ''}).innerText")
    text = await text_of(browser)
    assert heading not in ("", "Refused", "Sign in"), f"{name}: {heading!r}\n{text}"
    missing = [value for value in expected if value not in text]
    assert not missing, f"{name} does not show {missing}:\n{text}"
    assert await browser.evaluate("document.querySelectorAll('script, [onerror]').length") == 0, (
        f"{name}: text from the data became markup"
    )
    forms = await browser.evaluate(
        f"[...document.querySelectorAll('form')].filter(f => f.querySelector('input[name=csrf_token]') && !f.matches({json.dumps(SIGN_OUT)})).length"
    )
    assert forms == 0, f"{name}: a viewer is shown a change form"
    shot = await browser.screenshot(SHOTS / f"{name}.png")
    assert shot.stat().st_size > 10_000, f"{shot} is {shot.stat().st_size} bytes"


async def test_the_console_in_chromium_across_services_read_signed_out_and_changed_by_an_operator(
    process: Process, tmp_path: Path
) -> None:
    base, registry = process.base, process.registry
    session_cookie = cookie_name(httpx.URL(base).port)
    viewer_key, _ = process.keys.create(principal="console-viewer", role=Role.viewer, created_by="test")
    operator_key, _ = process.keys.create(principal="console-operator", role=Role.operator, created_by="test")
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()

    async with chromium(tmp_path / "chromium-profile") as browser:
        # 1. Signed out, a page leads to the sign-in and, signed in, back to itself.
        await browser.open(f"{base}/registry/console/models", "/console/login")
        await browser.submit_key(viewer_key)
        await browser.settled_at("/registry/console/models")
        assert "signed in as console-viewer (viewer)" in await text_of(browser)

        # 2. The index lists every service's pages; each page and one detail page of each kind renders.
        await browser.open(f"{base}/console", "/console")
        sections = [
            "/registry/console/models",
            "/registry/console/prompts",
            "/registry/console/rubrics",
            "/registry/console/datasets",
            "/evaluator/console/evaluations",
            "/monitor/console",
            "/monitor/console/traces",
            "/monitor/console/sessions",
            "/monitor/console/guards",
        ]
        listed = await browser.evaluate("[...document.querySelectorAll('main a')].map(a => a.getAttribute('href'))")
        navigation = await browser.evaluate("[...document.querySelectorAll('nav a')].map(a => a.getAttribute('href'))")
        assert sorted(listed) == sorted(sections) and sorted(navigation) == sorted(sections), (listed, navigation)
        await check_and_keep(browser, "01-console", ["registry", "evaluator", "monitor", "Models", "Evaluations"])

        adapter_page = f"/registry/console/models/{MODEL}/versions/1"
        await follow(browser, base, "/registry/console/models")
        await check_and_keep(browser, "02-models", [MODEL, "LlamaForCausalLM", "v1", "production", "v2", "staging"])
        await follow(browser, base, f"/registry/console/models/{MODEL}")
        await check_and_keep(browser, "03-model", [MODEL, "job-0", "job-1", f"{DATASET}:v1", "failed"])
        await follow(browser, base, adapter_page)
        await check_and_keep(
            browser, "04-adapter-production", [f"{MODEL}:v1", "production", f"{DATASET}:v1", "job-0", "bob"]
        )
        await follow(browser, base, f"/registry/console/models/{MODEL}")
        await follow(browser, base, f"/registry/console/models/{MODEL}/versions/2")
        # The evaluator's own failed run of v2, recorded by the registry from Kafka.
        await check_and_keep(browser, "05-adapter-staging", [f"{MODEL}:v2", "staging", AUTO_RUNS[1], "failed"])

        await follow(browser, base, "/registry/console/prompts")
        await check_and_keep(browser, "06-prompts", [PROMPT, "production → v1", "staging → v2"])
        await follow(browser, base, f"/registry/console/prompts/{PROMPT}")
        # The diff of the latest version against the one before shows the hostile line as an added line.
        await check_and_keep(
            browser, "07-prompt", [PROMPT, f"+You are Acme support. {HOSTILE_TEMPLATE}", "v3", "Be brief."]
        )
        diff = await browser.evaluate("document.querySelector('pre.diff .added').innerText")
        assert HOSTILE_TEMPLATE in diff, diff

        await follow(browser, base, "/registry/console/datasets")
        await check_and_keep(browser, "08-datasets", [DATASET, "train", "v1"])
        await follow(browser, base, f"/registry/console/datasets/{DATASET}/versions/1")
        await check_and_keep(browser, "09-dataset", [f"{DATASET}:v1", HOSTILE_RECORD, f"{MODEL}:v1", f"{MODEL}:v2"])

        await follow(browser, base, "/evaluator/console/evaluations")
        await check_and_keep(browser, "10-evaluations", [PASSED_RUN, *AUTO_RUNS, "pass", "could not run"])
        await follow(browser, base, f"/evaluator/console/evaluations/{PASSED_RUN}")
        await check_and_keep(
            browser, "11-evaluation", [PASSED_RUN, "Gate decision: pass", "default@v1", HOSTILE_ANSWER]
        )
        await follow(browser, base, "/evaluator/console/evaluations")
        await follow(browser, base, f"/evaluator/console/evaluations/{AUTO_RUNS[1]}")
        await check_and_keep(
            browser, "12-evaluation-failed", [AUTO_RUNS[1], "could not run", f"no-golden-set-for-{MODEL}"]
        )

        await follow(browser, base, "/monitor/console")
        # The alert of the monitor's own tick, and the lineage read from the registry's door with the viewer's key.
        await check_and_keep(browser, "13-monitor", ["thumbs-down", "1 open alerts", f"{MODEL}:v1", f"{DATASET}:v1"])
        await follow(browser, base, "/monitor/console/guards")
        await check_and_keep(browser, "14-guards", ["2 guarded calls", "PROMPT_INJECTION", "redacted: CARD"])

        # 3. The viewer's session posts the label form anyway, with its own CSRF token: refused, nothing moves.
        await browser.open(f"{base}/registry/console/prompts/{PROMPT}", f"/registry/console/prompts/{PROMPT}")
        assert await browser.evaluate("document.cookie") == "", "the session cookie is HttpOnly"
        [session] = [
            cookie["value"]
            for cookie in (await browser.call("Network.getCookies", urls=[base]))["cookies"]
            if cookie["name"] == session_cookie
        ]
        csrf = await browser.evaluate(
            f"document.querySelector({json.dumps(SIGN_OUT + ' input[name=csrf_token]')}).value"
        )
        async with httpx.AsyncClient(base_url=base, cookies={session_cookie: session}) as forger:
            refused = await forger.post(
                f"/registry/console/prompts/{PROMPT}/labels",
                data={"csrf_token": csrf, "label": "staging", "version": "3"},
            )
        assert refused.status_code == 403 and "this needs operator" in refused.text, refused.text
        assert registry.prompts.get_prompt(PROMPT, label="staging").version == 2, "the label did not move"

        # 4. Signing out through the layout's form ends the session, in the browser and on the server.
        await submit_and_settle(browser, f"document.querySelector({json.dumps(SIGN_OUT)}).submit();", "/console/login")
        await browser.open(f"{base}/registry/console/models", "/console/login")
        async with httpx.AsyncClient(base_url=base, cookies={session_cookie: session}) as replay:
            assert (await replay.get("/registry/console/models")).status_code == 303

        # 5. An operator moves the label through the page's own form.
        await browser.submit_key(operator_key)
        await browser.settled_at("/registry/console/models")
        await browser.open(f"{base}/registry/console/prompts/{PROMPT}", f"/registry/console/prompts/{PROMPT}")
        await submit_and_settle(
            browser,
            """const form = document.querySelector('form[action$="/labels"]');
            form.elements.label.value = 'staging';
            form.elements.version.value = '3';
            form.submit();""",
            f"/registry/console/prompts/{PROMPT}",
        )
        labels = await browser.evaluate(
            "Object.fromEntries([...document.querySelectorAll('table')[0].querySelectorAll('tbody tr')]"
            ".map(row => [row.cells[0].innerText, row.cells[1].innerText]))"
        )
        assert labels == {"production": "v1", "staging": "v3"}, labels
        shot = await browser.screenshot(SHOTS / "14-prompt-label-moved-by-operator.png")
        assert shot.stat().st_size > 10_000

    assert registry.prompts.get_prompt(PROMPT, label="staging").version == 3
    [move] = registry.changes.entries(
        object_type="prompt", object_id=f"{PROMPT}@staging", actor="console-operator"
    ).items
    assert move.action == "prompt.label" and move.after == {"version": 3, "traffic_percent": None}, move
    assert len(list(SHOTS.glob("*.png"))) == 15
