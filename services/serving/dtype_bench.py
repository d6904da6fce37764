"""`flywheel bench dtype`: the model engine in bfloat16 against float32, one engine of each in one run.

(1) A prompt's prefill and first token, one request at a time, the two engines alternating: p50 of each.
(2) Batch-1 decode: the time of `max_tokens` more tokens, less the first, per token, alternating.
(3) The roofline: batch-1 decode as a share of what memory allows. A decode step of one row reads every
    weight once (and the KV cache so far), so the machine cannot go faster than its read bandwidth divided
    by those bytes; the bandwidth is measured here, by torch summing a tensor far larger than any cache.
(4) How far greedy answers agree: the demo's golden questions answered by both engines, batches of 8,
    `max_tokens` new tokens: answers identical token for token, first tokens identical, and the tokens
    the two answers share before they part. bfloat16 keeps 8 bits of mantissa against float32's 24, so
    two nearly tied next tokens can swap and the answers go their own ways from there; what the evaluator's
    gate compares is two models in the same dtype, so this is the drift between dtypes, not a gate's error.

The golden questions are read from the demo's data file by path (services/demo/data/golden.jsonl):
serving does not import the demo.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from services.runtime.inference import Engine, GenerationRequest, GenerationResult, SamplingParams, engine_dtype

GOLDEN = Path(__file__).resolve().parents[1] / "demo" / "data" / "golden.jsonl"
PROMPT = "Write one sentence about the number {} and why it matters to people who count."
AGREEMENT_BATCH = 8


def golden_questions(limit: int) -> list[list[dict[str, str]]]:
    """The demo golden set's conversations without their reference answers, the first `limit`."""
    rows = [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]
    return [[m for m in row["messages"] if m["role"] != "assistant"] for row in rows[:limit]]


def shared_prefix(left: list[int], right: list[int]) -> int:
    """How many tokens two answers share before they part."""
    shared = 0
    for a, b in zip(left, right, strict=False):
        if a != b:
            break
        shared += 1
    return shared


def first_token_line(dtype: str, p50_ms: float) -> str:
    return f"{dtype:<10} prefill + first token   p50 {p50_ms:8.1f} ms"


def decode_line(dtype: str, step_ms: float) -> str:
    return f"{dtype:<10} decode step             p50 {step_ms:8.1f} ms  {1000 / step_ms:6.1f} tokens/s"


def roofline_line(dtype: str, measured: float, limit: float, step_bytes: int, bandwidth_gbs: float) -> str:
    return (
        f"{dtype:<10} roofline share {measured / limit:5.2f}: {measured:.1f} of {limit:.1f} tokens/s "
        f"({step_bytes / 1e6:.0f} MB a step at {bandwidth_gbs:.1f} GB/s)"
    )


