"""Wires the feedback service into a process: the sink's batch subscribers, the feedback door and the
OTLP trace intake (HTTP on the process's port, gRPC on its own)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from services.feedback.api import create_otlp_router, create_router, otlp_body_limits
from services.feedback.handlers import BATCH_HANDLERS, GROUP
from services.feedback.otlp_grpc import OtlpGrpcServer, TraceExportServicer
from services.feedback.otlp_intake import TraceIntake
from services.feedback.service import Sink
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.auth import Authenticator
from services.runtime.http import RefusalLog
from services.runtime.privacy import PrivacySettings
from services.runtime.service import Hook, Runtime, Service
from services.runtime.stages import StageClock


def create_app(
    runtime: Runtime, settings: FeedbackSettings, privacy: PrivacySettings, clock: StageClock | None = None
) -> Service:
    """`clock`, when given, sums the time of each stage of the sink (a benchmark reads it)."""
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
    on_start: list[Hook] = [clickhouse_answers]
    on_stop: list[Hook] = []
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
