"""Loading a base model for training: a directory of safetensors (what the registry stores), or a GGUF file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def pick_device() -> torch.device:
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def base_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it (half the memory and bandwidth); float32 on the CPU, where bf16 matmuls are slow."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def gguf_in(path: Path) -> tuple[Path, str] | None:
    """(directory, file name) when `path` is a .gguf file or a directory holding exactly one and no config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return path, found[0].name
    return None


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


def export_gguf(gguf_path: Path, target: Path) -> Path:
    """Write a GGUF model as a safetensors directory (dequantized); loading that is much faster than the GGUF.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the state dict and the config
    are written directly. The directory appears atomically: a concurrent caller sees all or nothing.
    """
    from safetensors.torch import save_model

    if (target / "config.json").exists():
        return target
    gguf = gguf_in(gguf_path)
    if gguf is None:
        raise ValueError(f"{gguf_path} is not a GGUF file")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf[0], gguf_file=gguf[1], dtype=torch.float32)
    tokenizer = load_tokenizer(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".export-"))
    try:
        # save_model drops tied duplicates (lm_head = embed_tokens), which save_file would refuse.
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
