"""The models under evaluation, in process: base weights plus an optional LoRA adapter, greedy answers and perplexity.

Why in process and not through the serving gateway: a candidate is evaluated before any stage is
given to it, and serving loads adapters only for staging/production or a deployment request; the
gateway also offers no log-probabilities, which perplexity needs, and would log evaluation traffic
as production inferences. Decoding mirrors serving's engine for greedy requests (same weights in
float32, the tokenizer's chat template with the generation prompt, argmax each step, stop at eos or
max_tokens), so what is measured is what serving answers at temperature 0. Sharing the engine class
itself needs it moved into the runtime (services may not import serving).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.runtime.peft_compat import peft_wrap_quietly


class ModelLoadError(RuntimeError):
    """The base model or the adapter could not be loaded."""


@dataclass(frozen=True)
class Generation:
    text: str
    latency_ms: float  # wall time of the batch the answer was generated in
    completion_tokens: int


class LoadedModel:
    def __init__(self, model: Any, tokenizer: Any, *, label: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = label
        self._eos = tokenizer.eos_token_id
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self._eos or 0)

    @classmethod
    def load(cls, base_dir: Path, *, adapter_dir: Path | None = None, gguf_file: str | None = None, label: str = "model") -> LoadedModel:
        """Load base weights (a Hugging Face directory, or a GGUF file in one) and wrap them with the adapter."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **kwargs)
        except Exception as error:
            raise ModelLoadError(f"base model of {label} failed to load from {base_dir}: {type(error).__name__}: {error}") from error
        if adapter_dir is not None:
            from peft import PeftModel

            try:
                with peft_wrap_quietly():
                    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
            except Exception as error:
                raise ModelLoadError(f"adapter of {label} failed to load from {adapter_dir}: {type(error).__name__}: {error}") from error
        return cls(model, tokenizer, label=label)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(self, prompts: Sequence[Sequence[dict[str, str]]], *, max_tokens: int, batch_size: int = 8) -> list[Generation]:
        """Greedy answers, `batch_size` prompts per forward pass."""
        out: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            batch = [self.prompt_ids(messages) for messages in prompts[start : start + batch_size]]
            began = time.perf_counter()
            tokens = self._greedy(batch, max_tokens)
            elapsed = (time.perf_counter() - began) * 1000
            out.extend(Generation(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), elapsed, len(ids)) for ids in tokens)
        return out

    def _greedy(self, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
        import torch
        from transformers.cache_utils import DynamicCache

        width = max(len(ids) for ids in batch)
        # Left padding keeps every row's next token in the last column, as serving's engine does.
        input_ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        outputs: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        step = input_ids
        with torch.inference_mode():
            for _ in range(max_tokens):
                logits = self.model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1, :]
                chosen = logits.argmax(-1)
                for row, token in enumerate(chosen.tolist()):
                    if done[row]:
                        continue
                    if token == self._eos:
                        done[row] = True
                    else:
                        outputs[row].append(token)
                if all(done):
                    break
                step = chosen.unsqueeze(-1)
                mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=-1)
                positions = positions[:, -1:] + 1
        return outputs

    def perplexity(self, prompts: Sequence[Sequence[dict[str, str]]], references: Sequence[str]) -> list[float]:
        """exp(mean negative log-likelihood of the reference answer's tokens, and eos, given the prompt)."""
        import torch

        values = []
        with torch.inference_mode():
            for messages, reference in zip(prompts, references, strict=True):
                prompt = self.prompt_ids(messages)
                answer = self.tokenizer.encode(reference, add_special_tokens=False) + ([self._eos] if self._eos is not None else [])
                ids = torch.tensor([prompt + answer], dtype=torch.long)
                logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1, :].float()
                nll = torch.nn.functional.cross_entropy(logits, torch.tensor(answer, dtype=torch.long))
                values.append(math.exp(float(nll)))
        return values
