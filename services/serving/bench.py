"""`flywheel bench serve`: Triton with continuous batching vs per-request generate, mixed adapters vs swapping,
gateway overhead. What the gateway's guard and cache cost and save: gateway_bench.py.

Every figure of one report is measured in one run on one machine, so the ratios are comparable; the
absolute numbers are the machine's. Defaults are small for a shared CPU.
"""

from __future__ import annotations

import asyncio
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.runtime.base_model import smollm2_weights
from services.runtime.inference import Engine, GenerationRequest, SamplingParams
from services.runtime.settings import FlywheelSettings, load_settings
from services.runtime.peft_compat import ignore_peft_deprecation
from services.serving.triton import (
    STREAM_MODEL_NAME,
    TritonAnswer,
    TritonRow,
    TritonServing,
    infer_inputs,
    infer_outputs,
    parse_answer,
)


@dataclass
class Figures:
    label: str
    requests: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def line(self) -> str:
        ordered = sorted(self.latencies_ms)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return f"{self.label:<44} {self.throughput:8.2f} req/s  p50 {statistics.median(ordered):8.1f} ms  p95 {p95:8.1f} ms  (n={len(ordered)})"


def _timed(label: str, calls: list[Callable[[], object]], concurrency: int) -> Figures:
    latencies: list[float] = []

    def one(call: Callable[[], object]) -> None:
        started = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, calls))
    return Figures(label, len(calls), time.perf_counter() - started, latencies)


def _random_adapters(engine: Engine, count: int, root: Path) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    for index in range(count):
        directory = root / f"a{index}"
        model = AutoModelForCausalLM.from_config(engine.model.config)
        torch.manual_seed(index + 1)
        ignore_peft_deprecation()
        get_peft_model(
            model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        ).save_pretrained(str(directory))
        engine.load_adapter(f"a{index}", directory)
        names.append(f"a{index}")
    return names


def _lora_lines(
    engine: Engine, prompts: list[list[int]], adapters: list[str], params: SamplingParams, rounds: int = 3
) -> list[str]:
    """One batch, its rows on different adapters, three ways: through the stacked adapter weights (what
    serving runs), through peft's loop over each adapter's rows, and on the base model alone. Time a
    generated token, the three in a rotating order, median of rounds."""

    def per_token_ms(adapter_of: Callable[[int], str | None], stacked: bool) -> float:
        engine.batched_lora = stacked
        try:
            started = time.perf_counter()
            results = engine.generate([GenerationRequest(ids, adapter_of(i), params) for i, ids in enumerate(prompts)])
            return (time.perf_counter() - started) * 1000 / max(1, sum(r.completion_tokens for r in results))
        finally:
            engine.batched_lora = True

    def mixed(i: int) -> str | None:
        return adapters[i % len(adapters)]

    sides = {"stacked": (mixed, True), "looped": (mixed, False), "base": (lambda i: None, True)}
    times: dict[str, list[float]] = {side: [] for side in sides}
    order = list(sides)
    for round_ in range(rounds):
        for side in order[round_ % 3 :] + order[: round_ % 3]:
            times[side].append(per_token_ms(*sides[side]))
    median = {side: statistics.median(values) for side, values in times.items()}
    return [
        stacked_lora_line(len(prompts), median["stacked"], median["looped"], rounds),
        lora_cost_line(len(prompts), median["stacked"], median["base"], rounds),
    ]


def stacked_lora_line(batch: int, stacked_ms: float, looped_ms: float, rounds: int) -> str:
    return (
        f"stacked adapters against peft's loop, the same mixed batch of {batch}: {stacked_ms:.2f} ms against "
        f"{looped_ms:.2f} ms a generated token, ratio {stacked_ms / looped_ms:.2f}x (median of {rounds} rounds)"
    )


def lora_cost_line(batch: int, mixed_ms: float, base_ms: float, rounds: int) -> str:
    return (
        f"mixed adapters against the base model alone, the same batch of {batch}: {mixed_ms:.2f} ms against "
        f"{base_ms:.2f} ms a generated token, ratio {mixed_ms / base_ms:.2f}x (median of {rounds} rounds)"
    )


