"""The models under evaluation, in process: base weights plus an optional LoRA adapter, greedy answers and perplexity.

Why in process and not through the serving gateway: a candidate is evaluated before any stage is
given to it, and serving loads adapters only for staging/production or a deployment request; the
gateway also offers no log-probabilities, which perplexity needs, and would log evaluation traffic
as production inferences. Answers come from the inference engine serving itself runs
(services/runtime/inference.py: the same weights, chat template, decode loop and stopping rules),
so what is measured is exactly what serving answers at temperature 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.runtime.cpu import use_free_cpus
from services.runtime.inference import Engine, EngineDtype, GenerationRequest, SamplingParams

CANDIDATE = "candidate"
"""The engine's name for the one adapter under evaluation."""


class ModelLoadError(RuntimeError):
    """The base model or the adapter could not be loaded."""


@dataclass(frozen=True)
class Generation:
    text: str
    latency_ms: float  # wall time of the batch the answer was generated in
    completion_tokens: int


class LoadedModel:
    def __init__(self, engine: Engine, *, adapter: str | None, label: str) -> None:
        self.engine = engine
        self.adapter = adapter
        self.label = label

    @classmethod
    def load(
        cls, base_dir: Path, *, adapter_dir: Path | None = None, label: str = "model", dtype: EngineDtype = "float32"
    ) -> LoadedModel:
        """Load base weights (a Hugging Face directory) and the adapter on top."""
        use_free_cpus()
        try:
            engine = Engine.from_pretrained(base_dir, model_name=label, dtype=dtype)
        except Exception as error:
            raise ModelLoadError(
                f"base model of {label} failed to load from {base_dir}: {type(error).__name__}: {error}"
            ) from error
        if adapter_dir is None:
            return cls(engine, adapter=None, label=label)
        try:
            engine.load_adapter(CANDIDATE, adapter_dir)
        except Exception as error:
            raise ModelLoadError(
                f"adapter of {label} failed to load from {adapter_dir}: {type(error).__name__}: {error}"
            ) from error
        return cls(engine, adapter=CANDIDATE, label=label)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.engine.encode_chat(messages)

    def generate(
        self, prompts: Sequence[Sequence[dict[str, str]]], *, max_tokens: int, batch_size: int = 8
    ) -> list[Generation]:
        """Greedy answers, `batch_size` prompts per batch."""
        greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        out: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            requests = [
                GenerationRequest(self.prompt_ids(messages), self.adapter, greedy)
                for messages in prompts[start : start + batch_size]
            ]
            began = time.perf_counter()
            results = self.engine.generate(requests)
            elapsed = (time.perf_counter() - began) * 1000
            out.extend(Generation(result.text.strip(), elapsed, result.completion_tokens) for result in results)
        return out

    def perplexity(self, prompts: Sequence[Sequence[dict[str, str]]], references: Sequence[str]) -> list[float]:
        """exp(mean negative log-likelihood of the reference answer's tokens, and eos, given the prompt)."""
        import torch

        eos = self.engine.tokenizer.eos_token_id
        model = self.engine.model  # the adapter, when there is one, is the active one
        values = []
        with torch.inference_mode():
            for messages, reference in zip(prompts, references, strict=True):
                prompt = self.prompt_ids(messages)
                answer = self.engine.encode(reference) + ([eos] if eos is not None else [])
                ids = torch.tensor([prompt + answer], dtype=torch.long)
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1, :].float()
                nll = torch.nn.functional.cross_entropy(logits, torch.tensor(answer, dtype=torch.long))
                values.append(math.exp(float(nll)))
        return values
