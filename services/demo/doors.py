"""What the demo's people do through the platform's doors, whichever step they are in: call a door,
act as a principal of a role, approve, wait for the platform, query ClickHouse through the monitor's
query door, publish a dataset, follow a training job, read an evaluation's verdict, move a stage, read
the audit log, and call the gateway as an app does with the openai client."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.progress import Progress

from services.demo.recipe import MODEL, as_jsonl, reference_of
from services.demo.report import FAILED, PASSED, Evaluation, LoopReport, Step


class StepFailed(Exception):
    """The platform could not complete a step; the message says what was missing."""


class Doors:
    """The platform's doors as the demo's operators, approver, app and reviewers use them.

    The admin key only hands out keys: an operator (demo-operator) asks for every promotion and an
    approver (demo-approver), another principal, approves each production promotion beforehand.
    """

    def __init__(
        self, base_url: str, admin_key: str, report: LoopReport, progress: Progress, *, step_timeout: float
    ) -> None:
        import httpx

        self.base_url = base_url
        self.report = report
        self.progress = progress
        self.timeout = step_timeout
        self.http = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
        self.app_key: str | None = None
        self.role_keys: dict[str, str] = {}

    # ------------------------------------------------------------------ plumbing

    async def call(self, method: str, path: str, expect: tuple[int, ...] = (200, 201, 202), **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code not in expect:
            raise StepFailed(f"{method} {path} answered {response.status_code}: {response.text[:400]}")
        return response.json() if response.content else None

    async def as_principal(self, principal: str, role: str) -> dict[str, str]:
        """Headers acting as `principal` with `role`, its key created by the admin once per run."""
        if principal not in self.role_keys:
            self.role_keys[principal] = (
                await self.call("POST", "/registry/v1/keys", json={"principal": principal, "role": role})
            )["key"]
        return {"Authorization": f"Bearer {self.role_keys[principal]}"}

    async def approve(self, kind: str, name: str, version: int, comment: str) -> None:
        """demo-approver approves a production promotion the operator then performs."""
        headers = await self.as_principal("demo-approver", "approver")
        await self.call(
            "POST",
            f"/registry/v1/{kind}/{name}/versions/{version}/approvals",
            json={"comment": comment},
            headers=headers,
        )

    async def until(
        self, what: str, probe: Callable[[], Awaitable[Any]], interval: float = 2.0, timeout: float | None = None
    ) -> Any:
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
        self.progress.update(
            task,
            description=f"step {step.number}: {step.title} - {step.status}"
            + (f" ({step.reason[:120]})" if step.reason else ""),
            completed=1,
            total=1,
        )
        return step.status == PASSED

    def say(self, text: str) -> None:
        self.progress.update(self._task, description=text)

    # ------------------------------------------------------------------ registry, trainer, evaluator

    async def dataset(self, step: Step, name: str, split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The newest version of `name` when it holds these rows already, else a new version."""
        jsonl = as_jsonl(rows)
        digest = hashlib.sha256(jsonl.encode()).hexdigest()
        versions = (await self.call("GET", "/registry/v1/datasets", params={"name": name, "limit": 500}))["items"]
        same = [version for version in versions if version["sha256"] == digest]
        if same:
            step.reused = True
            step.lines.append(f"dataset {name} v{same[-1]['version']} ({split}, {same[-1]['row_count']} rows, exists)")
            return {"name": name, "version": same[-1]["version"]}
        created = await self.call(
            "POST", "/registry/v1/datasets", json={"name": name, "split": split, "jsonl": jsonl, "model_name": MODEL}
        )
        step.lines.append(f"dataset {name} v{created['version']} published ({split}, {created['row_count']} rows)")
        return {"name": name, "version": created["version"]}

    async def train_and_register(self, step: Step, job_id: str, label: str) -> dict[str, Any]:
        """Follow a training job through the trainer's door, then find its adapter in the registry."""

        async def job() -> dict[str, Any] | None:
            view = await self.call("GET", f"/trainer/v1/training-jobs/{job_id}", expect=(200, 404))
            if not view or "status" not in view:
                return None
            self.say(
                f"step {step.number}: training {label} ({job_id}) {view['status']} step {view['step']}/{view['total_steps']} loss {view.get('loss')}"
            )
            if view["status"] in ("failed", "cancelled"):
                raise StepFailed(f"training job {job_id} {view['status']}: {view.get('error')}")
            return view if view["status"] == "completed" else None

        done = await self.until(f"training job {job_id}", job, interval=3.0)

        async def adapter() -> dict[str, Any] | None:
            items = (await self.call("GET", "/registry/v1/adapters", params={"model_name": MODEL, "limit": 500}))[
                "items"
            ]
            return next((item for item in items if item["training_job_id"] == job_id), None)

        registered = await self.until(
            f"the adapter of job {job_id} in the registry (training.completed -> adapter.registered)", adapter
        )
        self.report.training[registered["version"]] = {
            "job_id": job_id,
            "steps": done["total_steps"],
            "final_loss": done.get("loss"),
            "dataset": f"{registered['dataset_name']}:v{registered['dataset_version']}",
        }
        step.lines.append(
            f"job {job_id}: {done['total_steps']} steps, final loss {done.get('loss')}; adapter v{registered['version']} registered (stage {registered['stage']})"
        )
        return registered

    async def gate(self, step: Step, version: int) -> dict[str, Any]:
        """The evaluator runs on adapter.registered; its verdict reaches the registry on evaluation.completed."""

        async def evaluated() -> dict[str, Any] | None:
            self.say(f"step {step.number}: waiting for the evaluator's verdict on adapter v{version}")
            lineage = await self.call("GET", f"/registry/v1/adapters/{MODEL}/versions/{version}/lineage")
            return lineage["evaluations"][-1] if lineage["evaluations"] else None

        verdict = await self.until(
            f"an evaluation of adapter v{version} (adapter.registered -> evaluation.completed)", evaluated, interval=5.0
        )
        status = await self.call("GET", f"/evaluator/v1/evaluations/{verdict['evaluation_id']}", expect=(200, 404))
        result = (status or {}).get("result") or {}
        baseline = result.get("baseline") or {}
        report_path = Path(self.report.home) / "reports" / f"evaluation-{verdict['evaluation_id']}.html"
        self.report.evaluations.append(
            Evaluation(
                adapter_version=version,
                evaluation_id=verdict["evaluation_id"],
                baseline=f"adapter v{baseline['adapter_version']}"
                if baseline.get("adapter_version")
                else "the base model",
                golden=f"{verdict['golden_name']}:v{verdict['golden_version']}",
                passed=verdict["passed"],
                gate_policy=verdict["gate_policy"],
                reasons=list(verdict["reasons"]),
                metrics=result.get("metrics", []),
                report_path=str(report_path) if report_path.exists() else None,
            )
        )
        step.lines.append(
            f"evaluation {verdict['evaluation_id']} ({verdict['gate_policy']} on {verdict['golden_name']}:v{verdict['golden_version']}): {'PASS' if verdict['passed'] else 'FAIL'}"
        )
        return verdict

    async def transition(self, version: int, **body: Any) -> dict[str, Any]:
        """demo-operator moves a version; entering production needs demo-approver's approval first."""
        headers = await self.as_principal("demo-operator", "operator")
        return await self.call(
            "POST", f"/registry/v1/adapters/{MODEL}/versions/{version}/transitions", json=body, headers=headers
        )

    async def audit(self, step: Step, version: int) -> None:
        entries = (
            await self.call(
                "GET", "/registry/v1/audit", params={"object_type": "adapter", "object_id": f"{MODEL}:v{version}"}
            )
        )["items"]
        approvals = [entry for entry in entries if entry["outcome"] == "ok" and "production" in entry["action"]]
        if not approvals:
            raise StepFailed(
                f"no approved promotion of {MODEL}:v{version} in the audit log (entries: {[entry['action'] for entry in entries]})"
            )
        for entry in approvals[-1:]:
            line = f"{entry['at']} {entry['actor']} {entry['action']} {entry['object_id']} approver {(entry.get('after') or {}).get('approver', '?')}"
            self.report.audit.append(line)
            step.lines.append(f"audit: {line}")

    async def production(self) -> dict[str, Any] | None:
        items = (await self.call("GET", "/registry/v1/adapters", params={"model_name": MODEL, "stage": "production"}))[
            "items"
        ]
        full = [item for item in items if not item.get("canary_percent")]
        return full[0] if full else None

    # ------------------------------------------------------------------ the gateway, as an app

    async def openai(self) -> Any:
        from openai import AsyncOpenAI

        if self.app_key is None:
            created = await self.call("POST", "/registry/v1/keys", json={"principal": "demo-app", "role": "app"})
            self.app_key = created["key"]
        # Retries as an app's client would: a 503 while serving's supervisor restarts a crashed
        # tritonserver is retried after its Retry-After. The errors still count: step 4 reports them.
        return AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.app_key, max_retries=3, timeout=300)

    async def ask(
        self, client: Any, rows: list[dict[str, Any]], phase: str, *, user_prefix: str = "customer"
    ) -> list[dict[str, Any]]:
        """Send each row's question as an app would; record which version answered."""
        limit = asyncio.Semaphore(8)
        answers: list[dict[str, Any]] = []

        async def one(index: int, row: dict[str, Any]) -> None:
            async with limit:
                completion = await client.chat.completions.create(
                    model=MODEL,
                    messages=[message for message in row["messages"] if message["role"] != "assistant"],
                    max_tokens=40,
                    temperature=0,
                    user=f"{user_prefix}-{index}",
                )
            answers.append(
                {
                    "id": completion.id,
                    "served_by": completion.model,
                    "answer": completion.choices[0].message.content or "",
                    "reference": reference_of(row),
                    "row": row,
                }
            )
            self.say(f"{phase}: {len(answers)}/{len(rows)} answered")

        await asyncio.gather(*(one(index, row) for index, row in enumerate(rows)))
        self.report.traffic[phase] = dict(Counter(answer["served_by"] for answer in answers))
        return answers

    async def answers_as(self, client: Any, model: str, expected: str) -> bool:
        """Whether a one-token request for `model` is answered by `expected` (an adapter not loaded yet is a 404)."""
        import openai

        try:
            completion = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1, temperature=0
            )
        except (openai.NotFoundError, openai.APIStatusError, openai.APIConnectionError):
            return False
        return completion.model == expected

    async def all_served_by(
        self, client: Any, rows: list[dict[str, Any]], model: str, phase: str
    ) -> list[dict[str, Any]] | None:
        answers = await self.ask(client, rows, phase, user_prefix=phase.replace(" ", "-"))
        return answers if all(answer["served_by"] == model for answer in answers) else None
