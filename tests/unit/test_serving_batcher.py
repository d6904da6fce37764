"""Continuous batching: rows join a running batch between steps, leave when done, and decode as if alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.serving.batcher import BatcherStopped, ContinuousBatcher
from services.runtime.inference import Engine, GenerationRequest, Row, SamplingParams
from tests.serving_support import make_adapter, smollm2_tokenizer, tiny_engine

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    tokenizer = smollm2_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    engine = tiny_engine(tokenizer)
    root = tmp_path_factory.mktemp("adapters")
    for seed in (1, 2):
        engine.load_adapter(f"a{seed}", make_adapter(len(tokenizer), root / f"a{seed}", seed=seed))
    return engine


@pytest.fixture
def batcher(engine: Engine) -> Iterator[ContinuousBatcher]:
    batcher = ContinuousBatcher(engine, max_active=4)
    batcher.start()
    try:
        yield batcher
    finally:
        batcher.stop()


def request(engine: Engine, text: str, adapter: str | None, max_tokens: int) -> GenerationRequest:
    ids = engine.encode_chat([{"role": "user", "content": text}])
    return GenerationRequest(ids, adapter, SamplingParams(max_tokens=max_tokens, temperature=0.0))


def test_rows_joining_mid_decode_get_the_tokens_they_get_alone(engine: Engine, batcher: ContinuousBatcher) -> None:
    long = request(engine, "Tell me a long story about the sea.", "a1", 60)
    first = batcher.submit(long)
    while batcher.steps < 3:
        time.sleep(0.005)
    # Joining a batch whose cache is longer (and shorter, for the last one) than its own prompt.
    late = [
        request(engine, "Hi", "a2", 5),
        request(engine, "What is two plus two, exactly?", None, 8),
        request(engine, "Hi", "a1", 1),
    ]
    futures = [batcher.submit(item) for item in late]
    results = [future.result(timeout=120) for future in futures]
    assert not first.done(), "the short late rows should leave before the long early one"
    assert first.result(timeout=120).completion_tokens == 60
    alone = [engine.generate([item])[0] for item in [*late, long]]
    assert [result.token_ids for result in [*results, first.result()]] == [result.token_ids for result in alone]
    assert batcher.largest_batch >= 2
    assert all(result.compute_ms > 0 and result.queue_ms >= 0 for result in results)


def test_more_requests_than_room_wait_their_turn(engine: Engine, batcher: ContinuousBatcher) -> None:
    futures = [batcher.submit(request(engine, f"Question {i}?", [None, "a1", "a2"][i % 3], 3)) for i in range(10)]
    assert [future.result(timeout=120).completion_tokens for future in futures] == [3] * 10
    assert batcher.largest_batch <= 4


def test_adapter_unloaded_mid_decode_fails_only_its_rows(
    engine: Engine, batcher: ContinuousBatcher, tmp_path: Path
) -> None:
    engine.load_adapter("gone", make_adapter(len(engine.tokenizer), tmp_path / "gone", seed=5))
    doomed = batcher.submit(request(engine, "Hi", "gone", 200))
    survivor = batcher.submit(request(engine, "Hi", "a1", 40))
    while batcher.steps < 2:
        time.sleep(0.005)
    engine.unload_adapter("gone")
    assert doomed.result(timeout=120).finish_reason == "error" and "not loaded" in doomed.result().error
    assert survivor.result(timeout=120).completion_tokens == 40


def test_stop_fails_what_is_left(engine: Engine) -> None:
    batcher = ContinuousBatcher(engine, max_active=1)
    batcher.start()
    futures = [batcher.submit(request(engine, "Hi", None, 400)) for _ in range(2)]
    batcher.stop()
    with pytest.raises(BatcherStopped):
        futures[1].result(timeout=60)
    with pytest.raises(BatcherStopped):
        batcher.submit(request(engine, "Hi", None, 1)).result(timeout=1)


def test_streamed_pieces_add_up_to_the_answer_and_never_include_a_stop_sequence(
    engine: Engine, batcher: ContinuousBatcher
) -> None:
    plain = request(engine, "Tell me about the sea.", "a2", 24)
    full = engine.generate([plain])[0].text
    # A stop sequence from the middle of the answer: its first characters arrive a token before the rest.
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    stopped = GenerationRequest(plain.prompt_ids, "a2", SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,)))
    pieces: list[str] = []
    result = batcher.submit(stopped, on_text=pieces.append).result(timeout=120)
    assert result.finish_reason == "stop" and result.text == full[: full.find(stop)]
    assert "".join(pieces) == result.text and len(pieces) > 1


def test_stable_text_holds_back_what_later_tokens_could_change(engine: Engine) -> None:
    row = Row(GenerationRequest([1], None, SamplingParams(stop=("END",))), None)
    row.text = "partly EN"
    assert row.stable_text() == "partly "
    row.text = "half a character \ufffd"
    assert row.stable_text() == "half a character "
    row.finish_reason, row.text = "length", "partly EN"
    assert row.stable_text() == "partly EN"


def test_a_cancelled_request_leaves_the_batch_with_its_text_so_far(engine: Engine, batcher: ContinuousBatcher) -> None:
    future = batcher.submit(request(engine, "Tell me a long story about the sea.", "a1", 400))
    while batcher.steps < 3 or batcher.decoding == 0:
        time.sleep(0.005)
    batcher.cancel(future)
    result = future.result(timeout=60)
    assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 400
    assert batcher.decoding == 0 and batcher.cancelled == 1
