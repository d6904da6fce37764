"""Loading a base model for training: a directory of safetensors (what the registry stores), or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from services.runtime.base_model import gguf_in


def pick_device() -> torch.device:
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def base_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it (half the memory and bandwidth); float32 on the CPU, where bf16 matmuls are slow."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    gguf = gguf_in(path)
    tokenizer = (
        AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1]) if gguf else AutoTokenizer.from_pretrained(path)
    )
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer at {path} has no chat template; a chat model is needed")
    return tokenizer


def load_model(path: Path, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    gguf = gguf_in(path)
    dtype = base_dtype(device)
    if gguf:
        model = AutoModelForCausalLM.from_pretrained(gguf[0], gguf_file=gguf[1], dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)
