"""`flywheel demo`: the seven steps of the loop (ARCHITECTURE.md, "The loop"), for real, in one process.

Like `flywheel up`, every service runs in this process (one ASGI app on a free port, one broker, one
embedded ClickHouse) against a local Apache Kafka the demo starts and stops. The demo then acts as
the people and apps around the platform, through the services' doors and events only: an operator
registers data and asks for training, approves promotions; an app calls the gateway with the
openai client; reviewers give feedback. What the services do in between (train, evaluate, gate,
load adapters, store logs, raise alerts, retrain) is theirs. A step the platform cannot complete
is reported as failed with the reason; nothing is filled in by the demo.

A second run in the same FLYWHEEL_HOME reuses what exists: datasets of the same content, the
training job of the same data and hyperparameters (the trainer answers it as done), adapters and
their stages in the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.cli.demo_report import FAILED, PASSED, Evaluation, LoopReport, Step
from services.runtime.settings import FlywheelSettings, load_settings

if TYPE_CHECKING:
    from services.runtime.service import ServiceFactory

console = Console(highlight=False)

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[1] / "trainer" / "demo_data"
# The reduced training recipe of the trainer's learning test: 8 facts x 8 paraphrases, 2 epochs at a
# high learning rate. It is what fits the 20-minute budget on 2 CPU cores and still passes facts@v1.
FACTS_V1 = 8
FACTS_TRAFFIC = 16
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GATE_POLICY = "facts@v1"
MIN_CORRECTIONS = 8
CORRECTION_REPEATS = 2
# The demo's alert rule: a thumbs-down rate over 30% in the last 15 minutes (10 ratings at least)
# opens a quality alert; the monitor's default rules compare against a day-long baseline a fresh demo has not got.
RULES = """rules:
  - name: demo-thumbs-down-rate
    version: 1
    metric: thumbs_down_rate
    threshold: 0.3
    severity: warning
    window_s: 900
    min_samples: 10
    cooldown_s: 3600
  - name: error-rate
    version: 1
    metric: error_rate
    threshold: 0.05
    severity: critical
    window_s: 900
    min_samples: 10
    cooldown_s: 1800
