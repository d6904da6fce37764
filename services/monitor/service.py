"""The monitor's tick: evaluate every rule, settle alerts, answer quality alerts with retraining, review canaries.

`Monitor` owns the rules and the canary policy in force (app.py loads them at start), the tick that
runs the parts in that order, and the gauge of each rule's latest value. The parts, one module each:
rule evaluation (evaluation.py), alerts (alerts.py), retraining (retraining.py), canaries under watch
(canary_watch.py, judged by the policy in canary.py), their state files (state.py); ClickHouse is
read and written in store.py, the registry reached through services/runtime/registry_client.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import Gauge

from contracts.events import AlertRaised, AlertState, TrainingRequested
from services.monitor.alerts import Alerts, Publish
from services.monitor.canary import CanaryPolicy
from services.monitor.canary_watch import CanaryReview, CanaryWatch
from services.monitor.evaluation import Evaluation, RuleEvaluator
from services.monitor.retraining import Retraining, RetrainingPolicy
from services.monitor.rules import SCOPES, Rule
from services.monitor.state import JsonState
from services.monitor.store import MonitorStore
from services.runtime.registry_client import RegistryClient
from services.runtime.scoring import Embedder, LazyEmbedder

log = logging.getLogger("flywheel.monitor")

METRIC_VALUE = Gauge(
    "flywheel_monitor_metric_value",
    "Latest value of each rule's metric, per scope.",
    ["rule", "model_name", "adapter_version", "prompt_version"],
)


@dataclass
class TickReport:
    evaluations: list[Evaluation] = field(default_factory=list)
    opened: list[AlertRaised] = field(default_factory=list)
    resolved: list[AlertRaised] = field(default_factory=list)
    retraining: list[TrainingRequested] = field(default_factory=list)
    canaries: list[CanaryReview] = field(default_factory=list)


class Monitor:
    """Evaluates rules on each tick, opens and resolves alerts, and asks for retraining when quality slips."""

    def __init__(
        self,
        store: MonitorStore,
        rules: Sequence[Rule],
        publish: Publish,
        registry: RegistryClient,
        *,
        policy: RetrainingPolicy,
        state_dir: Path,
        embedder: Embedder | None = None,
        canary_policy: CanaryPolicy | None = None,
        producer: str = "monitor",
    ) -> None:
        self.store = store
        self.rules = list(rules)
        self.canary_policy = canary_policy
        shared_embedder = LazyEmbedder(embedder)
        self.evaluator = RuleEvaluator(store, shared_embedder)
        self.alerts = Alerts(store, publish, producer=producer)
        self.retraining = Retraining(
            store,
            self.alerts,
            registry,
            publish,
            policy=policy,
            state=JsonState(Path(state_dir) / "retraining.json"),
            producer=producer,
        )
        self.canaries = CanaryWatch(store, registry, JsonState(Path(state_dir) / "canaries.json"), shared_embedder)

    async def tick(self, now: datetime | None = None) -> TickReport:
        """Evaluate every rule once; open alerts that fire (once per episode), resolve those that cleared."""
        now = now or datetime.now(UTC)
        report = TickReport()
        for rule in self.rules:
            try:
                evaluations = await asyncio.to_thread(self.evaluator.evaluate, rule, now)
            except Exception:  # noqa: BLE001 - one broken rule must not stop the others being watched
                log.exception("rule %s could not be evaluated", rule.name)
                continue
            await asyncio.to_thread(
                self.store.write_evaluations, [evaluation.stored(now) for evaluation in evaluations]
            )
            for evaluation in evaluations:
                report.evaluations.append(evaluation)
                labels = {name: str(evaluation.scope.get(name) or "") for name in SCOPES}
                if evaluation.value is not None:
                    METRIC_VALUE.labels(rule=rule.name, **labels).set(evaluation.value)
                changed = await self.alerts.settle(evaluation, now)
                if changed is not None:
                    (report.resolved if changed.state == AlertState.resolved else report.opened).append(changed)
        report.retraining = await self.retraining.answer_open_alerts(
            {rule.name for rule in self.rules if rule.is_quality}, now
        )
        report.canaries = await self.canaries.review(self.canary_policy, now)
        await self.alerts.count_unresolved()
        return report
