"""What serving does when registry events arrive: keep the routes current, load and unload adapters.
HANDLERS (state, replayed) and COMMANDS (read from now on) are the mappings app.py follows."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contracts.envelope import Envelope
from contracts.events import (
    AdapterRegistered,
    DeploymentAction,
    DeploymentCompleted,
    DeploymentRequested,
    GuardPolicyActivated,
    PromptPublished,
    Stage,
    StageChanged,
)
from services.runtime.artifacts import ArtifactStore
from services.runtime.broker import EventBus
from services.runtime.inference import Engine
from services.runtime.paths import under
from services.runtime.service import Handlers
from services.serving.guard_policies import GuardPolicies
from services.serving.prompt_routes import PromptRoutes
from services.serving.routes import DeferredStage, Route, Routes

log = logging.getLogger("flywheel.serving.handlers")

DRAIN_POLL_S = 0.05


class AdapterLoader:
    """Materialises an adapter version from the artifact store and loads it into the engine.

    Only from the configured store: the URI comes from an `adapter.registered` event, which anyone
    able to produce to Kafka could forge, so a URI that is not a blob of `artifacts` is refused
    (ArtifactOutsideStore) before anything is fetched, and no route ever points at that version.
    """

    def __init__(
        self,
        routes: Routes,
        artifacts: ArtifactStore,
        cache_dir: Path,
        engine: Callable[[], Engine | None],
        *,
        in_flight: Callable[[str], int] = lambda name: 0,
        drain_s: float = 0.0,
    ) -> None:
        self._routes = routes
        self._artifacts = artifacts
        self._cache = cache_dir
        self._engine = engine
        self._in_flight = in_flight
        self._drain_s = drain_s

    async def load(self, model_name: str, version: int) -> None:
        engine = self._engine()
        artifact = self._routes.artifact(model_name, version)
        if engine is None or artifact is None:
            raise LookupError(f"{model_name}:v{version} is unknown to serving or the engine is not up")
        name = Route(model_name, version, "pinned").adapter_name
        assert name is not None
        if name in engine.adapters:
            return  # a version's weights never change: staging -> production, or a replay, needs no reload
        uri, sha256 = artifact
        self._artifacts.check(uri)
        directory = await asyncio.to_thread(self._artifacts.materialize, uri, sha256, under(self._cache, sha256))
        await asyncio.to_thread(engine.load_adapter, name, directory)

    async def unload(self, model_name: str, version: int) -> None:
        """Unload once the requests already routed to the adapter have ended (no route points at it by
        now, so no new ones come): a request in Triton's queue must not find its adapter gone."""
        engine = self._engine()
        name = Route(model_name, version, "pinned").adapter_name
        if engine is None or name not in engine.adapters:
            return
        deadline = time.monotonic() + self._drain_s
        while self._in_flight(name) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self._in_flight(name):
            log.warning(
                "unloading %s with %d requests still on it after %.0f s", name, self._in_flight(name), self._drain_s
            )
        await asyncio.to_thread(engine.unload_adapter, name)


# Serving replays the registry's topics at every start, one consumer per topic, so a version's
# stage.changed may arrive before its adapter.registered: the stage change then waits in the routes
# and is applied when the registration arrives, after the load. Either way an adapter is loaded
# before any route points at it, so no request finds it missing. The two handlers take turns (`turn`):
# a stage change arriving while the other handler loads the same version waits for it.


@dataclass(frozen=True)
class Deps:
    """What serving's handlers work on: the routes, prompts and guard policies in memory, the adapter
    loader, the lock the routing handlers take turns on, and the bus deployment reports go out on."""

    routes: Routes
    prompts: PromptRoutes
    loader: AdapterLoader
    bus: EventBus
    guard_policies: GuardPolicies = field(default_factory=GuardPolicies)
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)


async def when_adapter_registered_remember_it(envelope: Envelope[AdapterRegistered], deps: Deps) -> None:
    event = envelope.payload
    async with deps.turn:
        deferred = deps.routes.add_version(
            event.model_name, event.adapter_version, event.artifact_uri, event.artifact_sha256
        )
        if deferred is not None:
            await _route(
                deps,
                event.model_name,
                event.adapter_version,
                deferred.to_stage,
                deferred.canary_percent,
                deferred=deferred,
            )


async def when_prompt_published_remember_it(envelope: Envelope[PromptPublished], deps: Deps) -> None:
    deps.prompts.publish(envelope.payload)


async def when_guard_policy_activated_apply_it(envelope: Envelope[GuardPolicyActivated], deps: Deps) -> None:
    deps.guard_policies.activate(envelope.payload)


async def when_stage_changed_route_and_load(envelope: Envelope[StageChanged], deps: Deps) -> None:
    event = envelope.payload
    serves = event.to_stage in (Stage.staging, Stage.production)
    async with deps.turn:
        if serves and deps.routes.defer_stage_if_unknown(
            event.model_name, event.adapter_version, event.to_stage, event.canary_percent
        ):
            return
        await _route(deps, event.model_name, event.adapter_version, event.to_stage, event.canary_percent)


async def _route(
    deps: Deps,
    model_name: str,
    version: int,
    to_stage: Stage,
    canary_percent: float | None,
    *,
    deferred: DeferredStage | None = None,
) -> None:
    if to_stage in (Stage.staging, Stage.production):
        await deps.loader.load(model_name, version)
    deps.routes.set_stage(model_name, version, to_stage, canary_percent, deferred=deferred)
    if to_stage == Stage.archived:
        await deps.loader.unload(model_name, version)


async def when_deployment_requested_load_and_report(envelope: Envelope[DeploymentRequested], deps: Deps) -> None:
    event = envelope.payload
    error = None
    try:
        if event.action == DeploymentAction.load:
            await deps.loader.load(event.model_name, event.adapter_version)
        else:
            await deps.loader.unload(event.model_name, event.adapter_version)
    except Exception as failure:  # noqa: BLE001 - the outcome is reported in deployment.completed
        error = f"{type(failure).__name__}: {failure}"
        log.warning("deployment %s failed: %s", event.deployment_id, error)
    await deps.bus.publish(
        DeploymentCompleted(
            deployment_id=event.deployment_id,
            model_name=event.model_name,
            adapter_version=event.adapter_version,
            action=event.action,
            ready=error is None,
            replica=socket.gethostname(),
            error=error,
        ),
        correlation_id=envelope.correlation_id,
    )


# Every replica reads these itself (not a consumer group's share) and replays them from their start at
# each start: the state they carry lives in memory.
HANDLERS: Handlers[Deps] = {
    AdapterRegistered: when_adapter_registered_remember_it,
    StageChanged: when_stage_changed_route_and_load,
    PromptPublished: when_prompt_published_remember_it,
    GuardPolicyActivated: when_guard_policy_activated_apply_it,
}
# Commands: read from now on, never replayed (a replayed deployment.requested would load again).
COMMANDS: Handlers[Deps] = {
    DeploymentRequested: when_deployment_requested_load_and_report,
}
