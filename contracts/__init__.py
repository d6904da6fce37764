"""Flywheel's shared vocabulary: events (in envelopes, with topics and keys), HTTP models, and a typed
publisher. Imports nothing of the platform; depends only on pydantic and aiokafka."""

from contracts.envelope import ContractModel, Envelope, Payload, wrap
from contracts.events import EVENTS
from contracts.topics import EVENT_TYPES, all_topics, dlq_for, topic_for

__all__ = [
    "EVENTS",
    "EVENT_TYPES",
    "ContractModel",
    "Envelope",
    "Payload",
    "all_topics",
    "dlq_for",
    "topic_for",
    "wrap",
]
