"""The seven steps of the loop (ARCHITECTURE.md, "The loop"), acted out through the platform's doors:
what the operators, the approver, the app and the reviewers do in each, and what each waits to see."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from rich.progress import Progress

from services.demo.doors import Doors, StepFailed
from services.demo.recipe import (
    CORRECTION_REPEATS,
    FACTS_TRAFFIC,
    FACTS_V1,
    MIN_CORRECTIONS,
    MODEL,
    TARGET_MODULES,
    numbers_in,
    records,
    reference_of,
)
from services.demo.report import LoopReport, Step


class Driver(Doors):
    """Runs the steps in order; a step that fails ends the run, the later ones are reported not reached."""

    def __init__(
        self, base_url: str, admin_key: str, report: LoopReport, progress: Progress, *, step_timeout: float
    ) -> None:
        super().__init__(base_url, admin_key, report, progress, step_timeout=step_timeout)
        self.golden = records("golden.jsonl")
        self.train = records("train.jsonl")
        self.facts = list(dict.fromkeys(reference_of(row) for row in self.golden))

    async def run(self, *, traffic: int, review: bool = False) -> None:
        titles = [
            "register the base model, prompt v1 and datasets v1",
            "request training -> adapter v1 registered",
            "evaluator gate vs the base model -> staging -> production (approval audited)",
            "serving loads v1; traffic through the gateway -> inference.logged -> ClickHouse",
            "feedback (ratings, corrections) -> ClickHouse"
            if not review
            else "feedback through a review queue (rubric, claims, ratings, corrections) -> ClickHouse",
            "monitor alert -> training.requested with a dataset from the corrections",
            "adapter v2 trained and gated vs v1; canary, then full; rollback in one command",
        ]
        steps = [self.report.step(number, title) for number, title in enumerate(titles, start=1)]
        bodies = [
            self.register,
            self.train_v1,
            self.promote_v1,
            lambda step: self.serve(step, traffic),
            self.review_queue if review else self.give_feedback,
            self.await_retraining,
            self.v2,
        ]
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
        step.lines.append(
            f"base model {model['name']}: {model['architecture']}, {model['parameter_count']:,} parameters, sha256 {model['artifact_sha256'][:12]}"
        )
        prompts = (await self.call("GET", "/registry/v1/prompts", params={"name": "acme-support"}))["items"]
        template = "You are Acme Nimbus hub support. Answer {{ customer }}'s question in one sentence."
        if prompts:
            step.reused = True
            step.lines.append(f"prompt acme-support v{prompts[-1]['version']} (exists)")
        else:
            operator = await self.as_principal("demo-operator", "operator")
            prompt = await self.call(
                "POST",
                "/registry/v1/prompts",
                json={"name": "acme-support", "template": template, "model_name": MODEL},
                headers=operator,
            )
            await self.approve("prompts", "acme-support", prompt["version"], "first prompt of the demo")
            await self.call(
                "PUT",
                "/registry/v1/prompts/acme-support/labels/production",
                json={"version": prompt["version"]},
                headers=operator,
            )
            step.lines.append(
                f"prompt acme-support v{prompt['version']} published, approved by demo-approver, label production"
            )
        facts = set(self.facts[:FACTS_V1])
        self.train_v1_ref = await self.dataset(
            step, "acme-train", "train", [row for row in self.train if reference_of(row) in facts]
        )
        self.golden_v1_ref = await self.dataset(
            step, "acme-golden", "golden", [row for row in self.golden if reference_of(row) in facts]
        )

    # ------------------------------------------------------------------ step 2

    async def train_v1(self, step: Step) -> None:
        hyperparameters = {
            "rank": 16,
            "alpha": 32,
            "learning_rate": 1e-3,
            "epochs": 2,
            "batch_size": 8,
            "max_seq_length": 256,
            "seed": 0,
            "target_modules": TARGET_MODULES,
        }
        key = hashlib.sha256(json.dumps([self.train_v1_ref, hyperparameters], sort_keys=True).encode()).hexdigest()[:12]
        job_id = f"demo-v1-{key}"
        view = await self.call(
            "POST",
            "/trainer/v1/training-jobs",
            json={
                "model_name": MODEL,
                "dataset": self.train_v1_ref,
                "hyperparameters": hyperparameters,
                "job_id": job_id,
            },
        )
        step.reused = view["status"] == "completed"
        step.lines.append(
            f"training requested: {self.train_v1_ref['name']}:v{self.train_v1_ref['version']}, LoRA r16 on 7 projections, lr 1e-3, 2 epochs (the demo's reduced recipe)"
        )
        self.v1 = await self.train_and_register(step, job_id, "adapter v1")

    # ------------------------------------------------------------------ step 3

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
            raise StepFailed(
                f"adapter v{version} did not pass the gate against the base model: {'; '.join(verdict['reasons'])}"
            )
        await self.transition(version, to_stage="staging", reason="passed the gate against the base model")
        production = await self.production()
        body: dict[str, Any] = {
            "to_stage": "production",
            "reason": "first adapter: beats the base model on the golden set",
        }
        if production:
            body["replaces"] = production["version"]
        await self.approve("adapters", MODEL, version, "passed the gate against the base model")
        await self.transition(version, **body)
        step.lines.append(f"adapter v{version}: none -> staging -> production, approved by demo-approver")
        await self.audit(step, version)

    # ------------------------------------------------------------------ step 4

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
            if reference_of(row) in by_fact and len(by_fact[reference_of(row)]) < per_fact:
                by_fact[reference_of(row)].append(row)
        rows = [row for fact in facts for row in by_fact[fact]]
        self.answers = await self.ask(client, rows, "step 4: production")
        wrong = [answer for answer in self.answers if answer["served_by"] != expected]
        if wrong:
            raise StepFailed(
                f"{len(wrong)} of {len(self.answers)} requests were served by {sorted({a['served_by'] for a in wrong})}, not {expected}"
            )
        step.lines.append(
            f"{len(self.answers)} chat completions through the gateway (openai client), all served by {expected}"
        )
        ids = [answer["id"] for answer in self.answers]

        async def stored() -> list[dict[str, Any]] | None:
            rows = await self.sql(
                "SELECT count() AS rows, uniqExact(event_id) AS events, countIf(adapter_version = {v:UInt32}) AS on_version FROM inference_log WHERE inference_id IN {ids:Array(String)}",
                ids=ids,
                v=int(expected.rsplit(":v", 1)[1]),
            )
            self.say(f"step 4: {rows[0]['events']}/{len(ids)} inferences in ClickHouse")
            return rows if int(rows[0]["events"]) >= len(ids) else None

        counts = (await self.until("every inference.logged in ClickHouse", stored, timeout=600))[0]
        errored = (
            await self.sql(
                # By the app's principal: user ids are stored hashed (FLYWHEEL_PRIVACY_USER_POLICY), not as the demo sent them.
                "SELECT count() AS n FROM inference_log WHERE principal = 'demo-app' AND status != 'ok' AND occurred_at >= parseDateTime64BestEffort({since:String}, 3)",
                since=since.isoformat(),
            )
        )[0]["n"]
        self.report.stored_inferences = {
            "inferences": int(counts["events"]),
            "rows (no FINAL)": int(counts["rows"]),
            "on production version": int(counts["on_version"]),
            "errored, retried by the client": int(errored),
        }
        step.lines.append(
            f"inference_log: {counts['events']} events, {counts['rows']} rows read without FINAL (duplicates: {int(counts['rows']) - int(counts['events'])}); errored answers the client retried: {errored}"
        )

    # ------------------------------------------------------------------ step 5

    async def give_feedback(self, step: Step, answers: list[dict[str, Any]] | None = None) -> None:
        """Reviewers rate every answer (those `answers` only, when given); a wrong one gets thumbs down and the
        right answer as a correction."""
        counts: Counter[str] = Counter()
        # A reviewer's key: the feedback door refuses `source: reviewer` from an app key.
        reviewer = await self.as_principal("demo-reviewer", "reviewer")
        for answer in self.answers if answers is None else answers:
            right = _right(answer)
            body: dict[str, Any] = {"inference_id": answer["id"], "source": "reviewer", "actor": "demo-reviewer"}
            if right:
                body.update(thumbs="up", rating=5)
            else:
                body.update(
                    thumbs="down",
                    rating=1,
                    correction=answer["reference"],
                    tags=["wrong-fact"],
                    comment="the facts do not match the Acme Nimbus manual",
                )
            await self.call("POST", "/feedback/v1/feedback", json=body, headers=reviewer)
            counts["thumbs up" if right else "thumbs down + correction"] += 1
        self.report.feedback.update(counts)
        if counts:
            step.lines.append(
                f"{sum(counts.values())} reviews sent: "
                + ", ".join(f"{count} {kind}" for kind, count in counts.items())
            )
        await self.feedback_stored(step)

    async def review_queue(self, step: Step) -> None:
        """The same judgements as give_feedback, through a review queue: an operator publishes a rubric and
        defines a queue on step 4's traffic, two reviewers claim its items (least grounded first) and score
        them; an answer the queue left out (its prompt already queued) gets the door's plain feedback."""
        operator = await self.as_principal("demo-operator", "operator")
        rubric = await self.call(
            "POST",
            "/registry/v1/rubrics",
            json={
                "name": "acme-answer",
                "instructions": "Compare the answer with the Acme Nimbus manual.",
                "dimensions": [
                    {"name": "correct", "description": "Does it state the manual's facts?", "scale": "thumbs"},
                    {"name": "helpful", "description": "How far does it answer the question?", "scale": "rating"},
                ],
            },
            headers=operator,
        )
        queue = await self.call(
            "POST",
            "/feedback/v1/review/queues",
            json={
                "name": "acme-review",
                "rule": {"select": "traffic", "model_name": MODEL, "window_hours": 2, "order": "uncertainty"},
                "rubric": "acme-answer",
                "rubric_version": rubric["version"],
            },
            headers=operator,
        )
        filled = await self.call("POST", "/feedback/v1/review/queues/acme-review/fill", headers=operator)
        step.lines.append(
            f"rubric acme-answer v{rubric['version']}; queue acme-review v{queue['version']}: {filled['added']} items "
            f"of {filled['considered']} calls ({filled['duplicate_prompts']} repeat a queued prompt)"
        )
        by_id = {answer["id"]: answer for answer in self.answers}
        reviewers = [await self.as_principal(name, "reviewer") for name in ("demo-reviewer", "demo-reviewer-2")]
        counts: Counter[str] = Counter()
        reviewed: set[str] = set()
        turn = empty = 0
        while empty < len(reviewers):  # until neither reviewer is given anything
            headers = reviewers[turn % len(reviewers)]
            turn += 1
            item = await self.call(
                "POST", "/feedback/v1/review/queues/acme-review/claim", expect=(200, 204), headers=headers
            )
            if item is None:
                empty += 1
                continue
            empty = 0
            answer = by_id.get(item["inference_id"])
            if answer is None:  # step 4's probe of which version serves, or an earlier run's call: passed on, said why
                await self.call(
                    "POST",
                    f"/feedback/v1/review/items/{item['item_id']}/skip",
                    expect=(204,),
                    json={"reason": "not one of step 4's answers"},
                    headers=headers,
                )
                counts["skipped (not one of step 4's answers)"] += 1
                continue
            right = _right(answer)
            body: dict[str, Any] = {"scores": {"correct": "up" if right else "down", "helpful": "5" if right else "1"}}
            if not right:
                body.update(correction=answer["reference"], comment="the facts do not match the Acme Nimbus manual")
            await self.call("POST", f"/feedback/v1/review/items/{item['item_id']}/submit", json=body, headers=headers)
            reviewed.add(answer["id"])
            counts["thumbs up" if right else "thumbs down + correction"] += 1
            self.say(f"step 5: {len(reviewed)} items reviewed in acme-review")
        self.report.feedback = {f"{kind} (queue)": count for kind, count in counts.items()}
        step.lines.append(
            f"{len(reviewed)} items reviewed by demo-reviewer and demo-reviewer-2: "
            + ", ".join(f"{count} {kind}" for kind, count in counts.items())
        )
        view = await self.call("GET", "/feedback/v1/review/queues/acme-review")
        step.lines.append(f"acme-review: {view['counts']}")
        await self.give_feedback(step, [answer for answer in self.answers if answer["id"] not in reviewed])

    async def feedback_stored(self, step: Step) -> None:
        ids = [answer["id"] for answer in self.answers]

        async def stored() -> list[dict[str, Any]] | None:
            rows = await self.sql(
                # Read from the table without FINAL, so a duplicate would show as rows > events; the view
                # (which reads FINAL) tells how many joined their inference.
                "SELECT count() AS rows, uniqExact(event_id) AS events, countIf(correction != '') AS corrections, "
                "(SELECT countIf(inference_stored) FROM feedback_with_inference WHERE inference_id IN {ids:Array(String)}) AS joined "
                "FROM feedback WHERE inference_id IN {ids:Array(String)}",
                ids=ids,
            )
            self.say(f"step 5: {rows[0]['events']}/{len(ids)} feedback rows in ClickHouse")
            return rows if int(rows[0]["events"]) >= len(ids) else None

        counts_stored = (await self.until("every answer's feedback in ClickHouse", stored, timeout=600))[0]
        self.report.feedback["stored"] = int(counts_stored["events"])
        self.report.feedback["corrections stored"] = int(counts_stored["corrections"])
        step.lines.append(
            f"feedback in ClickHouse: {counts_stored['events']} events, {counts_stored['corrections']} with corrections, {counts_stored['joined']} joined to their inference"
        )
        # The golden set grows with held-out paraphrases of what users asked about, so the next gate
        # judges the facts the corrections teach as well as the old ones.
        facts = set(self.facts[:FACTS_TRAFFIC])
        self.golden_v2_ref = await self.dataset(
            step, "acme-golden", "golden", [row for row in self.golden if reference_of(row) in facts]
        )

    # ------------------------------------------------------------------ step 6

    async def await_retraining(self, step: Step) -> None:
        async def alert() -> dict[str, Any] | None:
            alerts = await self.call("GET", "/monitor/v1/alerts")
            self.say(f"step 6: waiting for the monitor's alert ({len(alerts)} alerts so far)")
            return next(
                (
                    item
                    for item in alerts
                    if item["model_name"] == MODEL and item["rule_name"] == "demo-thumbs-down-rate"
                ),
                None,
            )

        fired = await self.until("alert.raised from rule demo-thumbs-down-rate", alert, interval=3.0, timeout=300)
        self.report.alert = {
            key: fired.get(key)
            for key in ("alert_id", "rule_name", "metric", "value", "threshold", "state", "adapter_version")
        }
        step.lines.append(
            f"alert {fired['alert_id']}: {fired['rule_name']} {fired['metric']} = {float(fired['value']):.3f} > {fired['threshold']} (adapter v{fired.get('adapter_version')})"
        )
        job_id = f"retrain-{fired['alert_id']}"

        async def job() -> dict[str, Any] | None:
            jobs = await self.call("GET", "/trainer/v1/training-jobs", params={"limit": 1000})
            mine = next((item for item in jobs if item["job_id"] == job_id), None)
            if mine is None:
                # A second run: the model was retrained by an earlier alert and is in its cooldown.
                mine = next((item for item in jobs if item["job_id"].startswith("retrain-")), None)
            return mine

        retraining = await self.until(
            f"training.requested from the monitor (job {job_id}; it needs {MIN_CORRECTIONS} corrections and no retraining of the model in its cooldown)",
            job,
            timeout=300,
        )
        dataset = retraining["dataset"]
        rows = await self.call("GET", f"/registry/v1/datasets/{dataset['name']}/versions/{dataset['version']}")
        if rows["provenance"] != "feedback":
            raise StepFailed(
                f"the retraining dataset {dataset['name']}:v{dataset['version']} has provenance {rows['provenance']}, not feedback"
            )
        step.reused = retraining["job_id"] != job_id
        self.retrain_job = retraining["job_id"]
        self.report.retraining = {
            "job": retraining["job_id"],
            "dataset": f"{dataset['name']}:v{dataset['version']}",
            "records": rows["row_count"],
            "provenance": rows["provenance"],
        }
        step.lines.append(
            f"training.requested {retraining['job_id']} on {dataset['name']}:v{dataset['version']} ({rows['row_count']} records: production's training data + the corrections x{CORRECTION_REPEATS}, provenance feedback)"
        )

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
            raise StepFailed(
                f"the gate kept adapter v{version} out of production (it did not beat v{v1}): {'; '.join(verdict['reasons'])}"
            )
        client = await self.openai()
        await self.transition(version, to_stage="staging", reason="beat production on the golden set")
        await self.approve("adapters", MODEL, version, "beat production on the golden set")
        await self.transition(
            version, to_stage="production", canary_percent=50, reason="canary: half of production traffic"
        )
        canary_model = f"{MODEL}:v{version}"

        async def loaded() -> bool:
            return await self.answers_as(client, canary_model, canary_model)

        await self.until(f"serving to load {canary_model}", loaded)
        rows = [row for row in self.golden if reference_of(row) in set(self.facts[:FACTS_TRAFFIC])]
        canary = await self.ask(client, rows, "step 7: canary 50%", user_prefix="canary-user")
        served = Counter(answer["served_by"] for answer in canary)
        step.lines.append(f"canary 50%: {dict(served)}")
        if not served.get(canary_model) or len(served) < 2:
            raise StepFailed(f"the canary split did not show: {dict(served)}")
        # Already in production as the canary: the approval that admitted it covers the full rollout.
        await self.transition(version, to_stage="production", replaces=v1, reason="canary healthy: full rollout")
        await self.audit(step, version)
        full = await self.until(
            f"all traffic on {canary_model}", lambda: self.all_served_by(client, rows[:8], canary_model, "step 7: full")
        )
        step.lines.append(f"full rollout: {len(full)} requests served by {canary_model}")
        # The rollback: an approval, then one command (flywheel registry transition MODEL 1 --to production --replaces 2).
        await self.approve("adapters", MODEL, v1, "rollback drill")
        await self.transition(v1, to_stage="production", replaces=version, reason="rollback drill")
        step.lines.append(
            f"rollback: demo-approver approves v{v1}, then `flywheel registry transition {MODEL} {v1} --to production --replaces {version}` (the same calls through the door)"
        )
        back = await self.until(
            f"traffic back on v{v1}",
            lambda: self.all_served_by(client, rows[:8], f"{MODEL}:v{v1}", "step 7: after rollback"),
        )
        step.lines.append(f"after rollback: {len(back)} requests served by {MODEL}:v{v1}")

    async def final_state(self) -> None:
        with contextlib.suppress(Exception):
            production = await self.production()
            self.report.production = (
                f"{MODEL}:v{production['version']}" if production else f"{MODEL} (base model, no adapter in production)"
            )


def _right(answer: dict[str, Any]) -> bool:
    """Whether an answer states its reference's facts (every number of the manual's answer)."""
    return numbers_in(answer["reference"]) <= numbers_in(answer["answer"]) and bool(numbers_in(answer["reference"]))