class _Streamer:
    """One gRPC stream to the stream model, kept open across requests, as a serving client keeps its
    channel: a fresh channel per request would put connection setup into every latency."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as triton_grpc

        self._grpc = triton_grpc
        self._answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._client = triton_grpc.InferenceServerClient(url)
        self._client.start_stream(callback=lambda result, error: self._answers.put((result, error)))

    def infer(self, row: TritonRow) -> TritonAnswer:
        self._client.async_stream_infer(
            STREAM_MODEL_NAME, infer_inputs(self._grpc, row), outputs=infer_outputs(self._grpc)
        )
        result, error = self._answers.get(timeout=600)
        if error is not None:
            raise error
        return parse_answer(result)

    def close(self) -> None:
        self._client.stop_stream()
        self._client.close()


def _pooled(label: str, runs: list[Figures]) -> Figures:
    return Figures(
        label,
        sum(run.requests for run in runs),
        sum(run.seconds for run in runs),
        [ms for run in runs for ms in run.latencies_ms],
    )


def run_bench(
    *,
    requests: int,
    max_tokens: int,
    concurrencies: tuple[int, ...],
    adapters: int,
    echo: Callable[[str], None],
    rounds: int = 3,
) -> None:
    """Each comparison runs `rounds` times, the two sides alternating (ABBA...), so load from other
    processes that drifts during the run lands on both; the ratio printed is the median of the
    rounds' ratios, the req/s and latencies those of all rounds together."""
    echo("loading SmolLM2-135M-Instruct ...")
    settings = load_settings(FlywheelSettings)
    engine = Engine.from_pretrained(smollm2_weights(settings.cache), model_name="smollm2", dtype=settings.engine_dtype)
    echo(f"engine dtype {engine.dtype} (FLYWHEEL_ENGINE_DTYPE={settings.engine_dtype})")
    # Taken before any adapter is loaded: the baseline runs the plain base model, as a naive server would.
    base = engine.model
    prompts = [
        engine.encode_chat([{"role": "user", "content": f"Give me one fact about the number {i}."}])
        for i in range(requests)
    ]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as scratch:
        with TritonServing(engine, workdir=Path(scratch) / "triton", max_batch_size=32) as serving:
            assert serving.ports is not None
            text_prompts = [engine.tokenizer.decode(ids) for ids in prompts]
            streamers: queue.Queue[_Streamer] = queue.Queue()
            for _ in range(max(concurrencies)):
                streamers.put(_Streamer(serving.ports.grpc_url))
            generated: list[int] = []

            def via_triton(index: int, adapter: str | None = None) -> Callable[[], object]:
                def call() -> object:
                    streamer = streamers.get()
                    try:
                        answer = streamer.infer(TritonRow(text_prompts[index], adapter, max_tokens, 0.0))
                    finally:
                        streamers.put(streamer)
                    generated.append(answer.completion_tokens)
                    return answer

                return call

            lock = threading.Lock()

            def via_generate(index: int) -> Callable[[], object]:
                def call() -> object:
                    with lock, torch.inference_mode():  # one model object: requests take turns, as a naive server does
                        ids = torch.tensor([prompts[index]])
                        return base.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=max_tokens,
                            do_sample=False,
                            min_new_tokens=max_tokens,
                        )

                return call

            try:
                echo(
                    "warming up both paths (first calls pay one-off costs: kernels, Triton's stubs, the gRPC channels) ..."
                )
                _timed("warm-up", [via_generate(0), via_generate(1)], 1)
                _timed("warm-up", [via_triton(i) for i in range(max(concurrencies))], max(concurrencies))

                echo(
                    f"\n(1) {requests} requests, {max_tokens} new tokens each, {rounds} rounds per concurrency, sides alternating "
                    f"(generate is forced to {max_tokens} tokens; Triton stops at eos, so tokens/s is compared too)"
                )
                for concurrency in concurrencies:
                    baselines, batched_runs, ratios, token_ratios = [], [], [], []
                    for round_ in range(rounds):
                        generated.clear()
                        sides = [("generate", via_generate), ("triton", via_triton)]
                        measured = {}
                        for name, make in sides if round_ % 2 == 0 else sides[::-1]:
                            measured[name] = _timed(name, [make(i) for i in range(requests)], concurrency)
                        baselines.append(measured["generate"])
                        batched_runs.append(measured["triton"])
                        tokens = sum(generated)
                        ratios.append(measured["triton"].throughput / measured["generate"].throughput)
                        token_ratios.append(
                            (tokens / measured["triton"].seconds)
                            / (requests * max_tokens / measured["generate"].seconds)
                        )
                        echo(
                            f"  round {round_ + 1}: generate {measured['generate'].throughput:.2f} req/s, Triton {measured['triton'].throughput:.2f} req/s "
                            f"({tokens} of {requests * max_tokens} tokens), ratio {ratios[-1]:.2f}x"
                        )
                    echo(_pooled(f"per-request generate, concurrency {concurrency}", baselines).line())
                    echo(_pooled(f"Triton continuous batching, concurrency {concurrency}", batched_runs).line())
                    echo(
                        f"{'':<44} ratio {statistics.median(ratios):.2f}x throughput (median of {rounds} rounds; tokens/s ratio {statistics.median(token_ratios):.2f}x)"
                    )

                echo(f"\n(2) {requests} requests over {adapters} adapters")
                names = _random_adapters(engine, adapters, Path(scratch))
                mixed = _timed(
                    "mixed-adapter batches (one engine call)",
                    [
                        lambda: engine.generate(
                            [GenerationRequest(prompts[i], names[i % adapters], greedy) for i in range(requests)]
                        )
                    ],
                    1,
                )

                def one_at_a_time() -> None:
                    for i in range(requests):
                        engine.generate([GenerationRequest(prompts[i], names[i % adapters], greedy)])

                swapped = _timed("one request at a time, adapter switched per request", [one_at_a_time], 1)
                echo(
                    f"mixed batches: {mixed.seconds:.2f} s, switching: {swapped.seconds:.2f} s, ratio {swapped.seconds / mixed.seconds:.2f}x"
                )
                for line in _lora_lines(engine, prompts[:requests], names, greedy):
                    echo(line)

                echo(
                    f"\n(3) gateway overhead over a direct Triton call (concurrency 1, {requests} pairs, the same prompt each side, alternating)"
                )
                direct, through = _gateway_figures(engine, serving, via_triton, text_prompts, max_tokens, requests)
                echo(direct.line())
                echo(through.line())
                gaps = [
                    gateway - plain for gateway, plain in zip(through.latencies_ms, direct.latencies_ms, strict=True)
                ]
                echo(
                    f"{'':<44} overhead {statistics.median(gaps):.1f} ms p50 of the pairs' differences, ratio {statistics.median(through.latencies_ms) / statistics.median(direct.latencies_ms):.3f}x"
                )
            finally:
                while not streamers.empty():
                    streamers.get().close()


