"""`flywheel bench gateway`: what the gateway's own features cost and save, on the real SmolLM2 behind a
real Triton, each side measured in the same run on the same prompts.

(1) The guards: calls with every check on (secrets and personal data in the input and in the answer,
    and unsafe content in the answer, `redact`; prompt injection and a denied topic in the input, `flag`,
    screened while the model generates; the answer against a JSON Schema and its groundedness in a
    supplied context, `flag`, so every pair's request carries a response_format and a grounding_context)
    against the same calls with the guards off, in alternating pairs (the response cache off on both), p50 and
    p95 of each side and of the pairs' differences. A flag-only groundedness check is scored after the answer
    has gone out: each call's work after its answer is waited for before the next request is sent, so that
    it does not slow the next measurement, and the guards' own time (their spans) includes it. Then the
    guard's own check time per answer, whole
    and streamed piece by piece (its hold-back rescans the text as it grows), on the answers just
    generated and on one long answer. The median difference comes with a bootstrap interval: a decode step
    is tens of milliseconds and its spread over eight steps is as wide as the goal.
(1b) As many pairs with one new token, on requests (1) did not ask: the guards' cost per request (the input
    checks and the screen beside the prefill, the output checks on the first piece) without the eight
    steps' spread; the output checks' cost per further piece is what (1)'s streamed check measures.
(2) The response cache: each greedy prompt generated through the gateway, then asked again, then asked
    in other words (the semantic cache, threshold SEMANTIC_THRESHOLD).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.runtime.inference import Engine
from contracts.events import GuardAction
from services.serving.guard import ContentGuard
from services.serving.settings import ServingSettings
from services.serving.triton import TritonServing

MODEL = "smollm2"
# A topic the bench's prompts are not on: the screen embeds every request, and flags none.
DENIED_TOPICS = {"medical": ["What medicine should I take for my headache?", "How much ibuprofen can I take?"]}
GUARDS_ON = "guards on (every input and output check)"
# What each pair's requests carry, both sides alike, so the JSON and groundedness checks run on the guarded
# side. SmolLM2 rarely answers in JSON when only asked for a sentence: most answers are flagged, which is
# what the check's cost is measured on either way.
ANSWER_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "sentence", "schema": {"type": "object", "properties": {"sentence": {"type": "string"}}}},
}
WARM_UP = "Say hello."
PROMPT = "Write one sentence about the number {}."
CONTEXT = "Numbers are used to count and to measure. The number {} is an integer: it has no fractional part."
# (1b)'s requests, none of them asked in (1): the screen remembers the embeddings of texts it has read, and a
# request it has read before costs it nothing, which is not what (1b) measures.
SHORT_ANSWER_PROMPT = "Name the number {} in one word."
REWORDED = "Write a single sentence about the number {}."
SEMANTIC_THRESHOLD = 0.9


OVERHEAD_INTERVAL = "overhead p50, 95% bootstrap interval:"
PER_REQUEST_OVERHEAD = "overhead per request, 1 token: the pairs' differences"
OVERHEAD_GOAL_MS = 5.0  # issue 19: the guards' overhead at p50, all checks on
BOOTSTRAP_RESAMPLES = 10_000


def median_interval(values: list[float], *, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median of `values`. A decode step is tens of milliseconds and
    either side of a pair may take one more or less of them, so the pairs' median difference moves by as much
    as the goal from run to run: the interval says how far this run's median can be trusted."""
    import numpy as np

    samples = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(samples), size=(BOOTSTRAP_RESAMPLES, len(samples)))
    medians = np.median(samples[draws], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)


def overhead_interval_line(low: float, high: float) -> str:
    """The printed interval of the pairs' median difference, and what it says of the goal."""
    if high <= OVERHEAD_GOAL_MS:
        verdict = f"goal (at most {OVERHEAD_GOAL_MS:g} ms) met: the whole interval is under it"
    elif low > OVERHEAD_GOAL_MS:
        verdict = f"goal (at most {OVERHEAD_GOAL_MS:g} ms) missed: the whole interval is over it"
    else:
        verdict = f"goal (at most {OVERHEAD_GOAL_MS:g} ms) not shown met: the interval spans it"
    return f"{OVERHEAD_INTERVAL} {low:.3f} to {high:.3f} ms; {verdict}"


