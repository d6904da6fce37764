"""The broker factory, topic creation and the event bus services publish through.

Defaults are chosen for durability, not for aiokafka's or FastStream's defaults:
- producers are idempotent with acks=all (aiokafka: acks=1, no idempotence);
- FastStream logs every message at INFO; here that happens at DEBUG only.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from faststream.kafka import KafkaBroker

from contracts.envelope import Envelope, P, wrap
from contracts.publisher import encode
from contracts.topics import all_topics, retained_topics, topic_for
from services.runtime.errors import ConfigurationError
from services.runtime.settings import FlywheelSettings

log = logging.getLogger("flywheel.broker")


def create_broker(settings: FlywheelSettings, *, client_id: str) -> KafkaBroker:
    """A FastStream Kafka broker with a durable producer and quiet per-message logging."""
    return KafkaBroker(
        settings.resolved_kafka_bootstrap(),
        acks="all",
        enable_idempotence=True,
        client_id=f"flywheel-{client_id}",
        log_level=logging.DEBUG,
        logger=logging.getLogger("flywheel.faststream"),
        request_timeout_ms=30_000,
        graceful_timeout=settings.shutdown_grace_s,
    )


async def check_reachable(bootstrap: str, timeout_s: float = 10.0) -> None:
    """Raise a one-line ConfigurationError unless a Kafka broker answers at `bootstrap`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    # aiokafka logs each failed connection attempt at ERROR; this probe reports the failure itself.
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaConnectionError, KafkaError, OSError, TimeoutError) as error:
        raise ConfigurationError(
            f"cannot reach Kafka at {bootstrap} ({type(error).__name__}): start one with `flywheel infra up` "
            "or fix FLYWHEEL_KAFKA_BOOTSTRAP"
        ) from None
    finally:
        client_log.setLevel(level)
        await admin.close()


async def ensure_topics(bootstrap: str, prefix: str = "", replication_factor: int = 1) -> list[str]:
    """Create every contract topic (and its dead-letter topic) with explicit partitions; returns those created."""
    await check_reachable(bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = {name: partitions for name, partitions in all_topics(prefix).items() if name not in existing}
        retained = retained_topics(prefix)
        if wanted:
            try:
                await admin.create_topics([
                    NewTopic(name, num_partitions=partitions, replication_factor=replication_factor,
                             topic_configs={"retention.ms": str(retained[name])} if name in retained else None)
                    for name, partitions in wanted.items()
                ])
            except TopicAlreadyExistsError:
                pass  # another process created them first: the outcome we want
        # Topics created by an older version kept the broker's default retention: the state log must not expire.
        older = [name for name in retained if name in existing]
        if older:
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs={"retention.ms": str(retained[name])}) for name in older])
        return sorted(wanted)
    finally:
        await admin.close()


class EventBus:
    """What a service publishes through: typed payloads in, enveloped and keyed records out."""

    def __init__(self, broker: KafkaBroker, *, producer: str, topic_prefix: str = "") -> None:
        self._broker = broker
        self._producer = producer
        self._prefix = topic_prefix

    @property
    def producer(self) -> str:
        return self._producer

    def topic(self, payload: P | type[P]) -> str:
        return topic_for(payload, self._prefix)

    async def publish(self, payload: P, *, correlation_id: str | None = None, event_id: uuid.UUID | None = None) -> Envelope[P]:
        """Publish one event and wait for the broker's acknowledgement."""
        envelope = wrap(payload, producer=self._producer, correlation_id=correlation_id, event_id=event_id)
        await self.publish_envelope(envelope)
        return envelope

    async def publish_envelope(self, envelope: Envelope[P]) -> None:
        """Publish an already-built envelope (an outbox relays these) as is."""
        key, value, headers = encode(envelope)
        await self._broker.publish(value, self.topic(envelope.payload), key=key, headers={name: raw.decode() for name, raw in headers})
