"""Canaries under watch: the registry's stage.changed events say which version is a declared canary
and since when (kept in FLYWHEEL_HOME/monitor/canaries.json); each tick judges every watched canary
against its model's production version with the canary policy (canary.py) and asks the registry to
promote or roll it back. The registry's gate and audit log stay the authority: a move it refuses (a
person moved the version first) is left to the stage.changed that follows."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter

from contracts.events import Stage, StageChanged
from contracts.http import StageTransition
from services.monitor.canary import Arm, CanaryPolicy, Decision, judge
from services.monitor.evaluation import as_utc
from services.monitor.state import JsonState
from services.monitor.store import MonitorStore
from services.runtime.registry_client import RegistryClient, RegistryError
from services.runtime.scoring import LazyEmbedder, score_groundedness

log = logging.getLogger("flywheel.monitor")

CANARY_DECISIONS = Counter("flywheel_monitor_canary_decisions_total", "Canary reviews, by action taken.", ["action"])


@dataclass(frozen=True)
class CanaryReview:
    """One look at one canary: the decision, and whether the registry carried it out."""

    model_name: str
    canary_version: int
    control_version: int
    decision: Decision
    applied: bool


class CanaryWatch:
    """The watch list ({model: {version, since, percent, last_review}}) and the reviews of what is on it."""

    def __init__(self, store: MonitorStore, registry: RegistryClient, state: JsonState, embedder: LazyEmbedder) -> None:
        self._store = store
        self._registry = registry
        self._state = state
        self._embedder = embedder

    def watch(self, event: StageChanged, occurred_at: datetime) -> None:
        """Follow the registry's stages: a declared canary is watched from its declaration; any other move of it ends the watch."""

        def change(canaries: dict[str, Any]) -> bool:
            watched = canaries.get(event.model_name)
            if event.to_stage == Stage.production and event.canary_percent is not None:
                canaries[event.model_name] = {
                    "version": event.adapter_version,
                    "since": as_utc(occurred_at).isoformat(),
                    "percent": event.canary_percent,
                }
            elif watched is not None and watched["version"] == event.adapter_version:
                del canaries[event.model_name]
            else:
                return False
            return True

        self._state.update(change)

    def watched(self) -> dict[str, dict[str, Any]]:
        """Every canary under watch, by model name."""
        return self._state.read()

    async def review(self, policy: CanaryPolicy | None, now: datetime) -> list[CanaryReview]:
        """Judge each watched canary against its model's production version; promote or roll back through the registry."""
        if policy is None:
            return []
        reviews = []
        for model_name, watched in (await asyncio.to_thread(self.watched)).items():
            try:
                review = await self._review(
                    policy, model_name, int(watched["version"]), datetime.fromisoformat(watched["since"]), now
                )
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

        def change(canaries: dict[str, Any]) -> bool:
            watched = canaries.get(review.model_name)
            if watched is None or watched["version"] != review.canary_version:
                return False
            watched["last_review"] = {
                "at": now.isoformat(),
                "action": review.decision.action,
                "control_version": review.control_version,
                "summary": review.decision.summary(),
            }
            return True

        self._state.update(change)

    async def _review(
        self, policy: CanaryPolicy, model_name: str, version: int, since: datetime, now: datetime
    ) -> CanaryReview | None:
        production = (await self._registry.adapters(model_name=model_name, stage=Stage.production, limit=10)).items
        canary = next((a for a in production if a.version == version and a.canary_percent is not None), None)
        control = next((a for a in production if a.canary_percent is None), None)
        if canary is None or control is None:
            log.info(
                "canary %s:v%d is no longer a canary beside a production version; watch ended", model_name, version
            )
            await asyncio.to_thread(self._unwatch, model_name, version)
            return None
        start = max(as_utc(since), now - timedelta(seconds=policy.window_s))
        versions = (control.version, version)
        arms = {
            row["adapter_version"]: row
            for row in await asyncio.to_thread(self._store.canary_arms, model_name, versions, start, now)
        }
        hallucinated: dict[int, tuple[int, int]] = {}
        if policy.hallucination_sample:
            sample = await asyncio.to_thread(
                self._store.answers, model_name, versions, start, now, policy.hallucination_sample
            )
            hallucinated = await asyncio.to_thread(self._hallucinations, sample)
        watched_s = (now - as_utc(since)).total_seconds()
        decision = await asyncio.to_thread(
            judge, policy, _arm(control.version, arms, hallucinated), _arm(version, arms, hallucinated), watched_s
        )
        log.info("canary %s:v%d vs v%d: %s", model_name, version, control.version, decision.summary())
        applied = False
        if decision.action != "wait":
            reason = f"monitor {decision.summary()}"[:2000]
            if decision.action == "promote":
                body = StageTransition(
                    to_stage=Stage.production, approver="service:monitor", reason=reason, replaces=control.version
                )
            else:
                body = StageTransition(to_stage=Stage.archived, reason=reason)
            try:
                await self._registry.transition(model_name, version, body)
                applied = True
                await asyncio.to_thread(self._unwatch, model_name, version)
            except RegistryError as error:
                if not error.refused:
                    raise  # the registry did not answer: the canary could not be reviewed this tick
                # A person moved it first (409): the stage.changed that follows ends the watch.
                log.warning("registry refused the canary %s of %s:v%d: %s", decision.action, model_name, version, error)
        CANARY_DECISIONS.labels(action=decision.action if applied or decision.action == "wait" else "refused").inc()
        return CanaryReview(model_name, version, control.version, decision, applied)

    def _unwatch(self, model_name: str, version: int) -> None:
        def change(canaries: dict[str, Any]) -> bool:
            if canaries.get(model_name, {}).get("version") != version:
                return False
            del canaries[model_name]
            return True

        self._state.update(change)

    def _hallucinations(self, rows: list[dict[str, Any]]) -> dict[int, tuple[int, int]]:
        """(hallucinated, scored) per adapter version: the live watcher's groundedness of each answer in its prompt."""
        if not rows:
            return {}
        scores = score_groundedness(
            [row["output_text"] for row in rows], [row["input_text"] for row in rows], self._embedder.get()
        )
        counts: dict[int, tuple[int, int]] = {}
        for row, score in zip(rows, scores, strict=True):
            bad, seen = counts.get(row["adapter_version"], (0, 0))
            counts[row["adapter_version"]] = (bad + (not score.grounded), seen + 1)
        return counts


def _arm(version: int, arms: dict[int, dict[str, Any]], hallucinated: dict[int, tuple[int, int]]) -> Arm:
    row = arms.get(version) or {}
    bad, scored = hallucinated.get(version, (0, 0))
    return Arm(
        version,
        int(row.get("inferences") or 0),
        int(row.get("errors") or 0),
        int(row.get("thumbs_given") or 0),
        int(row.get("thumbs_down") or 0),
        tuple(float(x) for x in row.get("latencies") or ()),
        scored,
        bad,
        tuple(float(x) for x in row.get("ratings") or ()),
    )
