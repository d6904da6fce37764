"""A small typed publisher for apps that run their own LLM and still want Flywheel to see it.

Needs only pydantic and aiokafka (the `flywheel-contracts` distribution), not the platform:

    async with EventPublisher("kafka:9092", producer="support-bot") as publisher:
        await publisher.publish(InferenceLogged(inference_id=rid, model_name="smollm2", ...))
        await publisher.publish(FeedbackReceived(inference_id=rid, thumbs=Thumbs.down))

Against a broker with SASL/SCRAM and TLS (production), as the `app` principal:

    EventPublisher("kafka:9094", producer="support-bot", sasl_username="app", sasl_password=password,
                   ssl_cafile="/etc/ssl/kafka-ca.pem")

Delivery: idempotent producer with acks=all (aiokafka defaults to acks=1 without idempotence, which
can lose or duplicate an event when a broker fails over); `publish` returns once the broker has
the event, so an app that awaits it knows the event is durable.
"""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aiokafka import AIOKafkaProducer

from contracts.envelope import Envelope, P, wrap
from contracts.events import (
    REVIEWER_FEEDBACK_ONLY_ON_ITS_TOPIC,
    REVIEWS_ONLY_ON_THEIR_TOPIC,
    FeedbackReceived,
    FeedbackSource,
)
from contracts.topics import topic_for

CONTENT_TYPE = "application/json"
# The bytes one producer batch (one partition's records in one produce request) may hold. At aiokafka's
# 16 KiB a batch holds about ten span events, so hundreds of publishes awaited side by side (an OTLP
# export, an app's burst) wait on a produce round trip per ten and all wake at every drain
# (docs/benchmarks.md). Half the broker's default message.max.bytes (1 MiB) leaves room for overhead.
PRODUCER_BATCH_BYTES = 512 * 1024

SecurityProtocol = Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"]
SaslMechanism = Literal["SCRAM-SHA-512", "SCRAM-SHA-256"]


@dataclass(frozen=True)
class KafkaSecurity:
    """How a client proves who it is to Kafka and protects the connection: one value for every client
    (the apps' publisher, the services' broker, admin clients), so none of them is left in plaintext."""

    protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr, so never in a log line
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.uses_sasl and not (self.username and self.password):
            raise ValueError(f"{self.protocol} needs a SASL username and password")
        if not self.uses_sasl and self.username:
            raise ValueError(
                f"a SASL username was given but the protocol is {self.protocol}: use SASL_SSL (or SASL_PLAINTEXT in development)"
            )

    @classmethod
    def of(
        cls,
        *,
        protocol: SecurityProtocol | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
        sasl_mechanism: SaslMechanism = "SCRAM-SHA-512",
        ssl_context: ssl.SSLContext | None = None,
        ssl_cafile: str | Path | None = None,
    ) -> KafkaSecurity:
        """The security a set of client options describes; without `protocol`, it follows from them
        (credentials: SASL, a CA or an SSL context: TLS, neither: PLAINTEXT)."""
        tls = ssl_context is not None or ssl_cafile is not None
        if protocol is None:
            protocol = ("SASL_SSL" if tls else "SASL_PLAINTEXT") if sasl_username else ("SSL" if tls else "PLAINTEXT")
        if protocol in ("SSL", "SASL_SSL") and ssl_context is None:
            # The system's trust store, plus the cluster's own CA when it has one: hostnames are checked.
            ssl_context = ssl.create_default_context(cafile=str(ssl_cafile) if ssl_cafile else None)
        return cls(
            protocol=protocol,
            sasl_mechanism=sasl_mechanism,
            username=sasl_username,
            password=sasl_password,
            ssl_context=ssl_context,
        )

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_tls:
            options["ssl_context"] = self.ssl_context
        if self.uses_sasl:
            options.update(
                sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username, sasl_plain_password=self.password
            )
        return options


PLAINTEXT = KafkaSecurity()


def encode(envelope: Envelope[P]) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Key, value and headers of the Kafka record that carries an envelope."""
    headers = [
        ("content-type", CONTENT_TYPE.encode()),
        ("event_type", envelope.event_type.encode()),
        ("schema_version", str(envelope.schema_version).encode()),
    ]
    return envelope.payload.partition_key().encode(), envelope.model_dump_json().encode(), headers


class ReviewerClaimRefused(ValueError):
    """An app's feedback.received that claims source reviewer: only reviewers' corrections feed automatic
    retraining, and they reach Kafka through the feedback door alone (as feedback.reviewed)."""


class EventPublisher:
    """Publishes contract events to their topics, keyed for ordering, with durable delivery."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        producer: str,
        topic_prefix: str = "",
        request_timeout_ms: int = 30_000,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
        sasl_mechanism: SaslMechanism = "SCRAM-SHA-512",
        security_protocol: SecurityProtocol | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ssl_cafile: str | Path | None = None,
        security: KafkaSecurity | None = None,
    ) -> None:
        """Connects in plaintext unless given credentials (SASL/SCRAM) or a CA / SSL context (TLS), or
        a ready `security`; `security_protocol` overrides what the other options imply."""
        if security is None:
            security = KafkaSecurity.of(
                protocol=security_protocol,
                sasl_username=sasl_username,
                sasl_password=sasl_password,
                sasl_mechanism=sasl_mechanism,
                ssl_context=ssl_context,
                ssl_cafile=ssl_cafile,
            )
        self._producer_name = producer
        self._topic_prefix = topic_prefix
        self._kafka = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=request_timeout_ms,
            max_batch_size=PRODUCER_BATCH_BYTES,
            client_id=f"flywheel-publisher-{producer}",
            **security.client_options(),
        )

    async def start(self) -> None:
        await self._kafka.start()

    async def stop(self) -> None:
        await self._kafka.stop()

    async def __aenter__(self) -> EventPublisher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def publish(
        self, payload: P, *, correlation_id: str | None = None, event_id: uuid.UUID | None = None
    ) -> Envelope[P]:
        """Wrap the payload in its envelope and wait until the broker has stored it.

        Raises ReviewerClaimRefused, before anything is sent, for feedback.received claiming source reviewer."""
        if (
            isinstance(payload, FeedbackReceived)
            and payload.event_type == FeedbackReceived.event_type
            and payload.source is FeedbackSource.reviewer
        ):
            raise ReviewerClaimRefused(
                f"{REVIEWER_FEEDBACK_ONLY_ON_ITS_TOPIC}; an app publishes its end users' feedback (source end_user) and the feedback sink dead-letters this claim"
            )
        if (
            isinstance(payload, FeedbackReceived)
            and payload.event_type == FeedbackReceived.event_type
            and payload.names_a_review
        ):
            raise ReviewerClaimRefused(f"{REVIEWS_ONLY_ON_THEIR_TOPIC}; the feedback sink dead-letters this claim")
        envelope = wrap(payload, producer=self._producer_name, correlation_id=correlation_id, event_id=event_id)
        key, value, headers = encode(envelope)
        await self._kafka.send_and_wait(topic_for(payload, self._topic_prefix), value=value, key=key, headers=headers)
        return envelope
