"""Prometheus metrics shared by the runtime. Services define their own beside their code, on the
same default registry, so one `/metrics` per process shows them all."""

from prometheus_client import Counter

CONSUMER_MESSAGES = Counter(
    "flywheel_consumer_messages_total",
    "Messages settled by idempotent consumers, by outcome (processed, duplicate, dead_lettered).",
    ["group", "event_type", "outcome"],
)
