"""The broker factory, topic creation and the event bus services publish through.

Defaults are chosen for durability, not for aiokafka's or FastStream's defaults:
- producers are idempotent with acks=all (aiokafka: acks=1, no idempotence);
- FastStream logs every message at INFO; here that happens at DEBUG only.

Every client here, FastStream's and aiokafka's alike, takes the same `KafkaSecurity` (SASL/SCRAM, TLS),
so none of them talks to a secured broker in plaintext by accident.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError, for_code
from faststream.exceptions import FastStreamException
from faststream.kafka import KafkaBroker
from faststream.security import BaseSecurity, SASLScram256, SASLScram512

from contracts.envelope import Envelope, P, wrap
from contracts.publisher import PLAINTEXT, PRODUCER_BATCH_BYTES, KafkaSecurity, encode
from contracts.topics import all_topics, retained_topics, topic_for
from services.runtime.errors import ConfigurationError
from services.runtime.settings import FlywheelSettings

# What a publish raises when Kafka does not take the event: a door answers 503 and the caller retries.
PUBLISH_FAILURES: tuple[type[BaseException], ...] = (KafkaError, FastStreamException, TimeoutError)

log = logging.getLogger("flywheel.broker")


class ParallelStartBroker(KafkaBroker):
    """FastStream's Kafka broker, whose subscribers join their consumer groups side by side.

    aiokafka's `consumer.start()` returns once the group has assigned it partitions (a join and a sync,
    longer while a member of an earlier run is still registered), and FastStream starts subscribers one
    after the other: a process of the six services spent ~25 s there before it was ready. Side by side
    it takes as long as the slowest join."""

    async def start(self) -> None:
        await self.connect()
        await asyncio.gather(*(subscriber.start() for subscriber in self.subscribers))
        for publisher in self.publishers:
            await publisher.start()
        self.running = True


def create_broker(settings: FlywheelSettings, *, client_id: str, security: KafkaSecurity | None = None) -> KafkaBroker:
    """A FastStream Kafka broker with a durable producer and quiet per-message logging; it connects as
    `security` says (default: the settings' principal for a process of several services)."""
    security = security if security is not None else settings.resolved_kafka_security()
    return ParallelStartBroker(
        settings.resolved_kafka_bootstrap(),
        security=faststream_security(security),
        acks="all",
        enable_idempotence=True,
        client_id=f"flywheel-{client_id}",
        log_level=logging.DEBUG,
        logger=logging.getLogger("flywheel.faststream"),
        request_timeout_ms=30_000,
        max_batch_size=PRODUCER_BATCH_BYTES,
        graceful_timeout=settings.shutdown_grace_s,
    )


def faststream_security(security: KafkaSecurity) -> BaseSecurity | None:
    """The same security as FastStream spells it."""
    if security.uses_sasl:
        scram = SASLScram512 if security.sasl_mechanism == "SCRAM-SHA-512" else SASLScram256
        assert security.username and security.password, "KafkaSecurity refuses SASL without both"
        return scram(security.username, security.password, ssl_context=security.ssl_context, use_ssl=security.uses_tls)
    if security.uses_tls:
        return BaseSecurity(ssl_context=security.ssl_context, use_ssl=True)
    return None


def warn_if_unauthenticated(security: KafkaSecurity, bootstrap: str) -> None:
    """One warning per process start when Kafka would accept any event from anyone who reaches it."""
    if not security.uses_sasl:
        log.warning(
            "Kafka at %s is used without authentication (%s): anyone who reaches it can publish any event. "
            "Fine for development; elsewhere set FLYWHEEL_KAFKA_SECURITY_PROTOCOL=SASL_SSL with "
            "FLYWHEEL_KAFKA_SASL_USERNAME/FLYWHEEL_KAFKA_SASL_PASSWORD (or `flywheel infra up --secure` locally)",
            bootstrap,
            security.protocol,
        )


async def check_reachable(bootstrap: str, timeout_s: float = 10.0, *, security: KafkaSecurity = PLAINTEXT) -> None:
    """Raise a one-line ConfigurationError unless a Kafka broker answers at `bootstrap` and accepts `security`."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **security.client_options()
    )
    # aiokafka logs each failed connection attempt at ERROR; this probe reports the failure itself.
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaConnectionError, KafkaError, OSError, TimeoutError) as error:
        if security.uses_sasl and await _authentication_refused(bootstrap, security, timeout_s):
            raise ConfigurationError(
                f"Kafka at {bootstrap} refused principal {security.username!r} ({type(error).__name__}): "
                "check FLYWHEEL_KAFKA_SASL_USERNAME / FLYWHEEL_KAFKA_SASL_PASSWORD"
            ) from None
        raise ConfigurationError(
            f"cannot reach Kafka at {bootstrap} ({type(error).__name__}): start one with `flywheel infra up` "
            "or fix FLYWHEEL_KAFKA_BOOTSTRAP"
        ) from None
    finally:
        client_log.setLevel(level)
        await admin.close()


async def _authentication_refused(bootstrap: str, security: KafkaSecurity, timeout_s: float) -> bool:
    """Whether the first bootstrap broker refuses these credentials. aiokafka's clients log an
    authentication failure and report only "Unable to bootstrap"; one direct connection tells them apart."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import SaslAuthenticationFailed

    host, _, port = bootstrap.split(",", 1)[0].strip().rpartition(":")
    try:
        conn = await asyncio.wait_for(
            create_conn(host, int(port), request_timeout_ms=int(timeout_s * 1000), **security.client_options()),
            timeout_s,
        )
    except SaslAuthenticationFailed:
        return True
    except (KafkaError, OSError, TimeoutError, ValueError):
        return False
    conn.close()
    return False


async def require_topics(bootstrap: str, topics: list[str], *, security: KafkaSecurity) -> None:
    """Raise a one-line ConfigurationError unless every topic exists and this principal may see it. A
    consumer of a missing topic would otherwise wait silently; with ACLs a topic it may not read is
    invisible to it, so both causes get one answer."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000, **security.client_options())
    await admin.start()
    try:
        visible = set(await admin.list_topics())
    finally:
        await admin.close()
    missing = sorted(set(topics) - visible)
    if missing:
        raise ConfigurationError(
            f"{len(missing)} topic(s) this process consumes are missing at {bootstrap} or not readable by principal {security.username!r} "
            f"(e.g. {missing[0]}): create them as the admin (`flywheel infra topics`) and grant the ACLs (`flywheel infra acls`)"
        )


async def ensure_topics(
    bootstrap: str, prefix: str = "", replication_factor: int = 1, *, security: KafkaSecurity = PLAINTEXT
) -> list[str]:
    """Create every contract topic (and its dead-letter topic) with explicit partitions; returns those created.

    On a broker with ACLs only an admin principal may: the services' own principals cannot create topics."""
    await check_reachable(bootstrap, security=security)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000, **security.client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = {name: partitions for name, partitions in all_topics(prefix).items() if name not in existing}
        retained = retained_topics(prefix)
        if wanted:
            try:
                response = await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=partitions,
                            replication_factor=replication_factor,
                            topic_configs={"retention.ms": str(retained[name])} if name in retained else None,
                        )
                        for name, partitions in wanted.items()
                    ]
                )
            except TopicAlreadyExistsError:
                response = None  # another process created them first: the outcome we want
            # The broker answers per topic and aiokafka raises for none of them: a refusal (no Create
            # right) must not pass for a creation.
            refused = {
                topic: for_code(code).__name__
                for topic, code, *_ in (response.topic_errors if response else ())
                if code not in (0, TopicAlreadyExistsError.errno)
            }
            if refused:
                who = f" as {security.username!r}" if security.username else ""
                raise ConfigurationError(
                    f"Kafka at {bootstrap} refused to create {len(refused)} topic(s){who} ({sorted(set(refused.values()))[0]}, e.g. {sorted(refused)[0]}): "
                    "topics are created by the admin principal (`flywheel infra topics` with the admin's FLYWHEEL_KAFKA_SASL_*)"
                )
        # Topics created by an older version kept the broker's default retention: the state log must not expire.
        older = [name for name in retained if name in existing]
        if older:
            await admin.alter_configs(
                [
                    ConfigResource(ConfigResourceType.TOPIC, name, configs={"retention.ms": str(retained[name])})
                    for name in older
                ]
            )
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

    async def publish(
        self, payload: P, *, correlation_id: str | None = None, event_id: uuid.UUID | None = None
    ) -> Envelope[P]:
        """Publish one event and wait for the broker's acknowledgement."""
        envelope = wrap(payload, producer=self._producer, correlation_id=correlation_id, event_id=event_id)
        await self.publish_envelope(envelope)
        return envelope

    async def publish_envelope(self, envelope: Envelope[P]) -> None:
        """Publish an already-built envelope (an outbox relays these) as is."""
        key, value, headers = encode(envelope)
        await self._broker.publish(
            value, self.topic(envelope.payload), key=key, headers={name: raw.decode() for name, raw in headers}
        )
