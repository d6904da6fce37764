"""`flywheel bench serve`: Triton with continuous batching vs per-request generate, mixed adapters vs swapping, gateway overhead.

Every figure of one report is measured in one run on one machine, so the ratios are comparable; the
absolute numbers are the machine's. Defaults are small for a shared CPU.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from services.runtime.inference import SMOLLM2_GGUF, Engine, GenerationRequest, SamplingParams, smollm2_dir
from services.runtime.peft_compat import peft_wrap_quietly
from services.serving.triton import TritonRow, TritonServing, stream_infer


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
        return f"{self.label:<44} {self.throughput:8.2f} req/s  p50 {statistics.median(ordered):8.0f} ms  p95 {p95:8.0f} ms"


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
        with peft_wrap_quietly():
            get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(str(directory))
        engine.load_adapter(f"a{index}", directory)
        names.append(f"a{index}")
    return names


def run_bench(*, requests: int, max_tokens: int, concurrencies: tuple[int, ...], adapters: int, echo: Callable[[str], None]) -> None:
    echo("loading SmolLM2-135M-Instruct ...")
    engine = Engine.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, model_name="smollm2")
    # Taken before any adapter is loaded: the baseline runs the plain base model, as a naive server would.
    base = engine.model
    prompts = [engine.encode_chat([{"role": "user", "content": f"Give me one fact about the number {i}."}]) for i in range(requests)]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as scratch:
        with TritonServing(engine, workdir=Path(scratch) / "triton", max_batch_size=32) as serving:
            assert serving.ports is not None
            text_prompts = [engine.tokenizer.decode(ids) for ids in prompts]
            generated: list[int] = []

            def via_triton(index: int, adapter: str | None = None) -> Callable[[], object]:
                def call() -> object:
                    answer = stream_infer(serving.ports.grpc_url, TritonRow(text_prompts[index], adapter, max_tokens, 0.0))
                    generated.append(answer.completion_tokens)
                    return answer
                return call

            lock = threading.Lock()

            def via_generate(index: int) -> Callable[[], object]:
                def call() -> object:
                    with lock, torch.inference_mode():  # one model object: requests take turns, as a naive server does
                        ids = torch.tensor([prompts[index]])
                        return base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens)
                return call

            echo(f"\n(1) {requests} requests, {max_tokens} new tokens each (generate is forced to {max_tokens}; Triton stops at eos)")
            for concurrency in concurrencies:
                generated.clear()
                baseline = _timed(f"per-request generate, concurrency {concurrency}", [via_generate(i) for i in range(requests)], concurrency)
                batched = _timed(f"Triton continuous batching, concurrency {concurrency}", [via_triton(i) for i in range(requests)], concurrency)
                echo(baseline.line())
                echo(batched.line())
                echo(f"{'':<44} ratio {batched.throughput / baseline.throughput:.2f}x throughput ({sum(generated)} vs {requests * max_tokens} tokens generated)")

            echo(f"\n(2) {requests} requests over {adapters} adapters")
            names = _random_adapters(engine, adapters, Path(scratch))
            mixed = _timed("mixed-adapter batches (one engine call)", [lambda: engine.generate([GenerationRequest(prompts[i], names[i % adapters], greedy) for i in range(requests)])], 1)

            def one_at_a_time() -> None:
                for i in range(requests):
                    engine.generate([GenerationRequest(prompts[i], names[i % adapters], greedy)])

            swapped = _timed("one request at a time, adapter switched per request", [one_at_a_time], 1)
            echo(f"mixed batches: {mixed.seconds:.2f} s, switching: {swapped.seconds:.2f} s, ratio {swapped.seconds / mixed.seconds:.2f}x")

            echo("\n(3) gateway overhead over a direct Triton call (concurrency 1)")
            direct = _timed("direct Triton gRPC stream", [via_triton(i % requests) for i in range(min(requests, 8))], 1)
            through = _gateway_figures(engine, serving, text_prompts, max_tokens, min(requests, 8))
            echo(direct.line())
            echo(through.line())
            echo(f"{'':<44} overhead {statistics.median(through.latencies_ms) - statistics.median(direct.latencies_ms):.1f} ms p50, ratio {statistics.median(through.latencies_ms) / statistics.median(direct.latencies_ms):.3f}x")


def _gateway_figures(engine: Engine, serving: TritonServing, prompts: list[str], max_tokens: int, count: int) -> Figures:
    import httpx

    from services.runtime.auth import Principal, Role
    from services.runtime.http import create_http_app
    from services.serving.api import create_router
    from services.serving.gateway import Gateway
    from services.serving.limits import RateLimiter
    from services.serving.routes import Routes
    from services.serving.settings import ServingSettings

    class _NoBus:
        """The bench measures the gateway, not Kafka: events are accepted and discarded."""

        def offer(self, *_: object, **__: object) -> bool:
            return True

    async def main() -> Figures:
        assert serving.ports is not None
        routes = Routes()
        routes.add_model("smollm2")
        gateway = Gateway(routes=routes, tokenizer=engine.tokenizer, triton_grpc_url=serving.ports.grpc_url, settings=ServingSettings(), log_buffer=_NoBus(), loaded_adapters=lambda: set(engine.adapters))  # type: ignore[arg-type]
        # Key lookups are cached per process and limits are a dict lookup: the bench admits one fixed caller.
        router = create_router(lambda: gateway, guard=lambda: Principal("bench", Role.app, "bench"), limiter=RateLimiter(rate_per_s=1e9, burst=10**9))
        app = create_http_app("bench", routers=[router])
        latencies = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=600) as client:
            started = time.perf_counter()
            for index in range(count):
                sent = time.perf_counter()
                response = await client.post("/v1/completions", json={"model": "smollm2", "prompt": prompts[index % len(prompts)], "max_tokens": max_tokens, "temperature": 0})
                response.raise_for_status()
                latencies.append((time.perf_counter() - sent) * 1000)
            seconds = time.perf_counter() - started
        await gateway.close()
        return Figures("through the gateway (HTTP in, Triton gRPC)", count, seconds, latencies)

    return asyncio.run(main())