def overhead_lines(labels: tuple[str, str, str], off_ms: list[float], on_ms: list[float]) -> list[str]:
    """The printed figures of alternating pairs, under `labels` (off, on, their differences): each side's
    latencies, the pairs' differences, and the interval of their median."""
    differences = [on - off for off, on in zip(off_ms, on_ms, strict=True)]
    off_label, on_label, differences_label = labels
    return [
        latency_line(off_label, off_ms),
        latency_line(on_label, on_ms),
        latency_line(differences_label, differences),
        overhead_interval_line(*median_interval(differences)),
    ]


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def latency_line(label: str, values_ms: list[float]) -> str:
    p50, p95 = _percentiles(values_ms)
    return f"{label:<52} p50 {p50:9.3f} ms  p95 {p95:9.3f} ms  (n={len(values_ms)})"


class _NoBus:
    """The bench measures the gateway, not Kafka: events are accepted and discarded, keeping only the time
    each call's guards say they spent (their spans' flywheel.guard.checked_ms, input and output summed)."""

    def __init__(self) -> None:
        self.guard_ms: list[float] = []
        self.found: Counter[str] = Counter()  # what the checks found, by label, over every call
        self.grounded = 0  # answers whose groundedness was scored

    def offer(self, *_: object, spans: Any = (), **__: object) -> bool:
        guards = [span.attributes for span in spans if span.name.startswith("guard ")]
        if guards:
            self.guard_ms.append(sum(float(guard["flywheel.guard.checked_ms"]) for guard in guards))
        for guard in guards:
            self.found.update(label for label in guard["flywheel.guard.found"].split(",") if label)
            self.grounded += "flywheel.guard.groundedness" in guard
        return True

    def clear(self) -> None:
        self.guard_ms.clear()
        self.found.clear()
        self.grounded = 0


def gateway_app(engine: Engine, grpc_url: str, settings: ServingSettings, bus: _NoBus | None = None) -> tuple[Any, Any]:
    """A gateway with `settings` over Triton at `grpc_url`, behind its HTTP door, admitting one fixed caller;
    what it logs goes to `bus`."""
    from services.runtime.auth import Principal, Role
    from services.runtime.http import create_http_app
    from services.serving.api import create_router
    from services.serving.gateway import Gateway
    from services.serving.limits import RateLimiter
    from services.serving.routes import Routes

    routes = Routes()
    routes.add_model(MODEL)
    gateway = Gateway(
        routes=routes,
        tokenizer=engine.tokenizer,
        triton_grpc_url=grpc_url,
        settings=settings,
        log_buffer=bus or _NoBus(),  # type: ignore[arg-type]
        loaded_adapters=lambda: set(engine.adapters),
    )
    router = create_router(
        lambda: gateway,
        guard=lambda: Principal("bench", Role.app, "bench"),
        limiter=RateLimiter(rate_per_s=1e9, burst=10**9),
    )
    return gateway, create_http_app("bench", routers=[router])


async def ask(
    client: Any, question: str, max_tokens: int, expect_cache: str, extra: dict[str, Any] | None = None
) -> tuple[float, str]:
    """One greedy chat completion through the door (with `extra` in its body): its latency in ms and its text."""
    elapsed, text, cache = await ask_raw(client, question, max_tokens, extra)
    if cache != expect_cache:
        raise RuntimeError(f"the gateway's cache said {cache}, not {expect_cache}")
    return elapsed, text


