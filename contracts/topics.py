"""Topic names, in one place. A topic carries one event type and is named after it.

`prefix` lets tests and side-by-side deployments use their own topics on a shared broker
(`FLYWHEEL_TOPIC_PREFIX`); production leaves it empty.
"""

from __future__ import annotations

from contracts.envelope import Payload
from contracts.events import EVENTS

DLQ_SUFFIX = ".dlq"

EVENT_TYPES: dict[str, type[Payload]] = {event.event_type: event for event in EVENTS}


def topic_for(event: type[Payload] | Payload | str, prefix: str = "") -> str:
    """The topic an event type is published on."""
    event_type = event if isinstance(event, str) else event.event_type
    if event_type not in EVENT_TYPES:
        raise KeyError(f"unknown event type {event_type!r}; known: {', '.join(sorted(EVENT_TYPES))}")
    return f"{prefix}{event_type}"


def dlq_for(topic: str) -> str:
    """The dead-letter topic that receives a topic's poison messages."""
    return f"{topic}{DLQ_SUFFIX}"


def retained_topics(prefix: str = "") -> dict[str, int]:
    """Topics whose records are kept for a set time (ms; -1: forever) instead of the broker's default."""
    return {topic_for(event, prefix): event.retention_ms for event in EVENTS if event.retention_ms is not None}


def all_topics(prefix: str = "") -> dict[str, int]:
    """Every topic with its partition count, dead-letter topics included (one partition each)."""
    topics: dict[str, int] = {}
    for event in EVENTS:
        topic = topic_for(event, prefix)
        topics[topic] = event.partitions
        topics[dlq_for(topic)] = 1
    return topics