def read_bandwidth_gbs(mib: int = 1024, repeats: int = 5) -> float:
    """Memory read bandwidth as torch reaches it with its threads: the median of `repeats` sums over a
    `mib` MiB float32 tensor."""
    import torch

    data = torch.ones(mib * 2**20 // 4)
    data.sum()  # the pages are touched once before they are timed
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        seconds.append(time.perf_counter() - started)
    return mib * 2**20 / statistics.median(seconds) / 1e9


def step_bytes(engine: Engine, context_tokens: int) -> int:
    """Bytes one batch-1 decode step reads: every weight (tied ones once) and the KV cache of `context_tokens`."""
    config = engine.model.config
    parameters = list(engine.model.parameters())
    weights = sum(p.numel() * p.element_size() for p in parameters)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context_tokens
    return weights + kv * parameters[0].element_size()


def identical_line(identical: int, questions: int) -> str:
    return f"answers identical token for token          {identical} of {questions}"


def _greedy(engine: Engine, ids: list[int], tokens: int) -> GenerationResult:
    return engine.generate(
        [GenerationRequest(prompt_ids=ids, params=SamplingParams(max_tokens=tokens, temperature=0.0))]
    )[0]


def run_dtype_bench(*, requests: int, max_tokens: int, golden: int, echo: Callable[[str], None]) -> None:
    import torch

    from services.runtime.base_model import smollm2_weights
    from services.runtime.cpu import bf16_native
    from services.runtime.settings import FlywheelSettings, load_settings

    weights = smollm2_weights(load_settings(FlywheelSettings).cache)
    native = bf16_native()
    echo(
        f"bfloat16 on this hardware: {'native (AMX or AVX-512-BF16, or a CUDA GPU)' if native else 'emulated'}; "
        f"FLYWHEEL_ENGINE_DTYPE=auto picks {str(engine_dtype('auto')).removeprefix('torch.')}; "
        f"torch threads {torch.get_num_threads()}"
    )
    engines = {
        dtype: Engine.from_pretrained(weights, model_name="smollm2", dtype=dtype) for dtype in ("float32", "bfloat16")
    }
    prompts = [engines["float32"].encode_chat([{"role": "user", "content": PROMPT.format(i)}]) for i in range(requests)]
    for engine in engines.values():
        _greedy(engine, prompts[0], 2)  # kernels, allocator

    first: dict[str, list[float]] = {dtype: [] for dtype in engines}
    per_token: dict[str, list[float]] = {dtype: [] for dtype in engines}
    for index, ids in enumerate(prompts):
        order = list(engines) if index % 2 == 0 else list(engines)[::-1]
        for dtype in order:
            started = time.perf_counter()
            _greedy(engines[dtype], ids, 1)
            first[dtype].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            generated = len(_greedy(engines[dtype], ids, max_tokens).token_ids)
            whole = (time.perf_counter() - started) * 1000
            if generated > 1:  # an answer that ended at once has no decode step to time
                per_token[dtype].append((whole - first[dtype][-1]) / (generated - 1))
    echo(
        f"\n(1) prefill and first token, {requests} requests of {len(prompts[0])} prompt tokens, one at a time, alternating"
    )
    for dtype in engines:
        echo(first_token_line(dtype, statistics.median(first[dtype])))
    echo(f"\n(2) batch-1 decode: up to {max_tokens - 1} tokens after the first, per token generated, alternating")
    for dtype in engines:
        echo(decode_line(dtype, statistics.median(per_token[dtype])))

    bandwidth = read_bandwidth_gbs()
    context = len(prompts[0]) + max_tokens // 2
    echo(
        f"\n(3) roofline: batch-1 decode against memory read bandwidth {bandwidth:.1f} GB/s "
        f"(median of 5 sums over 1 GiB, torch threads {torch.get_num_threads()}), {context} tokens of context"
    )
    for dtype, engine in engines.items():
        needed = step_bytes(engine, context)
        echo(
            roofline_line(
                dtype, 1000 / statistics.median(per_token[dtype]), bandwidth * 1e9 / needed, needed, bandwidth
            )
        )

    questions = golden_questions(golden)
    answers: dict[str, list[GenerationResult]] = {}
    for dtype, engine in engines.items():
        requests_ = [
            GenerationRequest(
                prompt_ids=engine.encode_chat(q), params=SamplingParams(max_tokens=max_tokens, temperature=0.0)
            )
            for q in questions
        ]
        answers[dtype] = [
            result
            for start in range(0, len(requests_), AGREEMENT_BATCH)
            for result in engine.generate(requests_[start : start + AGREEMENT_BATCH])
        ]
    pairs = list(zip(answers["float32"], answers["bfloat16"], strict=True))
    identical = sum(a.token_ids == b.token_ids for a, b in pairs)
    same_first = sum(a.token_ids[:1] == b.token_ids[:1] for a, b in pairs)
    shared = [shared_prefix(a.token_ids, b.token_ids) for a, b in pairs]
    echo(f"\n(4) greedy answers to the demo's {len(pairs)} golden questions, {max_tokens} new tokens, batches of 8")
    echo(identical_line(identical, len(pairs)))
    echo(f"first token identical                      {same_first} of {len(pairs)}")
    echo(
        f"tokens shared before the answers part      mean {statistics.mean(shared):.1f}, "
        f"median {statistics.median(shared):.0f} of {max_tokens}"
    )