def _gateway_figures(
    engine: Engine,
    serving: TritonServing,
    via_triton: Callable[..., Callable[[], object]],
    prompts: list[str],
    max_tokens: int,
    count: int,
) -> tuple[Figures, Figures]:
    """Direct Triton calls and gateway calls (response cache off) in pairs on the same prompt, after one warm-up call each."""
    import httpx

    from services.serving.gateway_bench import ask, gateway_app
    from services.serving.settings import ServingSettings

    async def main() -> tuple[Figures, Figures]:
        assert serving.ports is not None
        gateway, app = gateway_app(engine, serving.ports.grpc_url, ServingSettings(response_cache_entries=0))
        direct_ms: list[float] = []
        gateway_ms: list[float] = []
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=600
        ) as client:

            async def through(index: int) -> float:
                return (await ask(client, prompts[index % len(prompts)], max_tokens, "off"))[0]

            def plain(index: int) -> float:
                sent = time.perf_counter()
                via_triton(index % len(prompts))()
                return (time.perf_counter() - sent) * 1000

            await through(0)
            plain(0)
            for index in range(count):
                if index % 2 == 0:
                    direct_ms.append(plain(index))
                    gateway_ms.append(await through(index))
                else:
                    gateway_ms.append(await through(index))
                    direct_ms.append(plain(index))
        await gateway.close()
        return (
            Figures("direct Triton gRPC stream", count, sum(direct_ms) / 1000, direct_ms),
            Figures("through the gateway (HTTP app via ASGI, Triton gRPC)", count, sum(gateway_ms) / 1000, gateway_ms),
        )

    return asyncio.run(main())
