"""Settings of the monitor (`FLYWHEEL_MONITOR_*`), read when the app is built."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.events import Hyperparameters
from services.monitor.rules import DEFAULT_RULES


class MonitorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_MONITOR_", extra="ignore")

    rules_path: Path = Field(default=DEFAULT_RULES, description="YAML file of alert rules and the canary policy (`canary:`); a rule that cannot run stops the start with the reason.")
    tick_s: float = Field(default=60.0, gt=0, description="Seconds between rule evaluations.")
    registry_url: str | None = Field(default=None, description="Base URL of the registry's door; unset: this process's own HTTP address.")
    api_key: str | None = Field(default=None, description="API key (operator) the monitor calls the registry with.")
    retrain_min_corrections: int = Field(default=20, ge=1, description="Corrected answers needed before a retraining is requested.")
    retrain_cooldown_s: int = Field(default=6 * 3600, ge=0, description="Seconds between two retrainings of one model.")
    retrain_include_lineage: bool = Field(default=True, description="Retrain on the production adapter's training data plus the corrections (it keeps what it knew); false: on the corrections alone.")
    retrain_correction_repeats: int = Field(default=1, ge=1, le=50, description="Times each correction appears in the retraining dataset, so a few corrections weigh against the production adapter's data.")
    retrain_hyperparameters: Hyperparameters | None = Field(default=None, description="LoRA settings of a retraining, as JSON; unset: the production adapter's (from its lineage), else the trainer's defaults.")
    console_hours: int = Field(default=24, ge=1, le=24 * 90, description="Hours of history the console shows.")
    console_session_s: int = Field(default=8 * 3600, ge=60, description="Seconds a console sign-in (its HttpOnly cookie) lasts.")
