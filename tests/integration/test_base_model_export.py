"""The packaged base model's safetensors export is the GGUF's model: the same tensors, the same tokens.

Serving, the evaluator, the trainer and the registry's import load the export instead of the GGUF
(seconds instead of ~15 s per load); this is what makes that substitution invisible to users.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.runtime.base_model import SMOLLM2_GGUF, smollm2_dir, smollm2_weights
from services.runtime.settings import FlywheelSettings

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.timeout(600)]


def test_the_export_holds_the_ggufs_tensors_and_tokenizes_chats_alike() -> None:
    export = smollm2_weights(FlywheelSettings().cache)
    from_gguf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
    expected, actual = from_gguf.state_dict(), exported.state_dict()
    assert expected.keys() == actual.keys()
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, f"tensors differ from the GGUF's: {differing[:5]}"
    assert exported.config.architectures == ["LlamaForCausalLM"]

    chat = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Qu'est-ce que 2 + 2 ? <|im_end|> ünïcødé 🙂"},
    ]
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)
    export_tokenizer = AutoTokenizer.from_pretrained(str(export))
    assert export_tokenizer.apply_chat_template(chat, add_generation_prompt=True) == gguf_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (export_tokenizer.eos_token_id, export_tokenizer.pad_token_id) == (
        gguf_tokenizer.eos_token_id,
        gguf_tokenizer.pad_token_id,
    )