"""


def demo(
    home: Path = typer.Option(None, help="Data directory for this demo; default FLYWHEEL_HOME."),
    traffic: int = typer.Option(2, min=1, max=6, help="Requests per fact sent through the gateway in step 4."),
    step_timeout: float = typer.Option(3600.0, min=60, help="Seconds a step may wait for training or an evaluation (a shared CPU can need far more than the 20-minute target)."),
) -> None:
    """Run the loop end to end on real components (Kafka, ClickHouse, Triton, SmolLM2) and write a report."""
    overrides = {"home": home.resolve()} if home else {}
    settings = load_settings(FlywheelSettings, **overrides)
    settings = settings.model_copy(update={"home": settings.home.resolve()})
    report = LoopReport(started_at=datetime.now(UTC), home=str(settings.home))
    started = time.monotonic()
    kafka = None
    broker_started_here = False
    busy = 0
    interrupted = None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as progress:
        try:
            task = progress.add_task("kafka: starting a local Apache Kafka broker", total=None)
            if settings.kafka_bootstrap:
                report.bootstrap = settings.kafka_bootstrap
            else:
                from infra.local_kafka import LocalKafka

                kafka = LocalKafka(settings.home, settings.cache)
                broker_started_here = not kafka.status().running
                report.bootstrap = kafka.start()
                report.cleanup.append(f"kafka broker pid {kafka.status().pid} at {report.bootstrap}")
            progress.update(task, description=f"kafka: ready at {report.bootstrap}", completed=1, total=1)
            busy, interrupted = _run_loop(_loop(settings.model_copy(update={"kafka_bootstrap": report.bootstrap}), report, progress, traffic=traffic, step_timeout=step_timeout))
            if interrupted:
                report.cleanup.append(f"interrupted by {interrupted}: the loop stopped where it was and every service was stopped")
            if busy:
                report.cleanup.append(
                    f"{busy} worker thread(s) still busy after every service stopped (a training job the trainer's stop does not interrupt); "
                    "the demo exits without waiting: the job resumes from its last checkpoint on the next run"
                )
        finally:
            if kafka is not None and broker_started_here:
                task = progress.add_task("kafka: stopping the broker the demo started", total=None)
                kafka.stop()
                port = int(report.bootstrap.rsplit(":", 1)[1])
                from infra.processes import port_is_free

                report.cleanup.append(f"kafka stopped; port {port} {'free' if port_is_free(port) else 'STILL IN USE'}")
                progress.update(task, description="kafka: stopped", completed=1, total=1)
    report.seconds = time.monotonic() - started
    out = settings.home / "reports"
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo-summary.txt").write_text(report.to_text())
    (out / "demo-report.html").write_text(report.to_html())
    console.print(report.to_text())
    console.print(f"report written to {out / 'demo-summary.txt'} and {out / 'demo-report.html'}")
    if busy:
        # Everything this process started is stopped and its report written; waiting for a thread no
        # service will stop would hold the demo for the rest of a training run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130 if interrupted else 0 if report.ok else 1)
    if interrupted:
        raise typer.Exit(130)
    if not report.ok:
        raise typer.Exit(1)


def _run_loop(main: Coroutine[Any, Any, None]) -> tuple[int, str | None]:
    """Run `main` until it ends or SIGINT/SIGTERM cancels it (a second one exits at once).

    Returns how many worker threads are still busy after it (they are not waited for) and the name
    of the signal that stopped it, if one did.
    """
    from services.runtime.service import force_exit

    executor = ThreadPoolExecutor(thread_name_prefix="flywheel-demo")
    loop = asyncio.new_event_loop()
    loop.set_default_executor(executor)
    task = loop.create_task(main, name="demo")
    received: list[int] = []

    def on_signal(sig: int) -> None:
        if received:
            force_exit(sig)
        received.append(sig)
        # Cancelling runs _loop's finally: the services stop in order, the port is freed.
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    async def _cancel_leftovers() -> None:
        # A task still pending when the loop closes is reported as "Task was destroyed but it is pending!".
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}
        for leftover in leftovers:
            leftover.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    try:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not received:
                raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        loop.run_until_complete(_cancel_leftovers())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        executor.shutdown(wait=False, cancel_futures=True)

    def busy() -> int:
        return sum(1 for thread in threading.enumerate() if thread.name.startswith("flywheel-demo") and thread.is_alive())

    deadline = time.monotonic() + 10  # idle workers exit once the shutdown wakes them
    while busy() and time.monotonic() < deadline:
        time.sleep(0.2)
    return busy(), signal.Signals(received[0]).name if received else None


# ------------------------------------------------------------------------------------------- the process


def _configure(settings: FlywheelSettings) -> tuple[FlywheelSettings, str, list[ServiceFactory]]:
    """Settings for the demo's process: a free port, an admin key kept in the home, the demo's rules;
    and each service's factory with its settings, the demo's values over the environment's."""
    from functools import partial

    from pydantic import SecretStr

    from infra.processes import free_port
    from services.cli.run_cmd import available_services, factory
    from services.runtime.auth import generate_key
    from services.runtime.service import settings_class

    state = settings.home / "demo"
    state.mkdir(parents=True, exist_ok=True)
    key_file = state / "admin.key"
    if not key_file.exists():
        key_file.write_text(generate_key()[0])
        key_file.chmod(0o600)
    admin_key = key_file.read_text().strip()
    rules = state / "rules.yaml"
    rules.write_text(RULES)
    port = free_port()
    settings = settings.model_copy(update={"http_port": port, "bootstrap_admin_key": SecretStr(admin_key)})
    demo_values: dict[str, dict[str, Any]] = {
        "monitor": {
            "rules_path": rules, "tick_s": 5, "api_key": admin_key, "retrain_min_corrections": MIN_CORRECTIONS,
            # v2 learns v1's data (its lineage) plus the corrections; twice each, so two paraphrases of a new fact weigh enough.
            "retrain_correction_repeats": CORRECTION_REPEATS,
        },
        # A demo stopped mid-training resumes its job from the last checkpoint on the next run.
        "trainer": {"checkpoint_every": 2, "progress_every": 1},
        "evaluator": {"gate_policies": {MODEL: GATE_POLICY}, "max_tokens": 40},
        "serving": {"rate_limit_rps": 50, "rate_limit_burst": 100},
    }
    factories: list[ServiceFactory] = []
    for name in available_services():
        create_app = factory(name)
        # The rest of each service's settings (and PrivacySettings) come from the environment, as for `flywheel up`.
        factories.append(partial(create_app, settings=load_settings(settings_class(create_app), **demo_values.get(name, {}))))
    return settings, admin_key, factories


