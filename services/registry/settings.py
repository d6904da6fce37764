"""Registry settings (FLYWHEEL_REGISTRY_*), read when the app is built."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_REGISTRY_", extra="ignore")

    max_dataset_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1, description="Largest dataset upload accepted, in bytes."
    )
    outbox_interval_s: float = Field(
        default=0.5, gt=0, description="How often the outbox relay polls for committed events."
    )
