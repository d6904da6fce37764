"""Mixed-adapter batches through stacked LoRA weights (services/runtime/batched_lora.py) on the real
SmolLM2-135M-Instruct, against peft's own loop over each adapter's rows: adapters of different ranks
and target modules, base-model rows among them, and an adapter unloaded while the others keep serving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from services.runtime.base_model import smollm2_weights
from services.runtime.inference import Engine, GenerationRequest, GenerationResult, SamplingParams
from services.runtime.peft_compat import ignore_peft_deprecation
from services.runtime.settings import FlywheelSettings

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.timeout(600)]

# rank, alpha, target modules: one adapter on attention only, one on every projection, one on the MLP's last.
ADAPTERS = {
    "attention": (8, 16, ["q_proj", "v_proj"]),
    "everywhere": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp-out": (16, 32, ["down_proj"]),
}
QUESTIONS = ["Tell me about cats.", "How does rain form?", "Name a spice.", "Why is the sea salty?"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def test_stacked_adapters_answer_as_peft_does_row_by_row(tmp_path: Path) -> None:
    engine = Engine.from_pretrained(smollm2_weights(FlywheelSettings().cache), model_name="smollm2")
    ignore_peft_deprecation()
    for seed, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(engine.model.config)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(str(tmp_path / name))
        engine.load_adapter(name, tmp_path / name)

    def both_ways(adapters: list[str | None]) -> tuple[list[GenerationResult], list[GenerationResult]]:
        requests = [
            GenerationRequest(engine.encode_chat([{"role": "user", "content": QUESTIONS[i % 4]}]), adapter, GREEDY)
            for i, adapter in enumerate(adapters)
        ]
        engine.batched_lora = False
        looped = engine.generate(requests)
        engine.batched_lora = True
        return engine.generate(requests), looped

    stacked, looped = both_ways(["attention", None, "everywhere", "mlp-out", "attention", "everywhere"])
    assert [a.token_ids for a in stacked] == [a.token_ids for a in looped]
    for mine, peft in zip(stacked, looped, strict=True):
        assert mine.token_logprobs == pytest.approx(peft.token_logprobs, abs=1e-4)
    # Each adapter does change its row's answer: the comparison is not of base-model rows in disguise.
    plain, _ = both_ways([None] * 6)
    changed = [
        a.token_ids != p.token_ids
        or max(abs(x - y) for x, y in zip(a.token_logprobs, p.token_logprobs, strict=True)) > 1e-3
        for a, p in zip(stacked, plain, strict=True)
    ]
    assert changed == [True, False, True, True, True, True]

    engine.unload_adapter("everywhere")
    stacked, looped = both_ways(["mlp-out", None, "attention", "mlp-out"])
    assert [a.token_ids for a in stacked] == [a.token_ids for a in looped]
    for mine, peft in zip(stacked, looped, strict=True):
        assert mine.token_logprobs == pytest.approx(peft.token_logprobs, abs=1e-4)
