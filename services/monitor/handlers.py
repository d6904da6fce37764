"""What the monitor does when other services report: one function per consumed event."""

from __future__ import annotations

import asyncio

from contracts.envelope import Envelope
from contracts.events import StageChanged
from services.monitor.service import Monitor


async def when_stage_changed_watch_canary(envelope: Envelope[StageChanged], monitor: Monitor) -> None:
    # The canary's window starts when the registry declared it, not when the monitor noticed.
    await asyncio.to_thread(monitor.watch, envelope.payload, envelope.occurred_at)
