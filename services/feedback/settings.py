"""Settings of the feedback service and its ClickHouse sink (`FLYWHEEL_FEEDBACK_*`), read when the app is built.

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

    def batch_options(self) -> dict[str, int]:
        """How the sink's batches close, as the runtime's batch subscription takes them."""
        return {
            "max_records": self.batch_max_records,
            "max_wait_ms": self.batch_max_wait_ms,
            "fetch_min_bytes": self.batch_min_bytes,
        }
