"""The monitor's use cases: evaluate rules over windows, keep alerts (dedup, cooldown, states), close the loop into retraining."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from contracts.envelope import Envelope, wrap
from contracts.events import AlertRaised, AlertState, DatasetRef, Hyperparameters, Stage, StageChanged, TrainingRequested
from contracts.http import DatasetCreate, StageTransition
from services.monitor.canary import Arm, CanaryPolicy, Decision, judge
from services.monitor.rules import SCOPES, Rule
from services.monitor.store import MonitorStore
from services.runtime.scoring import Embedder, scan_unsafe, score_groundedness

log = logging.getLogger("flywheel.monitor")

METRIC_VALUE = Gauge("flywheel_monitor_metric_value", "Latest value of each rule's metric, per scope.", ["rule", "model_name", "adapter_version", "prompt_version"])
ALERTS_RAISED = Counter("flywheel_monitor_alerts_raised_total", "Alerts opened, by rule and severity.", ["rule", "severity"])
ALERTS_OPEN = Gauge("flywheel_monitor_alerts_open", "Alerts open or acknowledged now.")
RETRAININGS = Counter("flywheel_monitor_retrainings_total", "Retraining decisions, by outcome.", ["outcome"])
CANARY_DECISIONS = Counter("flywheel_monitor_canary_decisions_total", "Canary reviews, by action taken.", ["action"])

PSI_BINS = 10
PSI_EPSILON = 1e-4


@dataclass(frozen=True)
class Evaluation:
    """One rule over one scope at one tick: a value, or `no data` with why."""

    rule: Rule
    scope: dict[str, Any]
    window_start: datetime
    window_end: datetime
    value: float | None
    samples: int
    firing: bool
    reason: str = ""

    @property
    def no_data(self) -> bool:
        return self.value is None


@dataclass
class TickReport:
    evaluations: list[Evaluation] = field(default_factory=list)
    opened: list[AlertRaised] = field(default_factory=list)
    resolved: list[AlertRaised] = field(default_factory=list)
    retraining: list[TrainingRequested] = field(default_factory=list)
    canaries: list[CanaryReview] = field(default_factory=list)


@dataclass(frozen=True)
class CanaryReview:
    """One look at one canary: the decision, and whether the registry carried it out."""

    model_name: str
    canary_version: int
    control_version: int
    decision: Decision
    applied: bool


def psi(expected: Sequence[float], actual: Sequence[float], bins: int = PSI_BINS) -> float:
    """Population stability index of `actual` against `expected`, on the baseline's quantile bins."""
    ordered = sorted(expected)
    edges = sorted({ordered[min(len(ordered) - 1, int(len(ordered) * q / bins))] for q in range(1, bins)})

    def shares(values: Sequence[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for value in values:
            counts[sum(value >= edge for edge in edges)] += 1
        return [max(count / len(values), PSI_EPSILON) for count in counts]

    base, now = shares(expected), shares(actual)
    return sum((a - e) * math.log(a / e) for e, a in zip(base, now, strict=True))


class RegistryDoor:
    """The registry's HTTP door, as the monitor uses it (datasets, adapters, transitions)."""

    def __init__(self, base_url: str, api_key: str | None, *, transport: Any = None) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport

    def _client(self):  # noqa: ANN202 - httpx is imported lazily
        import httpx

        return httpx.AsyncClient(base_url=self._base_url, headers=self._headers, transport=self._transport, timeout=30.0)

    async def publish_dataset(self, body: DatasetCreate) -> dict[str, Any]:
        async with self._client() as client:
            response = await client.post("/registry/v1/datasets", json=body.model_dump(mode="json"))
        if response.status_code != 201:
            raise RuntimeError(f"registry refused the dataset ({response.status_code}): {response.text[:500]}")
        return response.json()

    async def transition(self, model_name: str, version: int, body: StageTransition) -> dict[str, Any]:
        """Move an adapter version; the registry checks the gate and records the change in its audit log."""
        async with self._client() as client:
            response = await client.post(f"/registry/v1/adapters/{model_name}/versions/{version}/transitions", json=body.model_dump(mode="json", exclude_none=True))
        if response.status_code != 200:
            raise RegistryRefused(response.status_code, response.text[:500])
        return response.json()

    async def get(self, path: str, **params: Any) -> Any:
        async with self._client() as client:
            response = await client.get(f"/registry/v1/{path}", params={k: v for k, v in params.items() if v is not None})
        response.raise_for_status()
        return response.json()

    async def production_lineage(self, model_name: str) -> dict[str, Any] | None:
        """The lineage of `model_name`'s full production version (not a canary beside it); None when it has none."""
        page = await self.get("adapters", model_name=model_name, stage=Stage.production.value, limit=50)
        serving = [item for item in page.get("items") or [] if not item.get("canary_percent")]
        if not serving:
            return None
        return await self.get(f"adapters/{model_name}/versions/{serving[0]['version']}/lineage")

    async def dataset_rows(self, name: str, version: int, page_size: int = 10_000) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while True:
            page = await self.get(f"datasets/{name}/versions/{version}/rows", offset=len(rows), limit=page_size)
            rows.extend(page)
            if len(page) < page_size:
                return rows


class RegistryRefused(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"registry refused ({status}): {body}")
        self.status = status


@dataclass(frozen=True)
class RetrainingPolicy:
    """When the monitor asks for retraining, and the recipe it asks for.

    A retrained adapter must beat production at the gate, so by default it learns what production
    learned (its lineage's dataset and hyperparameters) plus the corrections; corrections alone
    would teach the new facts and forget the old ones.
    """

    min_corrections: int = 20
    cooldown_s: int = 6 * 3600
    dataset_suffix: str = "feedback"
    hyperparameters: Hyperparameters | None = None  # None: production's, else the defaults
    include_lineage: bool = True
    correction_repeats: int = 1


@dataclass(frozen=True)
class Recipe:
    jsonl: str
    hyperparameters: Hyperparameters
    description: str


Publish = Callable[[Envelope[Any]], Awaitable[None]]


class Monitor:
    """Evaluates rules on each tick, opens and resolves alerts, and asks for retraining when quality slips."""

    def __init__(
        self,
        store: MonitorStore,
        rules: Sequence[Rule],
        publish: Publish,
        registry: RegistryDoor,
        *,
        policy: RetrainingPolicy,
        state_dir: Path,
        embedder: Embedder | None = None,
        canary_policy: CanaryPolicy | None = None,
        producer: str = "monitor",
    ) -> None:
        self.store = store
        self.rules = list(rules)
        self._publish = publish
        self._registry = registry
        self._policy = policy
        self._state_path = Path(state_dir) / "retraining.json"
        self._canaries_path = Path(state_dir) / "canaries.json"
        # The stage.changed handler and the tick both rewrite the watch list, from worker threads.
        self._canaries_lock = threading.Lock()
        self._embedder = embedder
        self._waiting: dict[str, str] = {}  # alert id -> why its retraining waits (logged once per reason)
        self.canary_policy = canary_policy
        self._producer = producer

    # -------------------------------------------------------------------------------- evaluation

    def evaluate(self, rule: Rule, now: datetime) -> list[Evaluation]:
        """Evaluate one rule for every scope with traffic in its window; scopes without enough samples are `no data`."""
        end = now
        start = end - timedelta(seconds=rule.window_s)
        base_start = start - timedelta(seconds=rule.baseline_window_s or 0)
        kind = rule.spec.kind
        if kind == "sql":
            current = {_key(rule, row): row for row in self.store.aggregate(rule, start, end)}
            baseline = {_key(rule, row): row for row in self.store.aggregate(rule, base_start, start)} if rule.needs_baseline else {}
            return [self._judge_aggregate(rule, key, row, baseline.get(key), start, end) for key, row in current.items()]
        limit = rule.sample_size if kind in ("scored", "embedding") else 100_000
        current_rows = _grouped(rule, self.store.values(rule, start, end, limit))
        baseline_rows = _grouped(rule, self.store.values(rule, base_start, start, limit)) if rule.needs_baseline else {}
        return [self._judge_sample(rule, key, rows, baseline_rows.get(key, []), start, end) for key, rows in current_rows.items()]

    def _judge_aggregate(self, rule: Rule, key: tuple, row: dict, base: dict | None, start: datetime, end: datetime) -> Evaluation:
        scope = dict(zip(rule.scope, key, strict=True))
        samples = int(row["samples"] or 0)
        if samples < rule.min_samples or _missing(row["value"]):
            return Evaluation(rule, scope, start, end, None, samples, False, f"no data: {samples} samples < {rule.min_samples}")
        value = float(row["value"])
        if rule.mode == "against_baseline":
            base_samples = int(base["samples"] or 0) if base else 0
            if base is None or base_samples < rule.min_samples or _missing(base["value"]):
                return Evaluation(rule, scope, start, end, None, samples, False, f"no data: baseline has {base_samples} samples < {rule.min_samples}")
            value -= float(base["value"])
        return Evaluation(rule, scope, start, end, value, samples, rule.crosses(value))

    def _judge_sample(self, rule: Rule, key: tuple, rows: list[dict], base: list[dict], start: datetime, end: datetime) -> Evaluation:
        scope = dict(zip(rule.scope, key, strict=True))
        if len(rows) < rule.min_samples:
            return Evaluation(rule, scope, start, end, None, len(rows), False, f"no data: {len(rows)} samples < {rule.min_samples}")
        if rule.needs_baseline and len(base) < rule.min_samples:
            return Evaluation(rule, scope, start, end, None, len(rows), False, f"no data: baseline has {len(base)} samples < {rule.min_samples}")
        value = self._score(rule, rows, base)
        return Evaluation(rule, scope, start, end, value, len(rows), rule.crosses(value))

    def _score(self, rule: Rule, rows: list[dict], base: list[dict]) -> float:
        kind = rule.spec.kind
        if kind == "psi":
            return psi([float(row["value"]) for row in base], [float(row["value"]) for row in rows])
        if kind == "embedding":
            embedder = self._embedder_or_load()
            now = embedder.encode([row["value"] or " " for row in rows]).mean(0)
            then = embedder.encode([row["value"] or " " for row in base]).mean(0)
            cosine = float((now @ then) / (now.norm() * then.norm()).clamp(min=1e-9))
            return 1.0 - cosine
        if rule.spec.scorer == "unsafe":
            return sum(scan_unsafe(row["output_text"]).unsafe for row in rows) / len(rows)
        # The live watcher: the prompt is the context a production answer should stay within.
        scores = score_groundedness([row["output_text"] for row in rows], [row["input_text"] for row in rows], self._embedder_or_load())
        return sum(not score.grounded for score in scores) / len(scores)

    def _embedder_or_load(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder()
        return self._embedder

    # ------------------------------------------------------------------------------------- ticks

    async def tick(self, now: datetime | None = None) -> TickReport:
        """Evaluate every rule once; open alerts that fire (once per episode), resolve those that cleared."""
        now = now or datetime.now(UTC)
        report = TickReport()
        for rule in self.rules:
            try:
                evaluations = await asyncio.to_thread(self.evaluate, rule, now)
            except Exception:  # noqa: BLE001 - one broken rule must not stop the others being watched
                log.exception("rule %s could not be evaluated", rule.name)
                continue
            await asyncio.to_thread(self.store.write_evaluations, [_stored(evaluation, now) for evaluation in evaluations])
            for evaluation in evaluations:
                report.evaluations.append(evaluation)
                labels = {name: str(evaluation.scope.get(name) or "") for name in SCOPES}
                if evaluation.value is not None:
                    METRIC_VALUE.labels(rule=rule.name, **labels).set(evaluation.value)
                await self._settle(evaluation, now, report)
        report.retraining = await self._retrain_for_open_alerts(now)
        report.canaries = await self.review_canaries(now)
        ALERTS_OPEN.set(len(await asyncio.to_thread(self.store.alerts, AlertState.open.value)) + len(await asyncio.to_thread(self.store.alerts, AlertState.acknowledged.value)))
        return report

    async def _settle(self, evaluation: Evaluation, now: datetime, report: TickReport) -> None:
        rule = evaluation.rule
        current = await asyncio.to_thread(self.store.open_alert, rule.name, evaluation.scope)
        if evaluation.firing:
            if current is not None:
                return  # the same episode: raised once, not once per tick
            last = await asyncio.to_thread(self.store.last_opened, rule.name, evaluation.scope)
            if last is not None and now - _utc(last) < timedelta(seconds=rule.cooldown_s):
                return
            alert = AlertRaised(
                alert_id=str(uuid.uuid4()),
                rule_name=rule.name,
                rule_version=rule.version,
                severity=rule.severity,
                model_name=evaluation.scope["model_name"],
                adapter_version=evaluation.scope.get("adapter_version"),
                prompt_version=evaluation.scope.get("prompt_version"),
                metric=rule.metric,
                value=float(evaluation.value or 0.0),
                threshold=rule.threshold,
                window_start=evaluation.window_start,
                window_end=evaluation.window_end,
                message=_message(evaluation),
            )
            await self._record(alert)
            ALERTS_RAISED.labels(rule=rule.name, severity=rule.severity.value).inc()
            report.opened.append(alert)
        elif current is not None and evaluation.value is not None and current["state"] == AlertState.open.value:
            # Cleared with real data (not for lack of it): resolved by the monitor. Acknowledged alerts wait for a person.
            resolved = _from_row(current, AlertState.resolved, f"resolved: {rule.metric} = {evaluation.value:.4g} no longer {rule.comparator} {rule.threshold:g}")
            await self._record(resolved)
            report.resolved.append(resolved)

    async def _record(self, alert: AlertRaised) -> Envelope[AlertRaised]:
        envelope = wrap(alert, producer=self._producer, correlation_id=alert.alert_id)
        await asyncio.to_thread(self.store.write_alert, envelope)
        await self._publish(envelope)
        return envelope

    async def set_state(self, alert_id: str, state: AlertState, actor: str, note: str | None = None) -> AlertRaised | None:
        """Acknowledge or resolve an alert by a person; None when there is no such alert."""
        row = await asyncio.to_thread(self.store.alert, alert_id)
        if row is None:
            return None
        if row["state"] == state.value or row["state"] == AlertState.resolved.value:
            return _from_row(row, AlertState(row["state"]), row["message"])
        alert = _from_row(row, state, f"{state.value} by {actor}" + (f": {note}" if note else ""))
        await self._record(alert)
        return alert

    # -------------------------------------------------------------------------------- retraining

    async def _retrain_for_open_alerts(self, now: datetime) -> list[TrainingRequested]:
        """Each open quality alert is answered by one retraining of its model.

        An alert whose retraining could not be requested yet (too few corrections, the model in its
        cooldown, the registry not answering) is tried again on every tick while it stays open, so a
        transient failure delays a retraining but never loses it.
        """
        quality = {rule.name for rule in self.rules if rule.is_quality}
        rows = [row for state in (AlertState.open, AlertState.acknowledged) for row in await asyncio.to_thread(self.store.alerts, state.value)]
        awaiting = [row for row in rows if row["rule_name"] in quality]
        answered = self._load_state()["answered"]
        requested: list[TrainingRequested] = []
        for row in sorted(awaiting, key=lambda row: _utc(row["window_end"])):
            if row["alert_id"] in answered:
                continue
            alert = _from_row(row, AlertState(row["state"]), row["message"])
            try:
                request = await self.maybe_retrain(alert, now)
            except Exception as error:  # noqa: BLE001 - the alert stays open and the next tick asks again
                self._note_waiting(alert, "error", f"retraining for alert {alert.alert_id} not requested yet, tried again next tick: {type(error).__name__}: {error}")
                continue
            if request is not None:
                requested.append(request)
                answered = self._load_state()["answered"]
        self._forget_closed({row["alert_id"] for row in rows})
        return requested

    async def maybe_retrain(self, alert: AlertRaised, now: datetime) -> TrainingRequested | None:
        """When enough corrections exist and the model is out of cooldown: a dataset version, then training.requested."""
        state = self._load_state()
        last = state["requested"].get(alert.model_name)
        if last is not None and now - datetime.fromisoformat(last) < timedelta(seconds=self._policy.cooldown_s):
            self._note_waiting(alert, "cooldown", f"retraining of {alert.model_name} for alert {alert.alert_id} waits: in cooldown since {last}")
            return None
        corrections = await asyncio.to_thread(self.store.corrections, alert.model_name)
        if len(corrections) < self._policy.min_corrections:
            self._note_waiting(alert, "too_few_corrections", f"retraining of {alert.model_name} for alert {alert.alert_id} waits: {len(corrections)} corrections < {self._policy.min_corrections}")
            return None
        recipe = await self._recipe(alert.model_name, corrections)
        dataset = await self._registry.publish_dataset(
            DatasetCreate(name=f"{alert.model_name}-{self._policy.dataset_suffix}", split="train", jsonl=recipe.jsonl, provenance="feedback", model_name=alert.model_name)
        )
        request = TrainingRequested(
            job_id=f"retrain-{alert.alert_id}",
            model_name=alert.model_name,
            dataset=DatasetRef(name=dataset["name"], version=dataset["version"]),
            hyperparameters=recipe.hyperparameters,
            requested_by="service:monitor",
            reason=f"alert {alert.rule_name}@v{alert.rule_version} ({alert.alert_id}): {alert.message}; dataset: {recipe.description}",
        )
        await self._publish(wrap(request, producer=self._producer, correlation_id=alert.alert_id))
        # One retraining answers every quality alert open on the model now; later ones wait for the cooldown.
        open_now = [row["alert_id"] for state_ in (AlertState.open, AlertState.acknowledged) for row in await asyncio.to_thread(self.store.alerts, state_.value) if row["model_name"] == alert.model_name]
        state["requested"][alert.model_name] = now.isoformat()
        state["answered"].update(dict.fromkeys([alert.alert_id, *open_now], request.job_id))
        self._save_state(state)
        self._waiting.pop(alert.alert_id, None)
        RETRAININGS.labels(outcome="requested").inc()
        log.info("retraining of %s requested for alert %s: job %s on %s:v%s (%s)", alert.model_name, alert.alert_id, request.job_id, dataset["name"], dataset["version"], recipe.description)
        return request

    async def _recipe(self, model_name: str, corrections: list[dict[str, Any]]) -> Recipe:
        records = list(dict.fromkeys(json.dumps(_chat_record(row), ensure_ascii=False) for row in corrections))
        parts = [f"{len(records)} corrections" + (f" x{self._policy.correction_repeats}" if self._policy.correction_repeats > 1 else "")]
        lineage = await self._registry.production_lineage(model_name) if self._policy.include_lineage else None
        learned: list[str] = []
        if lineage and lineage.get("dataset"):
            source = lineage["dataset"]
            learned = [json.dumps(row, ensure_ascii=False) for row in await self._registry.dataset_rows(source["name"], source["version"])]
            parts.insert(0, f"{len(learned)} records of {source['name']}:v{source['version']} (production v{lineage['adapter']['version']}'s training data)")
        hyperparameters = self._policy.hyperparameters
        if hyperparameters is None and lineage and lineage.get("hyperparameters"):
            hyperparameters = Hyperparameters.model_validate(lineage["hyperparameters"])
            parts.append(f"production v{lineage['adapter']['version']}'s hyperparameters")
        lines = learned + records * self._policy.correction_repeats
        return Recipe(jsonl="".join(line + "\n" for line in lines), hyperparameters=hyperparameters or Hyperparameters(), description=" + ".join(parts))

    def _note_waiting(self, alert: AlertRaised, outcome: str, message: str) -> None:
        """Count and log why an alert's retraining waits once per reason, not once per tick."""
        if self._waiting.get(alert.alert_id) == outcome:
            return
        self._waiting[alert.alert_id] = outcome
        RETRAININGS.labels(outcome=outcome).inc()
        (log.warning if outcome == "error" else log.info)(message)

    def _forget_closed(self, still_open: set[str]) -> None:
        state = self._load_state()
        closed = [alert_id for alert_id in state["answered"] if alert_id not in still_open]
        for alert_id in [alert_id for alert_id in self._waiting if alert_id not in still_open]:
            del self._waiting[alert_id]
        if closed:
            for alert_id in closed:
                del state["answered"][alert_id]
            self._save_state(state)

    def _load_state(self) -> dict[str, dict[str, str]]:
        state = _read_json(self._state_path)
        if state and "requested" not in state:  # the first layout: {model: when it was last retrained}
            state = {"requested": state}
        return {"requested": state.get("requested", {}), "answered": state.get("answered", {})}

    def _save_state(self, state: dict[str, dict[str, str]]) -> None:
        _write_json(self._state_path, state)

    # ------------------------------------------------------------------------------------ canary

    def watch(self, event: StageChanged, occurred_at: datetime) -> None:
        """Follow the registry's stages: a declared canary is watched from its declaration; any other move of it ends the watch."""
        with self._canaries_lock:
            canaries = _read_json(self._canaries_path)
            watched = canaries.get(event.model_name)
            if event.to_stage == Stage.production and event.canary_percent is not None:
                canaries[event.model_name] = {"version": event.adapter_version, "since": _utc(occurred_at).isoformat(), "percent": event.canary_percent}
            elif watched is not None and watched["version"] == event.adapter_version:
                del canaries[event.model_name]
            else:
                return
            _write_json(self._canaries_path, canaries)

    def watched_canaries(self) -> dict[str, dict[str, Any]]:
        with self._canaries_lock:
            return _read_json(self._canaries_path)

    async def review_canaries(self, now: datetime) -> list[CanaryReview]:
        """Judge each watched canary against its model's production version; promote or roll back through the registry."""
        policy = self.canary_policy
        if policy is None:
            return []
        reviews = []
        for model_name, watched in (await asyncio.to_thread(self.watched_canaries)).items():
            try:
                review = await self._review(policy, model_name, int(watched["version"]), datetime.fromisoformat(watched["since"]), now)
            except Exception:  # noqa: BLE001 - one canary's failure (registry down) must not stop the others
                log.exception("canary %s:v%s could not be reviewed", model_name, watched["version"])
                continue
            if review is not None:
                reviews.append(review)
                if not review.applied:
                    await asyncio.to_thread(self._remember, review, now)
        return reviews

    def _remember(self, review: CanaryReview, now: datetime) -> None:
        """The latest verdict on a canary still watched, for the console: what it waits for, in the policy's words."""
        with self._canaries_lock:
            canaries = _read_json(self._canaries_path)
            watched = canaries.get(review.model_name)
            if watched is None or watched["version"] != review.canary_version:
                return
            watched["last_review"] = {"at": now.isoformat(), "action": review.decision.action, "control_version": review.control_version, "summary": review.decision.summary()}
            _write_json(self._canaries_path, canaries)

    async def _review(self, policy: CanaryPolicy, model_name: str, version: int, since: datetime, now: datetime) -> CanaryReview | None:
        production = (await self._registry.get("adapters", model_name=model_name, stage=Stage.production.value, limit=10)).get("items") or []
        canary = next((a for a in production if a["version"] == version and a["canary_percent"] is not None), None)
        control = next((a for a in production if a["canary_percent"] is None), None)
        if canary is None or control is None:
            log.info("canary %s:v%d is no longer a canary beside a production version; watch ended", model_name, version)
            await asyncio.to_thread(self._unwatch, model_name, version)
            return None
        start = max(_utc(since), now - timedelta(seconds=policy.window_s))
        versions = (control["version"], version)
        arms = {row["adapter_version"]: row for row in await asyncio.to_thread(self.store.canary_arms, model_name, versions, start, now)}
        hallucinated: dict[int, tuple[int, int]] = {}
        if policy.hallucination_sample:
            sample = await asyncio.to_thread(self.store.answers, model_name, versions, start, now, policy.hallucination_sample)
            hallucinated = await asyncio.to_thread(self._hallucinations, sample)
        watched_s = (now - _utc(since)).total_seconds()
        decision = await asyncio.to_thread(judge, policy, _arm(control["version"], arms, hallucinated), _arm(version, arms, hallucinated), watched_s)
        log.info("canary %s:v%d vs v%d: %s", model_name, version, control["version"], decision.summary())
        applied = False
        if decision.action != "wait":
            reason = f"monitor {decision.summary()}"[:2000]
            if decision.action == "promote":
                body = StageTransition(to_stage=Stage.production, approver="service:monitor", reason=reason, replaces=control["version"])
            else:
                body = StageTransition(to_stage=Stage.archived, reason=reason)
            try:
                await self._registry.transition(model_name, version, body)
                applied = True
                await asyncio.to_thread(self._unwatch, model_name, version)
            except RegistryRefused as error:
                # A person moved it first (409): the stage.changed that follows ends the watch.
                log.warning("registry refused the canary %s of %s:v%d: %s", decision.action, model_name, version, error)
        CANARY_DECISIONS.labels(action=decision.action if applied or decision.action == "wait" else "refused").inc()
        return CanaryReview(model_name, version, control["version"], decision, applied)

    def _unwatch(self, model_name: str, version: int) -> None:
        with self._canaries_lock:
            canaries = _read_json(self._canaries_path)
            if canaries.get(model_name, {}).get("version") == version:
                del canaries[model_name]
                _write_json(self._canaries_path, canaries)

    def _hallucinations(self, rows: list[dict[str, Any]]) -> dict[int, tuple[int, int]]:
        """(hallucinated, scored) per adapter version: the live watcher's groundedness of each answer in its prompt."""
        if not rows:
            return {}
        scores = score_groundedness([row["output_text"] for row in rows], [row["input_text"] for row in rows], self._embedder_or_load())
        counts: dict[int, tuple[int, int]] = {}
        for row, score in zip(rows, scores, strict=True):
            bad, seen = counts.get(row["adapter_version"], (0, 0))
            counts[row["adapter_version"]] = (bad + (not score.grounded), seen + 1)
        return counts


def _arm(version: int, arms: dict[int, dict[str, Any]], hallucinated: dict[int, tuple[int, int]]) -> Arm:
    row = arms.get(version) or {}
    bad, scored = hallucinated.get(version, (0, 0))
    return Arm(version, int(row.get("inferences") or 0), int(row.get("errors") or 0), int(row.get("thumbs_given") or 0), int(row.get("thumbs_down") or 0),
               tuple(float(x) for x in row.get("latencies") or ()), scored, bad, tuple(float(x) for x in row.get("ratings") or ()))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    # Write-then-rename: a crash mid-write leaves the previous state, never half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value))
    temporary.replace(path)


def _stored(evaluation: Evaluation, now: datetime) -> dict[str, Any]:
    rule = evaluation.rule
    return {
        "evaluation_id": str(uuid.uuid4()), "evaluated_at": now, "rule_name": rule.name, "rule_version": rule.version, "metric": rule.metric,
        "kind": rule.spec.scorer or rule.spec.kind, "model_name": evaluation.scope["model_name"], "adapter_version": evaluation.scope.get("adapter_version"),
        "prompt_version": evaluation.scope.get("prompt_version"), "window_start": evaluation.window_start, "window_end": evaluation.window_end,
        "value": evaluation.value, "samples": evaluation.samples, "firing": evaluation.firing, "reason": evaluation.reason,
    }


def _chat_record(row: dict[str, Any]) -> dict[str, Any]:
    try:
        messages = [m for m in json.loads(row["input_messages"] or "[]") if m.get("role") in ("system", "user", "assistant")]
    except (ValueError, AttributeError):
        messages = []
    if not messages or messages[-1].get("role") != "user":
        messages = [{"role": "user", "content": row["input_text"]}]
    return {"messages": [*messages, {"role": "assistant", "content": row["correction"]}]}


def _key(rule: Rule, row: dict[str, Any]) -> tuple:
    return tuple(row[name] for name in rule.scope)


def _grouped(rule: Rule, rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_key(rule, row), []).append(row)
    return groups


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _message(evaluation: Evaluation) -> str:
    rule = evaluation.rule
    scope = ", ".join(f"{name}={value}" for name, value in evaluation.scope.items() if value is not None)
    against = " (window minus baseline)" if rule.mode == "against_baseline" else ""
    return f"{rule.metric}{against} = {evaluation.value:.4g} {rule.comparator} {rule.threshold:g} over {evaluation.samples} samples for {scope}"


def _from_row(row: dict[str, Any], state: AlertState, message: str) -> AlertRaised:
    return AlertRaised(
        alert_id=row["alert_id"],
        rule_name=row["rule_name"],
        rule_version=row["rule_version"],
        severity=row["severity"],
        state=state,
        model_name=row["model_name"],
        adapter_version=row["adapter_version"],
        prompt_version=row["prompt_version"],
        metric=row["metric"],
        value=row["value"],
        threshold=row["threshold"],
        window_start=_utc(row["window_start"]),
        window_end=_utc(row["window_end"]),
        message=message,
    )
