"""Alerts: one per episode of a rule firing on a scope (raised once, then a cooldown before the next),
resolved by the monitor when real data shows the value cleared, acknowledged or resolved by people.
Each change is stored in ClickHouse's alert table and published as alert.raised."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter, Gauge

from contracts.envelope import Envelope, wrap
from contracts.events import AlertRaised, AlertState, SpanSelector
from services.monitor.evaluation import Evaluation, as_utc
from services.monitor.store import MonitorStore

ALERTS_RAISED = Counter(
    "flywheel_monitor_alerts_raised_total", "Alerts opened, by rule and severity.", ["rule", "severity"]
)
ALERTS_OPEN = Gauge("flywheel_monitor_alerts_open", "Alerts open or acknowledged now.")

Publish = Callable[[Envelope[Any]], Awaitable[None]]


class Alerts:
    """Opens, resolves and changes alerts, keeping the alert table and the alert.raised topic in step."""

    def __init__(self, store: MonitorStore, publish: Publish, *, producer: str) -> None:
        self._store = store
        self._publish = publish
        self._producer = producer

    async def settle(self, evaluation: Evaluation, now: datetime) -> AlertRaised | None:
        """The alert this evaluation opened (state open) or resolved (state resolved); None when it changed nothing."""
        rule = evaluation.rule
        current = await asyncio.to_thread(self._store.open_alert, rule.name, evaluation.scope)
        if evaluation.firing:
            if current is not None:
                return None  # the same episode: raised once, not once per tick
            last = await asyncio.to_thread(self._store.last_opened, rule.name, evaluation.scope)
            if last is not None and now - as_utc(last) < timedelta(seconds=rule.cooldown_s):
                return None
            alert = AlertRaised(
                alert_id=str(uuid.uuid4()),
                rule_name=rule.name,
                rule_version=rule.version,
                severity=rule.severity,
                model_name=evaluation.scope.get("model_name", ""),
                adapter_version=evaluation.scope.get("adapter_version"),
                prompt_version=evaluation.scope.get("prompt_version"),
                metric=rule.metric,
                value=float(evaluation.value or 0.0),
                threshold=rule.threshold,
                window_start=evaluation.window_start,
                window_end=evaluation.window_end,
                message=_message(evaluation),
                # The contract's own type, not the rules file's stricter one, so it serialises as the schema says.
                spans=SpanSelector.model_validate(rule.spans.model_dump()) if rule.spans else None,
            )
            await self._record(alert)
            ALERTS_RAISED.labels(rule=rule.name, severity=rule.severity.value).inc()
            return alert
        if current is not None and evaluation.value is not None and current["state"] == AlertState.open.value:
            # Cleared with real data (not for lack of it): resolved by the monitor. Acknowledged alerts wait for a person.
            resolved = alert_from_row(
                current,
                AlertState.resolved,
                f"resolved: {rule.metric} = {evaluation.value:.4g} no longer {rule.comparator} {rule.threshold:g}",
            )
            await self._record(resolved)
            return resolved
        return None

    async def set_state(
        self, alert_id: str, state: AlertState, actor: str, note: str | None = None
    ) -> AlertRaised | None:
        """Acknowledge or resolve an alert by a person; None when there is no such alert."""
        row = await asyncio.to_thread(self._store.alert, alert_id)
        if row is None:
            return None
        if row["state"] == state.value or row["state"] == AlertState.resolved.value:
            return alert_from_row(row, AlertState(row["state"]), row["message"])
        alert = alert_from_row(row, state, f"{state.value} by {actor}" + (f": {note}" if note else ""))
        await self._record(alert)
        return alert

    async def unresolved(self) -> list[dict[str, Any]]:
        """The rows of every alert open or acknowledged now."""
        return [
            row
            for state in (AlertState.open, AlertState.acknowledged)
            for row in await asyncio.to_thread(self._store.alerts, state.value)
        ]

    async def count_unresolved(self) -> None:
        ALERTS_OPEN.set(len(await self.unresolved()))

    async def _record(self, alert: AlertRaised) -> Envelope[AlertRaised]:
        envelope = wrap(alert, producer=self._producer, correlation_id=alert.alert_id)
        await asyncio.to_thread(self._store.write_alert, envelope)
        await self._publish(envelope)
        return envelope


def alert_from_row(row: dict[str, Any], state: AlertState, message: str) -> AlertRaised:
    """The alert a stored row describes, in `state` with `message`."""
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
        window_start=as_utc(row["window_start"]),
        window_end=as_utc(row["window_end"]),
        message=message,
        spans=SpanSelector.model_validate_json(row["spans"]) if row.get("spans") else None,
    )


def _message(evaluation: Evaluation) -> str:
    rule = evaluation.rule
    given = [f"{name}={value}" for name, value in evaluation.scope.items() if value is not None]
    scope = " ".join([rule.spans.describe(), *given]) if rule.spans else ", ".join(given)
    against = " (window minus baseline)" if rule.mode == "against_baseline" else ""
    return f"{rule.metric}{against} = {evaluation.value:.4g} {rule.comparator} {rule.threshold:g} over {evaluation.samples} samples for {scope}"
