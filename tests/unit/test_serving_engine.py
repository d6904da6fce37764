"""The engine: mixed-adapter batches give the tokens sequential serving gives; adapters come and go."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.runtime.inference import BASE, Engine, GenerationRequest, SamplingParams, UnknownAdapterError
from tests.serving_support import make_adapter, smollm2_tokenizer, tiny_engine, tiny_model

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        f"a{seed}": make_adapter(len(tokenizer), root / f"a{seed}", seed=seed, rank=2 + seed) for seed in range(1, 4)
    }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return smollm2_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def engine(tokenizer, adapter_dirs: dict[str, Path]) -> Engine:
    engine = tiny_engine(tokenizer)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    return engine


def prompt(engine: Engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def test_adapters_change_the_output(engine: Engine) -> None:
    ids = prompt(engine, "Name a colour.")
    outputs = {
        adapter: tuple(engine.generate([GenerationRequest(ids, adapter, GREEDY)])[0].token_ids)
        for adapter in (None, "a1", "a2", "a3")
    }
    assert len(set(outputs.values())) == 4, outputs


def test_mixed_adapter_batch_equals_sequential_greedy(engine: Engine) -> None:
    texts = ["Hi", "What is the capital of France?", "Write one word about the sea, please, now.", "Hi"]
    requests = [
        GenerationRequest(prompt(engine, texts[0]), None, GREEDY),
        GenerationRequest(prompt(engine, texts[1]), "a1", GREEDY),
        GenerationRequest(prompt(engine, texts[2]), "a2", SamplingParams(max_tokens=4, temperature=0.0)),
        GenerationRequest(prompt(engine, texts[3]), "a3", GREEDY),
        GenerationRequest(prompt(engine, texts[1]), BASE, GREEDY),
        GenerationRequest(prompt(engine, texts[0]), "a1", GREEDY),
    ]
    batched = engine.generate(requests)
    sequential = [engine.generate([request])[0] for request in requests]
    assert [result.token_ids for result in batched] == [result.token_ids for result in sequential]
    assert [result.completion_tokens for result in batched] == [10, 10, 4, 10, 10, 10]
    assert all(result.finish_reason == "length" for result in batched)
    assert batched[1].prompt_tokens == len(requests[1].prompt_ids)


def test_bfloat16_mixed_adapter_batch_equals_sequential_greedy(tokenizer, adapter_dirs: dict[str, Path]) -> None:
    """The same in bfloat16, the dtype `auto` picks on AMX and AVX-512-BF16 CPUs: rows padded to one batch
    and rows alone must still pick the same tokens."""
    engine = Engine(tiny_model(len(tokenizer)).to(torch.bfloat16), tokenizer, model_name="tiny")
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    assert engine.dtype == "bfloat16"
    texts = ["Hi", "What is the capital of France?", "Write one word about the sea, please, now."]
    requests = [
        GenerationRequest(prompt(engine, text), adapter, GREEDY)
        for text, adapter in zip(texts * 2, (None, "a1", "a2", "a3", BASE, "a1"), strict=True)
    ]
    batched = engine.generate(requests)
    sequential = [engine.generate([request])[0] for request in requests]
    assert [result.token_ids for result in batched] == [result.token_ids for result in sequential]


def test_seeded_sampling_is_per_request(engine: Engine) -> None:
    ids = prompt(engine, "Hi")
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    alone = engine.generate([GenerationRequest(ids, "a1", sampled)])[0]
    in_batch = engine.generate(
        [
            GenerationRequest(ids, "a1", sampled),
            GenerationRequest(ids, None, SamplingParams(max_tokens=3, temperature=1.5, seed=1)),
        ]
    )[0]
    assert alone.token_ids == in_batch.token_ids


def test_stop_sequence_ends_generation_and_is_cut(engine: Engine) -> None:
    ids = prompt(engine, "Hi")
    full = engine.generate([GenerationRequest(ids, "a1", GREEDY)])[0]
    stop = full.text[len(full.text) // 2 :][:3]
    stopped = engine.generate(
        [GenerationRequest(ids, "a1", SamplingParams(max_tokens=10, temperature=0.0, stop=(stop,)))]
    )[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and full.text.startswith(stopped.text)
    assert stopped.completion_tokens < full.completion_tokens


def test_adapters_load_and_unload_at_runtime(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    ids = prompt(engine, "Hi")
    before = {name: engine.generate([GenerationRequest(ids, name, GREEDY)])[0].token_ids for name in ("a1", "a3")}
    base = engine.generate([GenerationRequest(ids, None, GREEDY)])[0].token_ids

    engine.unload_adapter("a2")
    assert set(engine.adapters) == {"a1", "a3"}
    with pytest.raises(UnknownAdapterError):
        engine.generate([GenerationRequest(ids, "a2", GREEDY)])
    assert engine.generate([GenerationRequest(ids, "a3", GREEDY)])[0].token_ids == before["a3"]

    engine.unload_adapter("a1")
    engine.unload_adapter("a3")
    assert engine.adapters == {}
    assert engine.generate([GenerationRequest(ids, None, GREEDY)])[0].token_ids == base

    engine.load_adapter("v7", adapter_dirs["a1"])
    assert engine.generate([GenerationRequest(ids, "v7", GREEDY)])[0].token_ids == before["a1"]


def test_invalid_sampling_params_are_refused() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=3.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_stacked_adapters_give_what_peft_gives_row_by_row(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    """Mixed batches through the stacked weights (services/runtime/batched_lora.py) against peft's loop over
    each adapter's rows: the same tokens and log-probabilities, also once an adapter is unloaded."""
    texts = ["Hi", "What is the capital of France?", "Write one word about the sea, please, now."]
    adapters = (None, "a1", "a2", "a3", BASE, "a1", "a3")

    def both_ways() -> tuple[list, list]:
        requests = [
            GenerationRequest(prompt(engine, texts[i % 3]), adapter, GREEDY)
            for i, adapter in enumerate(adapters)
            if adapter is None or adapter == BASE or adapter in engine.adapters
        ]
        answers = {}
        for stacked in (True, False):
            engine.batched_lora = stacked
            answers[stacked] = engine.generate(requests)
        engine.batched_lora = True
        return answers[True], answers[False]

    stacked, looped = both_ways()
    assert [a.token_ids for a in stacked] == [a.token_ids for a in looped]
    for mine, peft in zip(stacked, looped, strict=True):
        assert mine.token_logprobs == pytest.approx(peft.token_logprobs, abs=1e-5)
    engine.unload_adapter("a2")
    stacked, looped = both_ways()
    assert len(stacked) == 6 and [a.token_ids for a in stacked] == [a.token_ids for a in looped]


def test_an_adapter_that_cannot_be_stacked_leaves_mixed_batches_to_peft(
    tokenizer, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    engine = Engine(tiny_model(len(tokenizer)), tokenizer, model_name="tiny")
    engine.load_adapter("a1", adapter_dirs["a1"])
    assert engine._batched is not None  # noqa: SLF001 - which path serves is the point
    torch.manual_seed(5)
    # A LoRA on the token embeddings is not a linear layer's: the stacks do not cover it.
    embedded = get_peft_model(
        tiny_model(len(tokenizer)),
        LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
    )
    embedded.save_pretrained(str(tmp_path / "embedded"), save_embedding_layers=False)
    engine.load_adapter("embedded", tmp_path / "embedded")
    assert engine._batched is None  # noqa: SLF001
    ids = prompt(engine, "Hi")
    alone = engine.generate([GenerationRequest(ids, "embedded", GREEDY)])[0].token_ids
    mixed = engine.generate([GenerationRequest(ids, "a1", GREEDY), GenerationRequest(ids, "embedded", GREEDY)])
    assert mixed[1].token_ids == alone
    engine.unload_adapter("embedded")
    assert engine._batched is not None  # noqa: SLF001
