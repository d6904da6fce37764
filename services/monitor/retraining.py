"""Closing the loop: each open quality alert is answered by one retraining of its model, once enough
corrections exist and the model is out of its cooldown. The monitor publishes a dataset version (what
production learned plus the corrections) to the registry, then training.requested. What was asked for
is kept in FLYWHEEL_HOME/monitor/retraining.json, so a restart neither repeats nor forgets a request."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from prometheus_client import Counter

from contracts.envelope import wrap
from contracts.events import (
    SPAN_TEXT_MAX,
    AlertRaised,
    AlertState,
    DatasetRef,
    Hyperparameters,
    SpanKind,
    SpanLogged,
    TrainingRequested,
)
from contracts.http import DatasetCreate
from services.monitor.alerts import Alerts, Publish, alert_from_row
from services.monitor.evaluation import as_utc
from services.monitor.preference_datasets import Built, build_pairs
from services.monitor.state import JsonState
from services.monitor.store import MonitorStore
from services.runtime.registry_client import RegistryClient
from services.runtime.spans import ROOT_STEP, RetrainingTrace, publish_span

log = logging.getLogger("flywheel.monitor")

SERVICE_NAME = "flywheel-monitor"
RETRAININGS = Counter("flywheel_monitor_retrainings_total", "Retraining decisions, by outcome.", ["outcome"])


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
    # sft: production's data plus the corrections. dpo: preference pairs from the model's feedback
    # (services/monitor/preference_datasets.py), going on from production's adapter and held to it when
    # its hyperparameters are used: SFT then DPO across retrainings. `min_corrections` then counts pairs.
    # sft_then_dpo: both in one job, SFT on the sft recipe, then DPO on the pairs from that SFT adapter;
    # `min_corrections` counts corrections and pairs, each.
    method: Literal["sft", "dpo", "sft_then_dpo"] = "sft"


@dataclass(frozen=True)
class Recipe:
    jsonl: str
    hyperparameters: Hyperparameters
    description: str
    start_adapter_version: int | None = None
    # sft_then_dpo: the DPO stage's pairs (jsonl holds the SFT stage's chat records).
    preference_jsonl: str | None = None


class Retraining:
    """Answers open quality alerts with retraining requests, under the policy's thresholds and cooldown."""

    def __init__(
        self,
        store: MonitorStore,
        alerts: Alerts,
        registry: RegistryClient,
        publish: Publish,
        *,
        policy: RetrainingPolicy,
        state: JsonState,
        producer: str,
    ) -> None:
        self._store = store
        self._alerts = alerts
        self._registry = registry
        self._publish = publish
        self._policy = policy
        self._state = state
        self._producer = producer
        self._waiting: dict[str, str] = {}  # alert id -> why its retraining waits (logged once per reason)

    async def answer_open_alerts(self, quality_rules: set[str], now: datetime) -> list[TrainingRequested]:
        """Each open alert of a quality rule is answered by one retraining of its model.

        An alert whose retraining could not be requested yet (too few corrections, the model in its
        cooldown, the registry not answering) is tried again on every tick while it stays open, so a
        transient failure delays a retraining but never loses it.
        """
        rows = await self._alerts.unresolved()
        awaiting = [row for row in rows if row["rule_name"] in quality_rules]
        answered = self._load_state()["answered"]
        requested: list[TrainingRequested] = []
        for row in sorted(awaiting, key=lambda row: as_utc(row["window_end"])):
            if row["alert_id"] in answered:
                continue
            alert = alert_from_row(row, AlertState(row["state"]), row["message"])
            try:
                request = await self.maybe_retrain(alert, now)
            except Exception as error:  # noqa: BLE001 - the alert stays open and the next tick asks again
                self._note_waiting(
                    alert,
                    "error",
                    f"retraining for alert {alert.alert_id} not requested yet, tried again next tick: {type(error).__name__}: {error}",
                )
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
            self._note_waiting(
                alert,
                "cooldown",
                f"retraining of {alert.model_name} for alert {alert.alert_id} waits: in cooldown since {last}",
            )
            return None
        method = self._policy.method
        # sft counts corrections, dpo preference pairs, sft_then_dpo both: each of its stages needs its own examples.
        corrections = [] if method == "dpo" else await asyncio.to_thread(self._store.corrections, alert.model_name)
        built = (
            None
            if method == "sft"
            else build_pairs(
                alert.model_name, await asyncio.to_thread(self._store.preference_feedback, alert.model_name)
            )
        )
        counted = [
            *([] if method == "dpo" else [(len(corrections), "corrections")]),
            *([] if built is None else [(len(built.pairs), "preference pairs")]),
        ]
        short = [f"{examples} {kind}" for examples, kind in counted if examples < self._policy.min_corrections]
        if short:
            self._note_waiting(
                alert,
                "too_few_corrections",
                f"retraining of {alert.model_name} for alert {alert.alert_id} waits: {' and '.join(short)} < {self._policy.min_corrections}",
            )
            return None
        if built is None:
            recipe = await self._recipe(alert.model_name, corrections)
        elif method == "dpo":
            recipe = await self._preference_recipe(alert.model_name, built)
        else:
            recipe = await self._staged_recipe(alert.model_name, corrections, built)
        dataset = await self._publish_dataset(alert.model_name, recipe.jsonl, preferences=method == "dpo")
        preference_dataset = (
            None
            if recipe.preference_jsonl is None
            else await self._publish_dataset(alert.model_name, recipe.preference_jsonl, preferences=True)
        )
        request = TrainingRequested(
            job_id=f"retrain-{alert.alert_id}",
            model_name=alert.model_name,
            dataset=dataset,
            preference_dataset=preference_dataset,
            hyperparameters=recipe.hyperparameters,
            start_adapter_version=recipe.start_adapter_version,
            requested_by="service:monitor",
            reason=f"alert {alert.rule_name}@v{alert.rule_version} ({alert.alert_id}): {alert.message}; dataset: {recipe.description}",
        )
        await self._publish(wrap(request, producer=self._producer, correlation_id=alert.alert_id))
        await self._publish_root_span(alert, request, now)
        # One retraining answers every quality alert open on the model now; later ones wait for the cooldown.
        open_now = [row["alert_id"] for row in await self._alerts.unresolved() if row["model_name"] == alert.model_name]
        state["requested"][alert.model_name] = now.isoformat()
        state["answered"].update(dict.fromkeys([alert.alert_id, *open_now], request.job_id))
        self._save_state(state)
        self._waiting.pop(alert.alert_id, None)
        RETRAININGS.labels(outcome="requested").inc()
        log.info(
            "retraining of %s requested for alert %s: job %s on %s:v%s (%s)",
            alert.model_name,
            alert.alert_id,
            request.job_id,
            dataset.name,
            dataset.version,
            recipe.description,
        )
        return request

    async def _publish_root_span(self, alert: AlertRaised, request: TrainingRequested, now: datetime) -> None:
        async def publish(payload: Any, *, correlation_id: str | None, event_id: Any) -> None:
            await self._publish(
                wrap(payload, producer=self._producer, correlation_id=correlation_id, event_id=event_id)
            )

        await publish_span(publish, retraining_root_span(alert, request, now), correlation_id=alert.alert_id)

    async def _publish_dataset(self, model_name: str, jsonl: str, *, preferences: bool) -> DatasetRef:
        dataset = await self._registry.publish_dataset(
            DatasetCreate(
                name=f"{model_name}-{self._policy.dataset_suffix}{'-preferences' if preferences else ''}",
                split="train",
                jsonl=jsonl,
                provenance="preferences" if preferences else "feedback",
                model_name=model_name,
            )
        )
        return DatasetRef(name=dataset.name, version=dataset.version)

    async def _recipe(self, model_name: str, corrections: list[dict[str, Any]]) -> Recipe:
        records = list(dict.fromkeys(json.dumps(_chat_record(row), ensure_ascii=False) for row in corrections))
        parts = [
            f"{len(records)} corrections"
            + (f" x{self._policy.correction_repeats}" if self._policy.correction_repeats > 1 else "")
        ]
        lineage = await self._registry.production_lineage(model_name) if self._policy.include_lineage else None
        learned: list[str] = []
        if lineage and lineage.dataset:
            source = lineage.dataset
            learned = [
                json.dumps(row, ensure_ascii=False)
                for row in await self._registry.dataset_rows(source.name, source.version)
            ]
            parts.insert(
                0,
                f"{len(learned)} records of {source.name}:v{source.version} (production v{lineage.adapter.version}'s training data)",
            )
        hyperparameters = self._policy.hyperparameters
        if hyperparameters is None and lineage and lineage.hyperparameters:
            hyperparameters = Hyperparameters.model_validate(lineage.hyperparameters)
            parts.append(f"production v{lineage.adapter.version}'s hyperparameters")
        lines = learned + records * self._policy.correction_repeats
        return Recipe(
            jsonl="".join(line + "\n" for line in lines),
            # Production's hyperparameters say how it was trained (dpo, sft_then_dpo): this recipe is chat records.
            hyperparameters=(hyperparameters or Hyperparameters()).model_copy(update={"method": "sft"}),
            description=" + ".join(parts),
        )

    async def _staged_recipe(self, model_name: str, corrections: list[dict[str, Any]], built: Built) -> Recipe:
        """sft_then_dpo in one job: the sft recipe (a new adapter on production's data plus the corrections, with
        its hyperparameters), then DPO on the pairs from that SFT adapter, which is also DPO's reference."""
        sft = await self._recipe(model_name, corrections)
        counts = ", ".join(f"{count} {kind.value}" for kind, count in built.counts().items() if count)
        return Recipe(
            jsonl=sft.jsonl,
            hyperparameters=sft.hyperparameters.model_copy(update={"method": "sft_then_dpo"}),
            description=f"SFT on {sft.description}, then DPO on {len(built.pairs)} preference pairs ({counts})",
            preference_jsonl=built.jsonl(),
        )

    async def _preference_recipe(self, model_name: str, built: Built) -> Recipe:
        """DPO on the pairs. With production's hyperparameters (its lineage's) the job goes on from
        production's adapter, held to it, so the preferences are learned on top of what production
        knows; hyperparameters the policy declares train a new adapter, whose shape they set."""
        counts = ", ".join(f"{count} {kind.value}" for kind, count in built.counts().items() if count)
        parts = [f"{len(built.pairs)} preference pairs ({counts})"]
        hyperparameters, start = self._policy.hyperparameters, None
        lineage = await self._registry.production_lineage(model_name) if hyperparameters is None else None
        if lineage and lineage.hyperparameters:
            hyperparameters = Hyperparameters.model_validate(lineage.hyperparameters)
            start = lineage.adapter.version
            parts.append(f"DPO going on from production v{start}, with its hyperparameters")
        return Recipe(
            jsonl=built.jsonl(),
            hyperparameters=(hyperparameters or Hyperparameters()).model_copy(update={"method": "dpo"}),
            description=" + ".join(parts),
            start_adapter_version=start,
        )

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
        """{"requested": {model: when its last retraining was asked for}, "answered": {alert id: job id}}."""
        state = self._state.read()
        if state and "requested" not in state:  # the first layout: {model: when it was last retrained}
            state = {"requested": state}
        return {"requested": state.get("requested", {}), "answered": state.get("answered", {})}

    def _save_state(self, state: dict[str, dict[str, str]]) -> None:
        self._state.write(state)


