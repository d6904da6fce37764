"""The envelope every Flywheel event travels in, and the base class of every event payload."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ContractModel(BaseModel):
    """Base of every model on the wire. Unknown fields are ignored so that a consumer built against
    an older minor schema keeps reading events that gained optional fields."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Payload(ContractModel):
    """Base of every event payload. Subclasses declare their event type, topic and partition key."""

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    # Name of the payload field (or property) whose value is the Kafka message key: events with the
    # same key land on the same partition and are consumed in the order they were produced.
    key_field: ClassVar[str]
    partitions: ClassVar[int] = 3
    # How long the topic keeps records: None is the broker's default; -1 keeps them forever, for the
    # registry's state events, which a serving replica replays from the start to rebuild its routes.
    retention_ms: ClassVar[int | None] = None

    def partition_key(self) -> str:
        return str(getattr(self, self.key_field))


P = TypeVar("P", bound=Payload)


class Envelope(ContractModel, Generic[P]):
    """What goes on the wire: the payload plus the metadata every consumer relies on."""

    event_id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        description="Unique id of this event; consumers deduplicate on it (the idempotency key).",
    )
    event_type: str = Field(description="Dotted event name, e.g. `inference.logged`; equals the payload's type.")
    schema_version: int = Field(description="Major version of the payload schema; fields are only added within one.")
    occurred_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="When the event happened (UTC)."
    )
    producer: str = Field(description="Who produced it: a service name or an app's name.")
    correlation_id: str | None = Field(
        default=None,
        description="One id that follows a model version from training request to production, "
        "or a request from gateway to feedback.",
    )
    payload: P = Field(description="The event itself.")

    @model_validator(mode="after")
    def _event_type_matches_payload(self) -> Envelope[P]:
        # A message on the wrong topic could otherwise validate by accident, since unknown
        # fields are ignored for forward compatibility.
        expected = getattr(type(self.payload), "event_type", None)
        if expected is not None and self.event_type != expected:
            raise ValueError(f"event_type {self.event_type!r} does not match payload type {expected!r}")
        return self


def wrap(
    payload: P, *, producer: str, correlation_id: str | None = None, event_id: uuid.UUID | None = None
) -> Envelope[P]:
    """Put a payload in its envelope, filling event type and schema version from the payload class."""
    fields: dict[str, Any] = {
        "event_type": payload.event_type,
        "schema_version": payload.schema_version,
        "producer": producer,
        "correlation_id": correlation_id,
        "payload": payload,
    }
    if event_id is not None:
        fields["event_id"] = event_id
    # Parametrized with the payload's own class so that validation and serialization use its fields;
    # a class computed at runtime is not a type expression mypy can follow.
    envelope_class = cast("type[Envelope[P]]", Envelope[type(payload)])  # type: ignore[misc]
    return envelope_class(**fields)