async def _loop(settings: FlywheelSettings, report: LoopReport, progress: Progress, *, traffic: int, step_timeout: float) -> None:
    from infra.processes import port_is_free
    from services.cli.run_cmd import available_services
    from services.cli.service_commands import service_cli
    from services.runtime.service import HttpServer, build_process

    settings, admin_key, factories = _configure(settings)
    report.http = f"http://{settings.http_host}:{settings.http_port}"

    task = progress.add_task("registry: importing the SmolLM2 base model (GGUF -> safetensors, once)", total=None)
    # The registry's own command (the outbox relays its model.registered when the process starts).
    registry_cli = service_cli("registry")
    if registry_cli is None:
        raise RuntimeError("the demo needs the registry service, which is not part of this installation")
    await asyncio.to_thread(registry_cli.import_base_into, settings)
    progress.update(task, description="registry: base model imported", completed=1, total=1)

    task = progress.add_task(f"process: starting {', '.join(available_services())} (Triton, SmolLM2, chDB)", total=None)
    app, _ = build_process(settings, factories, title="flywheel-demo")
    # The demo's loop handles SIGINT/SIGTERM itself (_run_loop), so the driver stops with the server.
    server = HttpServer(app, settings, handle_signals=False)
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    try:
        while not server.started:
            if serving.done():
                raise RuntimeError(f"the demo's process did not start: {serving.exception() or 'see the log'}")
            await asyncio.sleep(0.2)
        progress.update(task, description=f"process: ready at {report.http}", completed=1, total=1)
        driver = Driver(report.http, admin_key, report, progress, step_timeout=step_timeout)
        await driver.run(traffic=traffic)
    finally:
        task = progress.add_task("process: stopping every service", total=None)
        server.should_exit = True
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(serving), timeout=120)
            except asyncio.CancelledError:
                continue  # a first signal while the services were already stopping: the stop goes on
            except TimeoutError:
                report.cleanup.append("services did not stop within 120 s")
            except Exception as error:  # noqa: BLE001 - a failed stop is reported; the broker and the report still follow
                report.cleanup.append(f"services stopped with an error: {type(error).__name__}: {error}")
            break
        free = port_is_free(settings.http_port)
        report.cleanup.append(f"services stopped; http port {settings.http_port} {'free' if free else 'STILL IN USE'}")
        progress.update(task, description="process: stopped", completed=1, total=1)


# ------------------------------------------------------------------------------------------- the people


class StepFailed(Exception):
    """The platform could not complete a step; the message says what was missing."""


def _rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def _answer(row: dict[str, Any]) -> str:
    return row["messages"][-1]["content"]


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:\.\d+)?", text))


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


