"""Wires the feedback service into a process: the sink's batch subscribers, the feedback door, the
OTLP trace intake (HTTP on the process's port, gRPC on its own), the review queues' door and their
console pages."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from contracts.http import RubricVersionView

from services.feedback.api import create_otlp_router, create_router, otlp_body_limits
from services.feedback.console import PREFIX as REVIEW_PAGES
from services.feedback.console import create_console_router
from services.feedback.handlers import BATCH_HANDLERS, GROUP
from services.feedback.otlp_grpc import OtlpGrpcServer, TraceExportServicer
from services.feedback.otlp_intake import TraceIntake
from services.feedback.review import ReviewQueues
from services.feedback.review_api import create_review_router
from services.feedback.review_store import ReviewStore
from services.feedback.service import Sink
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.auth import Authenticator
from services.runtime.console import Section
from services.runtime.http import RefusalLog
from services.runtime.errors import NotFound, Unavailable
from services.runtime.privacy import PrivacySettings
from services.runtime.registry_client import RegistryClient, RegistryError
from services.runtime.scoring import LazyEmbedder
from services.runtime.service import Hook, Runtime, Service
from services.runtime.stages import StageClock


def create_app(
    runtime: Runtime,
    settings: FeedbackSettings,
    privacy: PrivacySettings,
    clock: StageClock | None = None,
    registry_transport: Any = None,
) -> Service:
    """`clock`, when given, sums the time of each stage of the sink (a benchmark reads it);
    `registry_transport`, an httpx transport to reach the registry's door through (tests)."""
    store = FeedbackStore(runtime.clickhouse)
    redactor = privacy.redactor()
    clock = clock or StageClock()
    runtime.subscribe_batches(
        GROUP, BATCH_HANDLERS, Sink(store, redactor, clock), clock=clock, **settings.batch_options()
    )

    async def clickhouse_answers() -> None:
        await asyncio.to_thread(store.ping)

    bus = runtime.bus(GROUP)
    auth = Authenticator.for_settings(runtime.settings)
    doors = APIRouter()
    doors.include_router(
        create_router(bus, lambda: store, auth, redactor, publish_timeout_s=settings.publish_timeout_s)
    )
    intake = TraceIntake(bus, redactor, settings)
    doors.include_router(create_otlp_router(intake, auth))
    reviews = ReviewStore(runtime.home / GROUP / "review.db")
    queues = ReviewQueues(
        reviews,
        lambda: store,
        bus.publish,
        redactor,
        # MiniLM in float32, as the live watcher scores groundedness, loaded by the first fill that needs it.
        LazyEmbedder().get,
        refill_after_s=settings.review_refill_after_s,
    )
    registry_url = settings.registry_url or f"http://{runtime.settings.http_host}:{runtime.settings.http_port}"

    async def rubric(key: str, name: str, version: int | None) -> RubricVersionView:
        try:
            return await RegistryClient(registry_url, key, transport=registry_transport).rubric(name, version)
        except RegistryError as error:
            if error.status == 404:
                raise NotFound(
                    f"the registry has no rubric {name!r}{f' version {version}' if version else ''}: publish it first (flywheel registry rubric publish)",
                    param="rubric",
                ) from None
            if error.refused:
                raise Unavailable(f"the registry refused to give rubric {name!r}: {error}", param="rubric") from None
            raise Unavailable(f"the registry could not be reached for rubric {name!r}: {error}") from None

    doors.include_router(create_review_router(queues, auth, rubric, publish_timeout_s=settings.publish_timeout_s))
    doors.include_router(create_console_router(queues, runtime.console, publish_timeout_s=settings.publish_timeout_s))
    runtime.console.add(Section(GROUP, "Review", REVIEW_PAGES))
    on_start: list[Hook] = [clickhouse_answers]
    on_stop: list[Hook] = [lambda: asyncio.to_thread(reviews.close)]
    if settings.otlp_grpc_port:
        grpc_door = OtlpGrpcServer(
            TraceExportServicer(intake, auth, RefusalLog()),
            host=runtime.settings.http_host,
            port=settings.otlp_grpc_port,
            max_message_bytes=settings.otlp_max_inflated_bytes,
        )
        on_start.append(grpc_door.start)
        on_stop.append(grpc_door.stop)

    # Opening the store before the broker starts migrates it, and a bad ClickHouse setting stops the
    # process at start instead of at the first batch. Nothing needs flushing on stop: the only batch
    # not yet stored is the one in flight, which the broker's graceful stop lets finish or leaves
    # uncommitted for redelivery.
    return Service(
        name=GROUP,
        api=doors,
        readiness={"clickhouse": clickhouse_answers},
        on_start=on_start,
        on_stop=on_stop,
        body_limits=otlp_body_limits(settings),
    )
