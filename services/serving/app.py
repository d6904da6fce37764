"""create_app for serving: the engine behind Triton, the gateway door, and the registry events it follows."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from contracts.http import Role
from services.runtime.auth import Authenticator
from services.runtime.privacy import PrivacySettings
from services.runtime.service import Runtime, Service
from services.serving.api import create_router
from services.serving.gateway import Gateway
from services.serving.handlers import COMMANDS, HANDLERS, AdapterLoader, Deps
from services.serving.inference_log import InferenceLogBuffer
from services.serving.limits import RateLimiter
from services.serving.guard_policies import GuardPolicies
from services.serving.prompt_routes import PromptRoutes
from services.serving.routes import Routes
from services.serving.settings import ServingSettings

if TYPE_CHECKING:
    from services.serving.triton import TritonServing

log = logging.getLogger("flywheel.serving")

# How often the supervisor looks for a dead tritonserver: a crash costs about this much more of 503s.
SUPERVISE_INTERVAL_S = 1.0


class _State:
    engine = None
    triton = None
    gateway: Gateway | None = None
    supervisor: asyncio.Task[None] | None = None
    stopping: asyncio.Event | None = None


def create_app(runtime: Runtime, settings: ServingSettings, privacy: PrivacySettings) -> Service:
    routes = Routes()
    routes.add_model(settings.base_model)
    prompts = PromptRoutes()
    guard_policies = GuardPolicies()
    state = _State()
    bus = runtime.bus("serving")
    buffer = InferenceLogBuffer(bus, capacity=settings.log_buffer_size, redactor=privacy.redactor())
    loader = AdapterLoader(
        routes,
        runtime.artifacts,
        runtime.home / "serving" / "adapters",
        lambda: state.engine,
        in_flight=lambda name: state.gateway.in_flight(name) if state.gateway is not None else 0,
        drain_s=settings.unload_drain_s,
    )

    # Every replica holds all routes, so it reads the registry's events itself (not a consumer group's
    # share) and replays the state topics from their start at each start: its routes live in memory.
    # Commands are read from now on only: a replayed deployment.requested would act again.
    deps = Deps(routes=routes, prompts=prompts, loader=loader, bus=bus, guard_policies=guard_policies)
    runtime.follow_all("serving", HANDLERS, deps, from_start=True)
    runtime.follow_all("serving", COMMANDS, deps, from_start=False)

    async def start() -> None:
        from services.runtime.cpu import use_free_cpus
        from services.runtime.base_model import smollm2_weights
        from services.runtime.inference import Engine
        from services.serving.triton import TritonServing

        await asyncio.to_thread(use_free_cpus)
        model_dir = settings.model_dir or await asyncio.to_thread(smollm2_weights, runtime.settings.cache)
        state.engine = await asyncio.to_thread(
            Engine.from_pretrained, model_dir, model_name=settings.base_model, dtype=runtime.settings.engine_dtype
        )
        triton = TritonServing(
            state.engine,
            workdir=runtime.home / "serving" / "triton",
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            log_verbose=settings.triton_log_verbose,
        )
        ports = await asyncio.to_thread(triton.start)
        try:
            await buffer.start()
            state.gateway = Gateway(
                routes=routes,
                tokenizer=state.engine.tokenizer,
                triton_grpc_url=ports.grpc_url,
                settings=settings,
                log_buffer=buffer,
                loaded_adapters=lambda: set(state.engine.adapters),
                prompts=prompts,
                guard_policies=guard_policies,
            )
        except BaseException:
            # The process runs stop hooks only for services whose start finished: stop Triton here.
            await buffer.stop()
            await asyncio.to_thread(triton.stop)
            raise
        state.triton = triton
        state.stopping = asyncio.Event()
        state.supervisor = asyncio.create_task(supervise(state, state.stopping), name="triton-supervisor")

    async def stop() -> None:
        if state.supervisor is not None:
            # Not cancelled: a restart under way runs in a thread, and must finish before Triton stops.
            state.stopping.set()
            await state.supervisor
        if state.gateway is not None:
            await state.gateway.close()
        await buffer.stop()
        if state.triton is not None:
            await asyncio.to_thread(state.triton.stop)

    async def triton_alive() -> None:
        # In a thread: PyTriton's liveness takes locks its own cleanup may hold for seconds after the
        # server died, and the probe must not stall the event loop (and every request with it) meanwhile.
        triton = state.triton
        if triton is None or not await asyncio.to_thread(triton.is_alive):
            raise RuntimeError("Triton is not running")

    guard = Authenticator.for_settings(runtime.settings).require(Role.app)
    limiter = RateLimiter(rate_per_s=settings.rate_limit_rps, burst=settings.rate_limit_burst)
    api = create_router(lambda: state.gateway, guard=guard, limiter=limiter)
    return Service(
        name="serving",
        api=api,
        readiness={"triton": triton_alive},
        facts={"engine_dtype": lambda: state.engine.dtype if state.engine is not None else None},
        on_start=[start],
        on_stop=[stop],
    )


async def supervise(state: _State, stopping: asyncio.Event) -> None:
    """Start tritonserver again whenever it died (killed, crashed), until the service stops; /readyz
    says 503 meanwhile and the gateway answers triton_unavailable."""
    triton: TritonServing = state.triton
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), SUPERVISE_INTERVAL_S)
            return
        except TimeoutError:
            pass
        if triton.is_alive():
            continue
        log.warning("tritonserver exited; starting it again")
        try:
            ports = await asyncio.to_thread(triton.restart)
        except Exception:  # noqa: BLE001 - the next tick tries again; the replica stays unready meanwhile
            log.exception("tritonserver did not start again")
            continue
        await state.gateway.retarget(ports.grpc_url)