class Driver:
    """Operators, an approver, an app and reviewers, acting through the platform's doors.

    The admin key only hands out keys: an operator (demo-operator) asks for every promotion and an
    approver (demo-approver), another principal, approves each production promotion beforehand.
    """

    def __init__(self, base_url: str, admin_key: str, report: LoopReport, progress: Progress, *, step_timeout: float) -> None:
        import httpx

        self.base_url = base_url
        self.report = report
        self.progress = progress
        self.timeout = step_timeout
        self.http = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
        self.app_key: str | None = None
        self.role_keys: dict[str, str] = {}
        self.golden = _rows("golden.jsonl")
        self.train = _rows("train.jsonl")
        self.facts = list(dict.fromkeys(_answer(row) for row in self.golden))
        self.reference = {_answer(row): _answer(row) for row in self.golden}

    # ------------------------------------------------------------------ plumbing

    async def call(self, method: str, path: str, expect: tuple[int, ...] = (200, 201, 202), **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code not in expect:
            raise StepFailed(f"{method} {path} answered {response.status_code}: {response.text[:400]}")
        return response.json() if response.content else None

    async def as_principal(self, principal: str, role: str) -> dict[str, str]:
        """Headers acting as `principal` with `role`, its key created by the admin once per run."""
        if principal not in self.role_keys:
            self.role_keys[principal] = (await self.call("POST", "/registry/v1/keys", json={"principal": principal, "role": role}))["key"]
        return {"Authorization": f"Bearer {self.role_keys[principal]}"}

    async def approve(self, kind: str, name: str, version: int, comment: str) -> None:
        """demo-approver approves a production promotion the operator then performs."""
        headers = await self.as_principal("demo-approver", "approver")
        await self.call("POST", f"/registry/v1/{kind}/{name}/versions/{version}/approvals", json={"comment": comment}, headers=headers)

    async def until(self, what: str, probe: Callable[[], Awaitable[Any]], interval: float = 2.0, timeout: float | None = None) -> Any:
        timeout = min(timeout or self.timeout, self.timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await probe()
            if value:
                return value
            await asyncio.sleep(interval)
        raise StepFailed(f"timed out after {timeout:.0f} s waiting for {what}")

    async def sql(self, query: str, **parameters: Any) -> list[dict[str, Any]]:
        result = await self.call("POST", "/monitor/v1/query", json={"sql": query, "parameters": parameters})
        return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]

    async def step(self, step: Step, body: Callable[[Step], Awaitable[None]]) -> bool:
        task = self.progress.add_task(f"step {step.number}: {step.title}", total=None)
        started = time.monotonic()
        self._task = task
        try:
            await body(step)
            step.status = PASSED
        except StepFailed as error:
            step.status, step.reason = FAILED, str(error)
        except Exception as error:  # noqa: BLE001 - the report names what broke; later steps are "not reached"
            step.status, step.reason = FAILED, f"{type(error).__name__}: {error}"
        step.seconds = time.monotonic() - started
        self.progress.update(task, description=f"step {step.number}: {step.title} - {step.status}" + (f" ({step.reason[:120]})" if step.reason else ""), completed=1, total=1)
        return step.status == PASSED

    def say(self, text: str) -> None:
        self.progress.update(self._task, description=text)

    async def run(self, *, traffic: int) -> None:
        titles = [
            "register the base model, prompt v1 and datasets v1",
            "request training -> adapter v1 registered",
            "evaluator gate vs the base model -> staging -> production (approval audited)",
            "serving loads v1; traffic through the gateway -> inference.logged -> ClickHouse",
            "feedback (ratings, corrections) -> ClickHouse",
            "monitor alert -> training.requested with a dataset from the corrections",
            "adapter v2 trained and gated vs v1; canary, then full; rollback in one command",
        ]
        steps = [self.report.step(number, title) for number, title in enumerate(titles, start=1)]
        bodies = [self.register, self.train_v1, self.promote_v1, lambda step: self.serve(step, traffic), self.give_feedback, self.await_retraining, self.v2]
        try:
            for step, body in zip(steps, bodies, strict=True):
                if not await self.step(step, body):
                    break
            await self.final_state()
        finally:
            await self.http.aclose()

    # ------------------------------------------------------------------ step 1

    async def register(self, step: Step) -> None:
        model = await self.call("GET", f"/registry/v1/models/{MODEL}")
        step.lines.append(f"base model {model['name']}: {model['architecture']}, {model['parameter_count']:,} parameters, sha256 {model['artifact_sha256'][:12]}")
        prompts = (await self.call("GET", "/registry/v1/prompts", params={"name": "acme-support"}))["items"]
        template = "You are Acme Nimbus hub support. Answer {{ customer }}'s question in one sentence."
        if prompts:
            step.reused = True
            step.lines.append(f"prompt acme-support v{prompts[-1]['version']} (exists)")
        else:
            operator = await self.as_principal("demo-operator", "operator")
            prompt = await self.call("POST", "/registry/v1/prompts", json={"name": "acme-support", "template": template, "model_name": MODEL}, headers=operator)
            await self.approve("prompts", "acme-support", prompt["version"], "first prompt of the demo")
            await self.call("PUT", "/registry/v1/prompts/acme-support/labels/production", json={"version": prompt["version"]}, headers=operator)
            step.lines.append(f"prompt acme-support v{prompt['version']} published, approved by demo-approver, label production")
        facts = set(self.facts[:FACTS_V1])
        self.train_v1_ref = await self.dataset(step, "acme-train", "train", [row for row in self.train if _answer(row) in facts])
        self.golden_v1_ref = await self.dataset(step, "acme-golden", "golden", [row for row in self.golden if _answer(row) in facts])

    async def dataset(self, step: Step, name: str, split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The newest version of `name` when it holds these rows already, else a new version."""
        jsonl = _jsonl(rows)
        digest = hashlib.sha256(jsonl.encode()).hexdigest()
        versions = (await self.call("GET", "/registry/v1/datasets", params={"name": name, "limit": 500}))["items"]
        same = [version for version in versions if version["sha256"] == digest]
        if same:
            step.reused = True
            step.lines.append(f"dataset {name} v{same[-1]['version']} ({split}, {same[-1]['row_count']} rows, exists)")
            return {"name": name, "version": same[-1]["version"]}
        created = await self.call("POST", "/registry/v1/datasets", json={"name": name, "split": split, "jsonl": jsonl, "model_name": MODEL})
        step.lines.append(f"dataset {name} v{created['version']} published ({split}, {created['row_count']} rows)")
        return {"name": name, "version": created["version"]}

    # ------------------------------------------------------------------ step 2

    async def train_and_register(self, step: Step, job_id: str, label: str) -> dict[str, Any]:
        """Follow a training job through the trainer's door, then find its adapter in the registry."""

        async def job() -> dict[str, Any] | None:
            view = await self.call("GET", f"/trainer/v1/training-jobs/{job_id}", expect=(200, 404))
            if not view or "status" not in view:
                return None
            self.say(f"step {step.number}: training {label} ({job_id}) {view['status']} step {view['step']}/{view['total_steps']} loss {view.get('loss')}")
            if view["status"] in ("failed", "cancelled"):
                raise StepFailed(f"training job {job_id} {view['status']}: {view.get('error')}")
            return view if view["status"] == "completed" else None

        done = await self.until(f"training job {job_id}", job, interval=3.0)

        async def adapter() -> dict[str, Any] | None:
            items = (await self.call("GET", "/registry/v1/adapters", params={"model_name": MODEL, "limit": 500}))["items"]
            return next((item for item in items if item["training_job_id"] == job_id), None)

        registered = await self.until(f"the adapter of job {job_id} in the registry (training.completed -> adapter.registered)", adapter)
        self.report.training[registered["version"]] = {"job_id": job_id, "steps": done["total_steps"], "final_loss": done.get("loss"), "dataset": f"{registered['dataset_name']}:v{registered['dataset_version']}"}
        step.lines.append(f"job {job_id}: {done['total_steps']} steps, final loss {done.get('loss')}; adapter v{registered['version']} registered (stage {registered['stage']})")
        return registered

    async def train_v1(self, step: Step) -> None:
        hyperparameters = {"rank": 16, "alpha": 32, "learning_rate": 1e-3, "epochs": 2, "batch_size": 8, "max_seq_length": 256, "seed": 0, "target_modules": TARGET_MODULES}
        key = hashlib.sha256(json.dumps([self.train_v1_ref, hyperparameters], sort_keys=True).encode()).hexdigest()[:12]
        job_id = f"demo-v1-{key}"
        view = await self.call("POST", "/trainer/v1/training-jobs", json={"model_name": MODEL, "dataset": self.train_v1_ref, "hyperparameters": hyperparameters, "job_id": job_id})
        step.reused = view["status"] == "completed"
        step.lines.append(f"training requested: {self.train_v1_ref['name']}:v{self.train_v1_ref['version']}, LoRA r16 on 7 projections, lr 1e-3, 2 epochs (the demo's reduced recipe)")
        self.v1 = await self.train_and_register(step, job_id, "adapter v1")

    # ------------------------------------------------------------------ step 3

    async def gate(self, step: Step, version: int) -> dict[str, Any]:
        """The evaluator runs on adapter.registered; its verdict reaches the registry on evaluation.completed."""

        async def evaluated() -> dict[str, Any] | None:
            self.say(f"step {step.number}: waiting for the evaluator's verdict on adapter v{version}")
            lineage = await self.call("GET", f"/registry/v1/adapters/{MODEL}/versions/{version}/lineage")
            return lineage["evaluations"][-1] if lineage["evaluations"] else None

        verdict = await self.until(f"an evaluation of adapter v{version} (adapter.registered -> evaluation.completed)", evaluated, interval=5.0)
        status = await self.call("GET", f"/evaluator/v1/evaluations/{verdict['evaluation_id']}", expect=(200, 404))
        result = (status or {}).get("result") or {}
        baseline = result.get("baseline") or {}
        report_path = Path(self.report.home) / "reports" / f"evaluation-{verdict['evaluation_id']}.html"
        self.report.evaluations.append(Evaluation(
            adapter_version=version, evaluation_id=verdict["evaluation_id"],
            baseline=f"adapter v{baseline['adapter_version']}" if baseline.get("adapter_version") else "the base model",
            golden=f"{verdict['golden_name']}:v{verdict['golden_version']}", passed=verdict["passed"], gate_policy=verdict["gate_policy"],
            reasons=list(verdict["reasons"]), metrics=result.get("metrics", []), report_path=str(report_path) if report_path.exists() else None,
        ))
        step.lines.append(f"evaluation {verdict['evaluation_id']} ({verdict['gate_policy']} on {verdict['golden_name']}:v{verdict['golden_version']}): {'PASS' if verdict['passed'] else 'FAIL'}")
        return verdict

    async def transition(self, version: int, **body: Any) -> dict[str, Any]:
        """demo-operator moves a version; entering production needs demo-approver's approval first."""
        headers = await self.as_principal("demo-operator", "operator")
        return await self.call("POST", f"/registry/v1/adapters/{MODEL}/versions/{version}/transitions", json=body, headers=headers)

    async def promote_v1(self, step: Step) -> None:
        version = self.v1["version"]
        current = await self.call("GET", f"/registry/v1/adapters/{MODEL}/versions/{version}")
        if current["stage"] != "none":
            step.reused = True
            step.lines.append(f"adapter v{version} is already {current['stage']} (an earlier run promoted it)")
            await self.gate(step, version)
            return
        verdict = await self.gate(step, version)
        if not verdict["passed"]:
            raise StepFailed(f"adapter v{version} did not pass the gate against the base model: {'; '.join(verdict['reasons'])}")
        await self.transition(version, to_stage="staging", reason="passed the gate against the base model")
        production = await self.production()
        body: dict[str, Any] = {"to_stage": "production", "reason": "first adapter: beats the base model on the golden set"}
        if production:
            body["replaces"] = production["version"]
        await self.approve("adapters", MODEL, version, "passed the gate against the base model")
        await self.transition(version, **body)
        step.lines.append(f"adapter v{version}: none -> staging -> production, approved by demo-approver")
        await self.audit(step, version)

    async def audit(self, step: Step, version: int) -> None:
        entries = (await self.call("GET", "/registry/v1/audit", params={"object_type": "adapter", "object_id": f"{MODEL}:v{version}"}))["items"]
        approvals = [entry for entry in entries if entry["outcome"] == "ok" and "production" in entry["action"]]
        if not approvals:
            raise StepFailed(f"no approved promotion of {MODEL}:v{version} in the audit log (entries: {[entry['action'] for entry in entries]})")
        for entry in approvals[-1:]:
            line = f"{entry['at']} {entry['actor']} {entry['action']} {entry['object_id']} approver {(entry.get('after') or {}).get('approver', '?')}"
            self.report.audit.append(line)
            step.lines.append(f"audit: {line}")

    async def production(self) -> dict[str, Any] | None:
        items = (await self.call("GET", "/registry/v1/adapters", params={"model_name": MODEL, "stage": "production"}))["items"]
        full = [item for item in items if not item.get("canary_percent")]
        return full[0] if full else None

    # ------------------------------------------------------------------ step 4

    async def openai(self) -> Any:
        from openai import AsyncOpenAI

        if self.app_key is None:
            created = await self.call("POST", "/registry/v1/keys", json={"principal": "demo-app", "role": "app"})
            self.app_key = created["key"]
        # Retries as an app's client would: a 503 while serving's supervisor restarts a crashed
        # tritonserver is retried after its Retry-After. The errors still count: step 4 reports them.
        return AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.app_key, max_retries=3, timeout=300)

    async def ask(self, client: Any, rows: list[dict[str, Any]], phase: str, *, user_prefix: str = "customer") -> list[dict[str, Any]]:
        """Send each row's question as an app would; record which version answered."""
        limit = asyncio.Semaphore(8)
        answers: list[dict[str, Any]] = []

        async def one(index: int, row: dict[str, Any]) -> None:
            async with limit:
                completion = await client.chat.completions.create(
                    model=MODEL, messages=[message for message in row["messages"] if message["role"] != "assistant"],
                    max_tokens=40, temperature=0, user=f"{user_prefix}-{index}",
                )
            answers.append({"id": completion.id, "served_by": completion.model, "answer": completion.choices[0].message.content or "", "reference": _answer(row), "row": row})
            self.say(f"{phase}: {len(answers)}/{len(rows)} answered")

        await asyncio.gather(*(one(index, row) for index, row in enumerate(rows)))
        self.report.traffic[phase] = dict(Counter(answer["served_by"] for answer in answers))
        return answers

    async def serve(self, step: Step, per_fact: int) -> None:
        since = datetime.now(UTC)
        client = await self.openai()
        expected = f"{MODEL}:v{(await self.production() or {}).get('version')}"

        async def loaded() -> bool:
            self.say(f"step 4: waiting for serving to load {expected} (stage.changed)")
            return await self.answers_as(client, MODEL, expected)

        await self.until(f"serving to answer {MODEL} with {expected}", loaded)
        facts = self.facts[:FACTS_TRAFFIC]
        by_fact: dict[str, list[dict[str, Any]]] = {fact: [] for fact in facts}
        for row in self.train:
            if _answer(row) in by_fact and len(by_fact[_answer(row)]) < per_fact:
                by_fact[_answer(row)].append(row)
        rows = [row for fact in facts for row in by_fact[fact]]
        self.answers = await self.ask(client, rows, "step 4: production")
        wrong = [answer for answer in self.answers if answer["served_by"] != expected]
        if wrong:
            raise StepFailed(f"{len(wrong)} of {len(self.answers)} requests were served by {sorted({a['served_by'] for a in wrong})}, not {expected}")
        step.lines.append(f"{len(self.answers)} chat completions through the gateway (openai client), all served by {expected}")
        ids = [answer["id"] for answer in self.answers]

        async def stored() -> list[dict[str, Any]] | None:
            rows = await self.sql("SELECT count() AS rows, uniqExact(event_id) AS events, countIf(adapter_version = {v:UInt32}) AS on_version FROM inference_log WHERE inference_id IN {ids:Array(String)}", ids=ids, v=int(expected.rsplit(":v", 1)[1]))
            self.say(f"step 4: {rows[0]['events']}/{len(ids)} inferences in ClickHouse")
            return rows if int(rows[0]["events"]) >= len(ids) else None

        counts = (await self.until("every inference.logged in ClickHouse", stored, timeout=600))[0]
        errored = (await self.sql(
            # By the app's principal: user ids are stored hashed (FLYWHEEL_PRIVACY_USER_POLICY), not as the demo sent them.
            "SELECT count() AS n FROM inference_log WHERE principal = 'demo-app' AND status != 'ok' AND occurred_at >= parseDateTime64BestEffort({since:String}, 3)",
            since=since.isoformat(),
        ))[0]["n"]
        self.report.stored_inferences = {"inferences": int(counts["events"]), "rows (no FINAL)": int(counts["rows"]), "on production version": int(counts["on_version"]), "errored, retried by the client": int(errored)}
        step.lines.append(f"inference_log: {counts['events']} events, {counts['rows']} rows read without FINAL (duplicates: {int(counts['rows']) - int(counts['events'])}); errored answers the client retried: {errored}")

    # ------------------------------------------------------------------ step 5

    async def give_feedback(self, step: Step) -> None:
        """Reviewers rate every answer; a wrong one gets thumbs down and the right answer as a correction."""
        counts: Counter[str] = Counter()
        # A reviewer's key: the feedback door refuses `source: reviewer` from an app key.
        reviewer_key = (await self.call("POST", "/registry/v1/keys", json={"principal": "demo-reviewer", "role": "reviewer"}))["key"]
        for answer in self.answers:
            right = _numbers(answer["reference"]) <= _numbers(answer["answer"]) and bool(_numbers(answer["reference"]))
            body: dict[str, Any] = {"inference_id": answer["id"], "source": "reviewer", "actor": "demo-reviewer"}
            if right:
                body.update(thumbs="up", rating=5)
            else:
                body.update(thumbs="down", rating=1, correction=answer["reference"], tags=["wrong-fact"], comment="the facts do not match the Acme Nimbus manual")
            await self.call("POST", "/feedback/v1/feedback", json=body, headers={"Authorization": f"Bearer {reviewer_key}"})
            counts["thumbs up" if right else "thumbs down + correction"] += 1
        self.report.feedback = dict(counts)
        step.lines.append(f"{len(self.answers)} reviews sent: " + ", ".join(f"{count} {kind}" for kind, count in counts.items()))
        ids = [answer["id"] for answer in self.answers]

        async def stored() -> list[dict[str, Any]] | None:
            rows = await self.sql(
                # Read from the table without FINAL, so a duplicate would show as rows > events; the view
                # (which reads FINAL) tells how many joined their inference.
                "SELECT count() AS rows, uniqExact(event_id) AS events, countIf(correction != '') AS corrections, "
                "(SELECT countIf(inference_stored) FROM feedback_with_inference WHERE inference_id IN {ids:Array(String)}) AS joined "
                "FROM feedback WHERE inference_id IN {ids:Array(String)}", ids=ids)
            self.say(f"step 5: {rows[0]['events']}/{len(ids)} feedback rows in ClickHouse")
            return rows if int(rows[0]["events"]) >= len(ids) else None

        counts_stored = (await self.until("every feedback.received in ClickHouse", stored, timeout=600))[0]
        self.report.feedback["stored"] = int(counts_stored["events"])
        self.report.feedback["corrections stored"] = int(counts_stored["corrections"])
        step.lines.append(f"feedback in ClickHouse: {counts_stored['events']} events, {counts_stored['corrections']} with corrections, {counts_stored['joined']} joined to their inference")
        # The golden set grows with held-out paraphrases of what users asked about, so the next gate
        # judges the facts the corrections teach as well as the old ones.
        facts = set(self.facts[:FACTS_TRAFFIC])
        self.golden_v2_ref = await self.dataset(step, "acme-golden", "golden", [row for row in self.golden if _answer(row) in facts])

    # ------------------------------------------------------------------ step 6

    async def await_retraining(self, step: Step) -> None:
        async def alert() -> dict[str, Any] | None:
            alerts = await self.call("GET", "/monitor/v1/alerts")
            self.say(f"step 6: waiting for the monitor's alert ({len(alerts)} alerts so far)")
            return next((item for item in alerts if item["model_name"] == MODEL and item["rule_name"] == "demo-thumbs-down-rate"), None)

        fired = await self.until("alert.raised from rule demo-thumbs-down-rate", alert, interval=3.0, timeout=300)
        self.report.alert = {key: fired.get(key) for key in ("alert_id", "rule_name", "metric", "value", "threshold", "state", "adapter_version")}
        step.lines.append(f"alert {fired['alert_id']}: {fired['rule_name']} {fired['metric']} = {float(fired['value']):.3f} > {fired['threshold']} (adapter v{fired.get('adapter_version')})")
        job_id = f"retrain-{fired['alert_id']}"

        async def job() -> dict[str, Any] | None:
            jobs = await self.call("GET", "/trainer/v1/training-jobs", params={"limit": 1000})
            mine = next((item for item in jobs if item["job_id"] == job_id), None)
            if mine is None:
                # A second run: the model was retrained by an earlier alert and is in its cooldown.
                mine = next((item for item in jobs if item["job_id"].startswith("retrain-")), None)
            return mine

        retraining = await self.until(f"training.requested from the monitor (job {job_id}; it needs {MIN_CORRECTIONS} corrections and no retraining of the model in its cooldown)", job, timeout=300)
        dataset = retraining["dataset"]
        rows = await self.call("GET", f"/registry/v1/datasets/{dataset['name']}/versions/{dataset['version']}")
        if rows["provenance"] != "feedback":
            raise StepFailed(f"the retraining dataset {dataset['name']}:v{dataset['version']} has provenance {rows['provenance']}, not feedback")
        step.reused = retraining["job_id"] != job_id
        self.retrain_job = retraining["job_id"]
        self.report.retraining = {"job": retraining["job_id"], "dataset": f"{dataset['name']}:v{dataset['version']}", "records": rows["row_count"], "provenance": rows["provenance"]}
        step.lines.append(f"training.requested {retraining['job_id']} on {dataset['name']}:v{dataset['version']} ({rows['row_count']} records: production's training data + the corrections x{CORRECTION_REPEATS}, provenance feedback)")

    # ------------------------------------------------------------------ step 7

    async def v2(self, step: Step) -> None:
        v2 = await self.train_and_register(step, self.retrain_job, "adapter v2 (retraining)")
        version, v1 = v2["version"], self.v1["version"]
        if v2["stage"] != "none":
            step.reused = True
            step.lines.append(f"adapter v{version} is already {v2['stage']} (an earlier run decided it)")
            return
        verdict = await self.gate(step, version)
        if not verdict["passed"]:
            step.lines.append(f"adapter v{version} is not promoted: it did not beat v{v1} on the golden set")
            raise StepFailed(f"the gate kept adapter v{version} out of production (it did not beat v{v1}): {'; '.join(verdict['reasons'])}")
        client = await self.openai()
        await self.transition(version, to_stage="staging", reason="beat production on the golden set")
        await self.approve("adapters", MODEL, version, "beat production on the golden set")
        await self.transition(version, to_stage="production", canary_percent=50, reason="canary: half of production traffic")
        canary_model = f"{MODEL}:v{version}"

        async def loaded() -> bool:
            return await self.answers_as(client, canary_model, canary_model)

        await self.until(f"serving to load {canary_model}", loaded)
        rows = [row for row in self.golden if _answer(row) in set(self.facts[:FACTS_TRAFFIC])]
        canary = await self.ask(client, rows, "step 7: canary 50%", user_prefix="canary-user")
        served = Counter(answer["served_by"] for answer in canary)
        step.lines.append(f"canary 50%: {dict(served)}")
        if not served.get(canary_model) or len(served) < 2:
            raise StepFailed(f"the canary split did not show: {dict(served)}")
        # Already in production as the canary: the approval that admitted it covers the full rollout.
        await self.transition(version, to_stage="production", replaces=v1, reason="canary healthy: full rollout")
        await self.audit(step, version)
        full = await self.until(f"all traffic on {canary_model}", lambda: self.all_served_by(client, rows[:8], canary_model, "step 7: full"))
        step.lines.append(f"full rollout: {len(full)} requests served by {canary_model}")
        # The rollback: an approval, then one command (flywheel registry transition MODEL 1 --to production --replaces 2).
        await self.approve("adapters", MODEL, v1, "rollback drill")
        await self.transition(v1, to_stage="production", replaces=version, reason="rollback drill")
        step.lines.append(f"rollback: demo-approver approves v{v1}, then `flywheel registry transition {MODEL} {v1} --to production --replaces {version}` (the same calls through the door)")
        back = await self.until(f"traffic back on v{v1}", lambda: self.all_served_by(client, rows[:8], f"{MODEL}:v{v1}", "step 7: after rollback"))
        step.lines.append(f"after rollback: {len(back)} requests served by {MODEL}:v{v1}")

    async def answers_as(self, client: Any, model: str, expected: str) -> bool:
        """Whether a one-token request for `model` is answered by `expected` (an adapter not loaded yet is a 404)."""
        import openai

        try:
            completion = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1, temperature=0)
        except (openai.NotFoundError, openai.APIStatusError, openai.APIConnectionError):
            return False
        return completion.model == expected

    async def all_served_by(self, client: Any, rows: list[dict[str, Any]], model: str, phase: str) -> list[dict[str, Any]] | None:
        answers = await self.ask(client, rows, phase, user_prefix=phase.replace(" ", "-"))
        return answers if all(answer["served_by"] == model for answer in answers) else None

    async def final_state(self) -> None:
        with contextlib.suppress(Exception):
            production = await self.production()
            self.report.production = f"{MODEL}:v{production['version']}" if production else f"{MODEL} (base model, no adapter in production)"
