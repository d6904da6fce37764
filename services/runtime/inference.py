"""One base model and many LoRA adapters in one torch model, generating for mixed-adapter batches.

Each decode step is one forward pass over the whole batch: peft routes every row through its own
adapter (`adapter_names`, "__base__" for none), the way S-LoRA / Punica batch adapters, instead of
swapping adapters between requests. The decode loop is our own, not `generate`, because sampling
parameters (temperature, top_p, seed, stop, max_tokens) are per request, finished rows leave the
batch (and the KV cache) so that one long request does not make the short ones pay, and new rows
join a running batch between steps (`DecodeBatch.absorb`, driven by serving's continuous batcher).
The evaluator generates through this same engine, so what it measures is what serving answers.

The engine computes in float32, or in bfloat16 when asked (`engine_dtype`: `auto` takes bfloat16 where
the hardware computes it natively); logits are sampled in float32 either way. On the 2-core AMD EPYC with
AVX-512-BF16, bfloat16 was 2 to 3 times faster (`flywheel bench dtype`), but it is not the default: an
adapter trained in float32 lost the facts the gate checks when served in bfloat16 (see
docs/explanation/serving.md, "The engine's dtype").
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import CacheLayerMixin, DynamicCache

from services.runtime.batched_lora import BatchedLora
from services.runtime.peft_compat import ignore_peft_deprecation

log = logging.getLogger("flywheel.runtime.inference")

EngineDtype = Literal["auto", "float32", "bfloat16"]

BASE = "__base__"
"""The adapter name peft uses for rows that go through the base model alone."""


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
    finish_reason: str  # "stop" (eos or a stop sequence), "length", or "error" (then `error` says why)
    prompt_tokens: int
    completion_tokens: int
    error: str = ""
    queue_ms: float = 0.0  # waiting to join a batch (set by the continuous batcher)
    compute_ms: float = 0.0  # from joining to the last token
    # Wall-clock instants (unix ns) of the same three moments, for spans that other processes place on a
    # timeline; the durations above come from the monotonic clock and stay right across clock steps.
    queued_at_ns: int = 0
    admitted_at_ns: int = 0
    finished_at_ns: int = 0
    # The log-probability of each token of `token_ids` under the model's own distribution (before
    # temperature and top_p shape the draw): how sure the model was of what it said.
    token_logprobs: list[float] = field(default_factory=list)


@dataclass
class Row:
    request: GenerationRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str = ""

    def result(self) -> GenerationResult:
        return GenerationResult(
            self.tokens,
            self.text,
            self.finish_reason or "length",
            len(self.request.prompt_ids),
            len(self.tokens),
            self.error,
            token_logprobs=self.logprobs,
        )

    def stable_text(self) -> str:
        """The part of `text` later tokens cannot change, safe to stream: all of it once finished.

        Before that, an incomplete UTF-8 character (decoded as U+FFFD) is held back, and so is a
        tail that could still grow into a stop sequence, because a stop is cut from the answer and
        what was already streamed of it could not be taken back.
        """
        if self.finish_reason is not None:
            return self.text
        text = self.text.rstrip("\ufffd")
        held = max(
            (size for stop in self.request.params.stop for size in range(1, len(stop)) if text.endswith(stop[:size])),
            default=0,
        )
        return text[: len(text) - held]


@dataclass
class DecodeBatch:
    """Rows mid-generation and their shared KV cache, left-padded so every row's next token is the last column.

    Each row has sampled a token that is not in the cache yet (`pending`); one `step` feeds all of
    them at once. Batches prefilled at different times are merged by left-padding the shorter cache,
    which is what lets new requests join between decode steps (continuous batching).
    """

    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cached tokens]: 1 where the cache holds a real token
    positions: torch.Tensor  # [rows, 1]: position id of each pending token
    pending: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, slots: list[int]) -> None:
        index = torch.tensor(slots, dtype=torch.long)
        self.rows = [self.rows[slot] for slot in slots]
        self.pending = [self.pending[slot] for slot in slots]
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        # Columns that only the departed rows needed are padding for everyone left: drop them.
        real = self.mask.any(dim=0).nonzero()
        first = int(real[0]) if len(real) else self.mask.shape[1]
        if first:
            self.mask = self.mask[:, first:]
            for layer, keys, values in map(_filled_attention, self.cache.layers):
                layer.keys, layer.values = keys[:, :, first:], values[:, :, first:]

    def absorb(self, other: DecodeBatch) -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        # DynamicLayer keeps [batch, heads, tokens, head_dim] tensors in `keys`/`values`; padded
        # columns are masked out, so zeros there are never attended to.
        for (mine, keys, values), (_, their_keys, their_values) in zip(
            map(_filled_attention, self.cache.layers), map(_filled_attention, other.cache.layers), strict=True
        ):
            mine.keys = torch.cat([_left_pad(keys, width, dim=2), _left_pad(their_keys, width, dim=2)])
            mine.values = torch.cat([_left_pad(values, width, dim=2), _left_pad(their_values, width, dim=2)])
        self.rows += other.rows
        self.pending += other.pending
        self.positions = torch.cat([self.positions, other.positions])


def _filled_attention(layer: object) -> tuple[CacheLayerMixin, torch.Tensor, torch.Tensor]:
    """A cache layer with its keys and values; rows can only be trimmed and merged in such layers."""
    if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
        raise TypeError(f"batched decoding needs attention layers with a filled KV cache, not {type(layer).__name__}")
    return layer, layer.keys, layer.values


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class Engine:
    """Thread-safe: Triton calls `generate` from its own thread while adapters come and go from handlers."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, model_name: str = "base") -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        model.eval()  # type: ignore[no-untyped-call]  # transformers overrides Module.eval() without annotations
        self._base = model
        self._peft: PeftModel | None = None
        self._adapters: dict[str, str] = {}
        # Rows of different adapters in one pass (services/runtime/batched_lora.py); None: peft's own loop.
        self._batched: BatchedLora | None = None
        # False sends mixed batches through peft's loop: what the serve benchmark compares against.
        self.batched_lora = True
        # One lock for generation and adapter changes: peft's layer dicts must not change mid-forward.
        self._lock = threading.RLock()
        self._eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, model_name: str = "base", dtype: EngineDtype = "float32") -> Engine:
        """Load a causal LM from a Hugging Face directory, in `dtype` (`auto`: see `engine_dtype`)."""
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=engine_dtype(dtype))
        return cls(model, tokenizer, model_name=model_name)

    @property
    def dtype(self) -> str:
        """The dtype the base model computes in: `float32` or `bfloat16`."""
        return str(self._base.dtype).removeprefix("torch.")

    @property
    def model(self) -> PreTrainedModel:
        """The torch model serving now: the base alone, or wrapped by peft once an adapter is loaded."""
        return self._peft if self._peft is not None else self._base  # type: ignore[return-value]

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
            ignore_peft_deprecation()
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self._base, str(path), adapter_name=name, is_trainable=False
                ).eval()
            else:
                self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
            self._adapters[name] = str(path)
            self._stack_adapters()
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
            self._stack_adapters()
        log.info("adapter %s unloaded", name)

    def _stack_adapters(self) -> None:
        """Stack the loaded adapters' weights again for mixed batches, or fall back to peft's loop when
        some adapter cannot be stacked exactly (BatchedLora says which)."""
        batched = BatchedLora(self._peft, list(self._adapters)) if self._peft is not None else None
        self._batched = batched if batched is not None and batched.supported else None
        if batched is not None and not batched.supported:
            log.info("an adapter is not plain LoRA on linear layers: mixed batches go through peft's loop")

    # ----------------------------------------------------------------------------- generation

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.encode(cast("str", text))  # tokenize=False: the template rendered as one string

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for every request in one static batch, each with its own adapter and sampling parameters."""
        if not requests:
            return []
        with self._lock:
            for request in requests:
                if request.adapter not in (None, BASE) and request.adapter not in self._adapters:
                    raise UnknownAdapterError(request.adapter)
        rows = [self.new_row(request) for request in requests]
        batch = self.prefill(rows)
        while batch is not None and len(batch):
            self.step(batch)
        return [row.result() for row in rows]

    def new_row(self, request: GenerationRequest) -> Row:
        if not request.prompt_ids:
            raise ValueError("a prompt needs at least one token")
        return Row(request, _generator(request.params.seed))

    @torch.inference_mode()
    def prefill(self, rows: list[Row]) -> DecodeBatch | None:
        """Run the prompts of `rows` and sample each one's first token; rows already finished are left out."""
        with self._lock:
            rows = self._drop_unloaded(rows)
            if not rows:
                return None
            width = max(len(row.request.prompt_ids) for row in rows)
            input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for index, row in enumerate(rows):
                ids = list(row.request.prompt_ids)
                input_ids[index, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                mask[index, width - len(ids) :] = 1
            cache = DynamicCache()
            logits = self._forward(rows, input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
            batch = DecodeBatch(rows, cache, mask, mask.sum(-1, keepdim=True), [])
            self._sample_all(batch, logits)
            return batch

    @torch.inference_mode()
    def step(self, batch: DecodeBatch) -> None:
        """One decode step for every row of `batch`: feed the pending tokens, sample the next ones."""
        with self._lock:
            loaded = [slot for slot, row in enumerate(batch.rows) if self._is_loaded(row)]
            if len(loaded) < len(batch):
                self._fail_unloaded(batch.rows)
                batch.keep(loaded)
            if not len(batch):
                return
            mask = torch.cat([batch.mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=-1)
            step_input = torch.tensor(batch.pending, dtype=torch.long).unsqueeze(-1)
            logits = self._forward(batch.rows, step_input, mask, batch.positions, batch.cache)
            batch.mask, batch.positions = mask, batch.positions + 1
            self._sample_all(batch, logits)

    def _forward(
        self, rows: list[Row], input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        model = self._peft if self._peft is not None else self._base
        kwargs = {}
        stacked: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self._batched is not None and self.batched_lora:
            stacked = self._batched.rows([row.request.adapter for row in rows])
        elif self._peft is not None:
            kwargs["adapter_names"] = [row.request.adapter or BASE for row in rows]
        # logits_to_keep=1: only the last column is sampled; a prefill's full [rows, tokens, vocab]
        # logits would cost a quarter of the forward pass on a small model.
        with stacked:
            out = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def _sample_all(self, batch: DecodeBatch, logits: torch.Tensor) -> None:
        tokens = [self._sample(logits[slot], row) for slot, row in enumerate(batch.rows)]
        batch.pending = tokens
        # One log-softmax for the batch: a few microseconds a row against a step's milliseconds.
        chosen = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
        keep = [
            slot
            for slot, (row, token, logprob) in enumerate(zip(batch.rows, tokens, chosen, strict=True))
            if self._advance(row, token, logprob, total_len=len(row.request.prompt_ids))
        ]
        if len(keep) < len(batch):
            batch.keep(keep)

    def _is_loaded(self, row: Row) -> bool:
        return row.request.adapter in (None, BASE) or row.request.adapter in self._adapters

    def _fail_unloaded(self, rows: list[Row]) -> None:
        for row in rows:
            if not self._is_loaded(row):
                row.finish_reason, row.error = "error", f"adapter {row.request.adapter!r} is not loaded"

    def _drop_unloaded(self, rows: list[Row]) -> list[Row]:
        self._fail_unloaded(rows)
        return [row for row in rows if self._is_loaded(row)]

    def _sample(self, logits: torch.Tensor, row: Row) -> int:
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

    def _advance(self, row: Row, token: int, logprob: float, *, total_len: int) -> bool:
        """Append `token` to the row; False once the row is finished."""
        params = row.request.params
        if token in self._eos:
            row.finish_reason = "stop"
            return False
        row.tokens.append(token)
        row.logprobs.append(logprob)
        row.text = cast(
            "str", self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        )  # one sequence decodes to one string
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


def engine_dtype(choice: EngineDtype) -> torch.dtype:
    """The dtype an engine computes in: `auto` is bfloat16 where the hardware computes it natively (AMX or
    AVX-512-BF16, a CUDA GPU with bf16), float32 elsewhere, where emulated bfloat16 is slower than float32."""
    from services.runtime.cpu import bf16_native

    if choice == "auto":
        return torch.bfloat16 if bf16_native() else torch.float32
    return torch.bfloat16 if choice == "bfloat16" else torch.float32


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
