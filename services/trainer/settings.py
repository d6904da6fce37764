"""Trainer settings, read from `FLYWHEEL_TRAINER_*` when the app is built."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_TRAINER_", extra="ignore")

    checkpoint_every: int = Field(default=20, ge=1, description="Optimiser steps between checkpoints.")
    progress_every: int = Field(default=5, ge=1, description="Optimiser steps between training.progress events.")
    input_wait_s: float = Field(
        default=60.0,
        ge=0,
        description="How long a job waits for its model.registered / dataset.published to arrive before failing.",
    )
    publish_retry_initial_s: float = Field(
        default=0.5,
        gt=0,
        description="First wait before republishing a terminal event the broker did not acknowledge; doubles each retry.",
    )
    publish_retry_max_s: float = Field(default=30.0, gt=0, description="Longest wait between republishing attempts.")
    stop_pause_s: float = Field(
        default=120.0,
        ge=0,
        description="How long a stopping trainer waits for the training step in flight to end and checkpoint.",
    )
    stop_drain_s: float = Field(
        default=5.0, ge=0, description="How long a stopping trainer tries to publish its staged terminal events."
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads for torch; 0: the cores other processes leave free, measured as each job starts (OMP_NUM_THREADS, when set, is kept).",
    )
