"""Wires the feedback service into a process: the sink's batch subscribers and the feedback door."""

from __future__ import annotations

import asyncio

from services.feedback.api import create_router
from services.feedback.handlers import BATCH_HANDLERS, GROUP
from services.feedback.service import Sink
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.auth import Authenticator
from services.runtime.privacy import PrivacySettings
from services.runtime.service import Runtime, Service


def create_app(runtime: Runtime, settings: FeedbackSettings, privacy: PrivacySettings) -> Service:
    store = FeedbackStore(runtime.clickhouse)
    redactor = privacy.redactor()
    runtime.subscribe_batches(GROUP, BATCH_HANDLERS, Sink(store, redactor), **settings.batch_options())

    async def clickhouse_answers() -> None:
        await asyncio.to_thread(store.ping)

    # Opening the store before the broker starts migrates it, and a bad ClickHouse setting stops the
    # process at start instead of at the first batch. Nothing needs flushing on stop: the only batch
    # not yet stored is the one in flight, which the broker's graceful stop lets finish or leaves
    # uncommitted for redelivery.
    return Service(
        name=GROUP,
        api=create_router(runtime.bus(GROUP), lambda: store, Authenticator.for_settings(runtime.settings), redactor),
        readiness={"clickhouse": clickhouse_answers},
        on_start=[clickhouse_answers],
    )