def retraining_root_span(alert: AlertRaised, request: TrainingRequested, now: datetime) -> SpanLogged:
    """The root of a retraining's trace: from the end of the window that raised the alert to the request.
    The alert id is the retraining's correlation id, so the trainer's and evaluator's spans land under it."""
    return RetrainingTrace(alert.alert_id).span(
        ROOT_STEP,
        name=f"retraining {alert.model_name}",
        kind=SpanKind.chain,
        service_name=SERVICE_NAME,
        started_at=as_utc(alert.window_end),
        ended_at=now,
        model_name=alert.model_name,
        adapter_version=alert.adapter_version,
        input_text=alert.message[:SPAN_TEXT_MAX],
        attributes={
            "flywheel.alert_id": alert.alert_id,
            "flywheel.rule": f"{alert.rule_name}@v{alert.rule_version}",
            "flywheel.metric": f"{alert.metric} {alert.value:g} (threshold {alert.threshold:g})",
            "flywheel.job_id": request.job_id,
            "flywheel.dataset": f"{request.dataset.name}:v{request.dataset.version}",
            **(
                {}
                if request.preference_dataset is None
                else {
                    "flywheel.preference_dataset": f"{request.preference_dataset.name}:v{request.preference_dataset.version}"
                }
            ),
        },
    )


def _chat_record(row: dict[str, Any]) -> dict[str, Any]:
    try:
        messages = [
            m for m in json.loads(row["input_messages"] or "[]") if m.get("role") in ("system", "user", "assistant")
        ]
    except (ValueError, AttributeError):
        messages = []
    if not messages or messages[-1].get("role") != "user":
        messages = [{"role": "user", "content": row["input_text"]}]
    return {"messages": [*messages, {"role": "assistant", "content": row["correction"]}]}
