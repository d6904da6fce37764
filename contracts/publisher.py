"""A small typed publisher for apps that run their own LLM and still want Flywheel to see it.

Needs only pydantic and aiokafka (the `flywheel-contracts` distribution), not the platform:

    async with EventPublisher("kafka:9092", producer="support-bot") as publisher:
        await publisher.publish(InferenceLogged(inference_id=rid, model_name="smollm2", ...))
        await publisher.publish(FeedbackReceived(inference_id=rid, thumbs=Thumbs.down))

Delivery: idempotent producer with acks=all (aiokafka defaults to acks=1 without idempotence, which
can lose or duplicate an event when a broker fails over); `publish` returns once the broker has
the event, so an app that awaits it knows the event is durable.
"""

from __future__ import annotations

import uuid
from types import TracebackType

from aiokafka import AIOKafkaProducer

from contracts.envelope import Envelope, P, wrap
from contracts.topics import topic_for

CONTENT_TYPE = "application/json"


def encode(envelope: Envelope[P]) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Key, value and headers of the Kafka record that carries an envelope."""
    headers = [
        ("content-type", CONTENT_TYPE.encode()),
        ("event_type", envelope.event_type.encode()),
        ("schema_version", str(envelope.schema_version).encode()),
    ]
    return envelope.payload.partition_key().encode(), envelope.model_dump_json().encode(), headers


class EventPublisher:
    """Publishes contract events to their topics, keyed for ordering, with durable delivery."""

    def __init__(self, bootstrap_servers: str, *, producer: str, topic_prefix: str = "", request_timeout_ms: int = 30_000) -> None:
        self._producer_name = producer
        self._topic_prefix = topic_prefix
        self._kafka = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=request_timeout_ms,
            client_id=f"flywheel-publisher-{producer}",
        )

    async def start(self) -> None:
        await self._kafka.start()

    async def stop(self) -> None:
        await self._kafka.stop()

    async def __aenter__(self) -> EventPublisher:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def publish(self, payload: P, *, correlation_id: str | None = None, event_id: uuid.UUID | None = None) -> Envelope[P]:
        """Wrap the payload in its envelope and wait until the broker has stored it."""
        envelope = wrap(payload, producer=self._producer_name, correlation_id=correlation_id, event_id=event_id)
        key, value, headers = encode(envelope)
        await self._kafka.send_and_wait(topic_for(payload, self._topic_prefix), value=value, key=key, headers=headers)
        return envelope
