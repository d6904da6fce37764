"""Settings of the monitor (`FLYWHEEL_MONITOR_*`), read when the app is built."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.events import Hyperparameters
from services.monitor.rules import DEFAULT_RULES
from services.runtime.clickhouse.query_guard import QueryLimits


class MonitorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_MONITOR_", extra="ignore")

    rules_path: Path = Field(
        default=DEFAULT_RULES,
        description="YAML file of alert rules and the canary policy (`canary:`); a rule that cannot run stops the start with the reason.",
    )
    tick_s: float = Field(default=60.0, gt=0, description="Seconds between rule evaluations.")
    registry_url: str | None = Field(
        default=None, description="Base URL of the registry's door; unset: this process's own HTTP address."
    )
    api_key: str | None = Field(default=None, description="API key (operator) the monitor calls the registry with.")
    retrain_min_corrections: int = Field(
        default=20,
        ge=1,
        description="Corrected answers (sft), or preference pairs (dpo), or each of both (sft_then_dpo), needed before a retraining is requested.",
    )
    retrain_method: Literal["sft", "dpo", "sft_then_dpo"] = Field(
        default="sft",
        description="sft: production's training data plus the corrections; dpo: preference pairs from the feedback, trained with DPO going on from production's adapter (SFT then DPO) when it has one; sft_then_dpo: both in one job, SFT on production's data plus the corrections, then DPO on the pairs from that SFT adapter, which is also DPO's reference.",
    )
    retrain_cooldown_s: int = Field(default=6 * 3600, ge=0, description="Seconds between two retrainings of one model.")
    retrain_include_lineage: bool = Field(
        default=True,
        description="Retrain on the production adapter's training data plus the corrections (it keeps what it knew); false: on the corrections alone.",
    )
    retrain_correction_repeats: int = Field(
        default=1,
        ge=1,
        le=50,
        description="Times each correction appears in the retraining dataset, so a few corrections weigh against the production adapter's data.",
    )
    retrain_hyperparameters: Hyperparameters | None = Field(
        default=None,
        description="LoRA settings of a retraining, as JSON; unset: the production adapter's (from its lineage), else the trainer's defaults.",
    )
    console_hours: int = Field(default=24, ge=1, le=24 * 90, description="Hours of history the console shows.")
    query_clickhouse_url: str | None = Field(
        default=None,
        description="ClickHouse server URL of the query door's own user (SELECT on Flywheel's tables only); unset: the process's FLYWHEEL_CLICKHOUSE_URL. Needs a server: embedded chDB has no users.",
    )
    query_max_execution_s: int = Field(
        default=QueryLimits.max_execution_time_s,
        ge=1,
        le=3600,
        description="Seconds a query door query may run (max_execution_time).",
    )
    query_max_result_rows: int = Field(
        default=QueryLimits.max_result_rows,
        ge=1,
        description="Rows a query door result may have; more is a 400 (max_result_rows, result_overflow_mode=throw).",
    )
    query_max_result_bytes: int = Field(
        default=QueryLimits.max_result_bytes,
        ge=1024,
        description="Bytes a query door result may have; more is a 400 (max_result_bytes).",
    )
    query_max_memory_bytes: int = Field(
        default=QueryLimits.max_memory_usage,
        ge=1024 * 1024,
        description="Memory one query door query may use (max_memory_usage).",
    )

    def query_limits(self) -> QueryLimits:
        """The caps every query through the door runs under."""
        return QueryLimits(
            max_execution_time_s=self.query_max_execution_s,
            max_result_rows=self.query_max_result_rows,
            max_result_bytes=self.query_max_result_bytes,
            max_memory_usage=self.query_max_memory_bytes,
        )
