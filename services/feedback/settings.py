"""Settings of the feedback service, its OTLP trace intake and its ClickHouse sink (`FLYWHEEL_FEEDBACK_*`),
read when the app is built.

What personal data becomes before storage is shared with serving: `FLYWHEEL_PRIVACY_*`
(services/runtime/privacy.py `PrivacySettings`; the former `FLYWHEEL_FEEDBACK_PRIVACY_*` names still work).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class FeedbackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_FEEDBACK_", extra="ignore")

    batch_max_records: int = Field(
        default=5000, ge=1, le=100_000, description="Events stored in one ClickHouse insert at most."
    )
    batch_max_wait_ms: int = Field(
        default=500, ge=1, le=60_000, description="How long a batch waits to fill before it is stored anyway."
    )
    batch_min_bytes: int = Field(
        default=256 * 1024, ge=1, description="Bytes the broker gathers before answering a fetch early."
    )
    otlp_max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest body `POST /v1/traces` reads, as sent (gzip or not); a larger one is refused with 413 and nothing is stored.",
    )
    otlp_max_inflated_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest OTLP body once gzip is inflated; a body that inflates past it is refused with 413 as soon as it does, never inflated whole.",
    )
    otlp_max_spans: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Spans one OTLP request may carry; more is refused with 413 (lower the exporter's batch size).",
    )
    otlp_grpc_port: int = Field(
        default=4317,
        ge=0,
        le=65535,
        description="Port of the OTLP/gRPC trace intake (TraceService/Export), on FLYWHEEL_HTTP_HOST; 0 serves none. Replicas on one host share it.",
    )
    publish_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="How long POST /feedback waits for Kafka to take the feedback before answering 503 (nothing is stored; retry).",
    )
    otlp_publish_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="How long the OTLP intake waits for Kafka to take a request's spans before answering 503 (the exporter retries).",
    )

    registry_url: str | None = Field(
        default=None,
        description="Base URL of the registry's door, where review queues read their rubrics (with the defining operator's key); unset: this process's own HTTP address.",
    )
    review_refill_after_s: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="A claim on a review queue with nothing left for its reviewer fills the queue first, at most this often.",
    )

    def batch_options(self) -> dict[str, int]:
        """How the sink's batches close, as the runtime's batch subscription takes them."""
        return {
            "max_records": self.batch_max_records,
            "max_wait_ms": self.batch_max_wait_ms,
            "fetch_min_bytes": self.batch_min_bytes,
        }
