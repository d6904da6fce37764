"""What the monitor does when other services report: one function per consumed event, and `HANDLERS`,
what it consumes, subscribed by app.py with the monitor as their dependency."""

from __future__ import annotations

import asyncio

from contracts.envelope import Envelope
from contracts.events import StageChanged
from services.monitor.service import Monitor
from services.runtime.service import Handlers


async def when_stage_changed_watch_canary(envelope: Envelope[StageChanged], monitor: Monitor) -> None:
    # The canary's window starts when the registry declared it, not when the monitor noticed.
    await asyncio.to_thread(monitor.canaries.watch, envelope.payload, envelope.occurred_at)


HANDLERS: Handlers[Monitor] = {StageChanged: when_stage_changed_watch_canary}
