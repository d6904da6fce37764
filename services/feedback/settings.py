"""Settings of the feedback service and its ClickHouse sink (`FLYWHEEL_FEEDBACK_*`), read when the app is built."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.feedback.privacy import PrivacyPolicy


class FeedbackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_FEEDBACK_", extra="ignore")

    batch_max_records: int = Field(default=5000, ge=1, le=100_000, description="Events stored in one ClickHouse insert at most.")
    batch_max_wait_ms: int = Field(default=500, ge=1, le=60_000, description="How long a batch waits to fill before it is stored anyway.")
    batch_min_bytes: int = Field(default=256 * 1024, ge=1, description="Bytes the broker gathers before answering a fetch early.")
    privacy_policy: PrivacyPolicy = Field(default=PrivacyPolicy.redact, description="redact, hash or off: what happens to personal data before storage.")
    privacy_salt: str = Field(default="", description="Salt of the `hash` policy; without one, a hashed email can be guessed from a list of emails.")
    privacy_patterns: dict[str, str] = Field(default_factory=dict, description='Extra patterns as JSON, e.g. {"employee_id": "EMP-\\\\d{6}"}.')

    failpoint_clickhouse_unavailable: Path | None = Field(
        default=None,
        description="Failpoint for outage tests: while this file exists the sink's store fails every statement as if ClickHouse were down. Leave unset in production.",
    )

    @field_validator("privacy_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: dict[str, str]) -> dict[str, str]:
        for name, pattern in patterns.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                raise ValueError(f"pattern name {name!r} must be letters, digits and _")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"pattern {name!r} is not a valid regular expression: {error}") from None
        return patterns