async def ask_raw(
    client: Any, question: str, max_tokens: int, extra: dict[str, Any] | None = None
) -> tuple[float, str, str]:
    """One greedy chat completion through the door: its latency in ms, its text and what the cache did."""
    sent = time.perf_counter()
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **(extra or {}),
        },
    )
    response.raise_for_status()
    elapsed = (time.perf_counter() - sent) * 1000
    return elapsed, response.json()["choices"][0]["message"]["content"], response.headers.get("x-flywheel-cache", "")


def run_gateway_bench(*, requests: int, pairs: int, max_tokens: int, echo: Callable[[str], None]) -> None:
    import httpx

    from services.runtime.base_model import smollm2_weights
    from services.runtime.settings import FlywheelSettings, load_settings

    echo("loading SmolLM2-135M-Instruct ...")
    settings = load_settings(FlywheelSettings)
    engine = Engine.from_pretrained(smollm2_weights(settings.cache), model_name=MODEL, dtype=settings.engine_dtype)
    echo(f"engine dtype {engine.dtype} (FLYWHEEL_ENGINE_DTYPE={settings.engine_dtype})")
    on = ContentGuard(secrets=GuardAction.redact, personal=GuardAction.redact, unsafe=GuardAction.redact)
    guarded_settings = ServingSettings(
        response_cache_entries=0,
        guard_input_secrets=GuardAction.redact,
        guard_input_personal=GuardAction.redact,
        guard_input_injection=GuardAction.flag,
        guard_input_denied_topics=GuardAction.flag,
        guard_denied_topics=DENIED_TOPICS,
        guard_output_secrets=GuardAction.redact,
        guard_output_personal=GuardAction.redact,
        guard_output_unsafe=GuardAction.redact,
        guard_output_json_schema=GuardAction.flag,
        guard_output_groundedness=GuardAction.flag,
    )

    async def main(grpc_url: str) -> None:
        plain, plain_app = gateway_app(engine, grpc_url, ServingSettings(response_cache_entries=0))
        guarded_log = _NoBus()
        guarded, guarded_app = gateway_app(engine, grpc_url, guarded_settings, guarded_log)
        cached, cached_app = gateway_app(
            engine,
            grpc_url,
            ServingSettings(response_cache_entries=requests, response_cache_semantic_threshold=SEMANTIC_THRESHOLD),
        )
        clients = {
            name: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=600)
            for name, app in (("off", plain_app), ("on", guarded_app), ("cache", cached_app))
        }

        async def alternating_pairs(
            count: int, tokens: int, template: str
        ) -> tuple[list[float], list[float], list[str]]:
            """`count` pairs of the same request (`template` of the pair's number) with the guards off and on,
            in alternating order, each call's after-answer work waited for before the next: the two sides'
            latencies and the answers."""
            off_ms: list[float] = []
            on_ms: list[float] = []
            answers: list[str] = []
            for index in range(count):
                prompt = template.format(index)
                order = ("off", "on") if index % 2 == 0 else ("on", "off")
                extra = {"response_format": ANSWER_SCHEMA, "grounding_context": CONTEXT.format(index)}
                for side in order:
                    elapsed, text = await ask(clients[side], prompt, tokens, "off", extra)
                    await (plain if side == "off" else guarded).settled()
                    (off_ms if side == "off" else on_ms).append(elapsed)
                    if side == "off":
                        answers.append(text)
            return off_ms, on_ms, answers

        try:
            for name in ("off", "on"):
                await ask(clients[name], WARM_UP, max_tokens, "off")  # channels, kernels
            guarded_log.clear()
            echo(
                "\n(1) the guards, every check on (input and output redact; injection, denied topics, JSON Schema "
                f"and groundedness flag) against off: {pairs} pairs, the same request each side (with a "
                f"response_format and a grounding_context), alternating, {max_tokens} new tokens, response cache off"
            )
            off_ms, on_ms, answers = await alternating_pairs(pairs, max_tokens, PROMPT)
            for line in overhead_lines(("guard off", GUARDS_ON, "overhead: the pairs' differences"), off_ms, on_ms):
                echo(line)
            # The pairs' difference is the answer's latency, noisy by the generation's own spread; the guards'
            # own time is what they cost: the injection screen runs while the model generates, a flag-only
            # groundedness check after the answer has gone.
            echo(latency_line("the guards' own time per call, as their spans say", guarded_log.guard_ms))
            found = ", ".join(f"{label} {count}" for label, count in sorted(guarded_log.found.items())) or "nothing"
            echo(
                f"what the guards found in {pairs} calls: {found}; groundedness scored on {guarded_log.grounded} answers"
            )
            whole = [_timed_ms(lambda text=text: on.whole(text)) for text in answers]
            streamed = [_timed_ms(lambda text=text: _stream_by_words(on, text)) for text in answers]
            echo(latency_line("the guard's own check, whole answer", whole))
            echo(latency_line("the guard's own check, streamed word by word", streamed))
            long_text = (await ask(clients["off"], PROMPT.format(1), 256, "off"))[1]
            echo(
                latency_line(
                    f"  on one {len(long_text)}-character answer, whole", [_timed_ms(lambda: on.whole(long_text))]
                )
            )
            echo(
                latency_line(
                    f"  on one {len(long_text)}-character answer, streamed word by word",
                    [_timed_ms(lambda: _stream_by_words(on, long_text))],
                )
            )

            echo(
                f"\n(1b) {pairs} pairs of requests not asked before, one new token each: the guards' cost per request without "
                "the spread of eight decode steps (the output checks' per-piece cost is the streamed line above)"
            )
            off_ms, on_ms, _ = await alternating_pairs(pairs, 1, SHORT_ANSWER_PROMPT)
            for line in overhead_lines(
                ("guard off, 1 token", "guards on, 1 token", PER_REQUEST_OVERHEAD), off_ms, on_ms
            ):
                echo(line)

            echo(f"\n(2) the response cache: each of {requests} greedy prompts generated, then asked again")
            generated_ms: list[float] = []
            hit_ms: list[float] = []
            semantic_ms: list[float] = []
            for index in range(requests):
                prompt = PROMPT.format(index)
                generated_ms.append((await ask(clients["cache"], prompt, max_tokens, "miss"))[0])
                hit_ms.append((await ask(clients["cache"], prompt, max_tokens, "hit"))[0])
                elapsed, _, cache = await ask_raw(clients["cache"], REWORDED.format(index), max_tokens)
                if cache == "semantic":
                    semantic_ms.append(elapsed)
            echo(latency_line("generated through the gateway (cache miss)", generated_ms))
            echo(latency_line("answered from the gateway's response cache", hit_ms))
            echo(f"{'':<52} a hit is {statistics.median(generated_ms) / statistics.median(hit_ms):.0f}x faster at p50")
            echo(
                f"the same questions reworded ({REWORDED.format('N')!r}): {len(semantic_ms)} of {requests} "
                f"answered by the semantic cache (threshold {SEMANTIC_THRESHOLD})"
            )
            if semantic_ms:
                echo(latency_line("answered from the semantic cache", semantic_ms))
                echo(
                    f"{'':<52} a semantic hit is "
                    f"{statistics.median(generated_ms) / statistics.median(semantic_ms):.0f}x faster at p50"
                )
        finally:
            for client in clients.values():
                await client.aclose()
            for gateway in (plain, guarded, cached):
                await gateway.close()

    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as scratch:
        with TritonServing(engine, workdir=Path(scratch) / "triton", max_batch_size=8) as serving:
            assert serving.ports is not None
            asyncio.run(main(serving.ports.grpc_url))


def _timed_ms(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def _stream_by_words(guard: ContentGuard, text: str) -> str:
    """The text fed as a stream delivers it, a word at a time (about a piece per decode step)."""
    guarded = guard.stream()
    words = text.split(" ")
    out = [guarded.feed(word if index == 0 else " " + word) for index, word in enumerate(words)]
    return "".join(out) + guarded.finish()
