"""What the registry does when other services report: one function per consumed event, and HANDLERS,
the one mapping app.py subscribes. Their dependency is the adapters sub-domain."""

from __future__ import annotations

import asyncio

from contracts.envelope import Envelope
from contracts.events import EvaluationCompleted, TrainingCompleted
from services.registry.adapters import Adapters
from services.runtime.service import Handlers


async def when_training_completed_register_adapter(envelope: Envelope[TrainingCompleted], adapters: Adapters) -> None:
    # The event id is recorded in the adapter's own transaction, so a redelivery after a crash between
    # commit and offset commit registers nothing twice, independent of the consumer's own dedupe.
    await asyncio.to_thread(
        adapters.register_trained_adapter,
        envelope.payload,
        event_id=str(envelope.event_id),
        correlation_id=envelope.correlation_id,
    )


async def when_evaluation_completed_attach_result(envelope: Envelope[EvaluationCompleted], adapters: Adapters) -> None:
    await asyncio.to_thread(adapters.attach_evaluation, envelope.payload, event_id=str(envelope.event_id))


HANDLERS: Handlers[Adapters] = {
    TrainingCompleted: when_training_completed_register_adapter,
    EvaluationCompleted: when_evaluation_completed_attach_result,
}
