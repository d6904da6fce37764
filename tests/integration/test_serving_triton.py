"""A real Triton Inference Server (PyTriton) in front of the engine, reached through tritonclient."""

from __future__ import annotations

import queue
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from services.runtime.inference import Engine, GenerationRequest, SamplingParams
from services.serving.gateway import _Responses
from services.serving.triton import (
    CANCEL_MODEL_NAME,
    MODEL_NAME,
    STREAM_MODEL_NAME,
    TritonAnswer,
    TritonRow,
    TritonServing,
    infer_inputs,
    infer_outputs,
    parse_answer,
    stream_infer,
)
from tests.serving_support import make_adapter

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(tiny_engine_shared: Engine) -> Engine:
    return tiny_engine_shared


@pytest.fixture
def serving(tiny_triton: TritonServing) -> TritonServing:
    return tiny_triton


def direct(engine: Engine, row: TritonRow) -> str:
    params = SamplingParams(max_tokens=row.max_tokens, temperature=row.temperature)
    return engine.generate([GenerationRequest(engine.encode(row.prompt), row.adapter, params)])[0].text


def test_http_and_grpc_round_trip(serving: TritonServing, engine: Engine) -> None:
    assert serving.ports is not None
    row = TritonRow(prompt="Hello there", adapter="a1", max_tokens=6, temperature=0.0)
    http = triton_http.InferenceServerClient(serving.ports.http_url)
    grpc = triton_grpc.InferenceServerClient(serving.ports.grpc_url)
    try:
        assert (
            http.is_server_live()
            and http.is_server_ready()
            and http.is_model_ready(MODEL_NAME)
            and http.is_model_ready(STREAM_MODEL_NAME)
        )
        assert grpc.is_server_live() and grpc.is_model_ready(MODEL_NAME)
        over_http = parse_answer(
            http.infer(MODEL_NAME, infer_inputs(triton_http, row), outputs=infer_outputs(triton_http))
        )
        over_grpc = parse_answer(
            grpc.infer(MODEL_NAME, infer_inputs(triton_grpc, row), outputs=infer_outputs(triton_grpc))
        )
    finally:
        http.close()
        grpc.close()
    assert over_http.error == "" and over_http.completion_tokens == 6 and over_http.finish_reason == "length"
    assert over_http.text == over_grpc.text == direct(engine, row)
    assert over_http.prompt_tokens == len(engine.encode(row.prompt))


def test_concurrent_requests_for_different_adapters_share_decode_steps(serving: TritonServing, engine: Engine) -> None:
    assert serving.ports is not None
    rows = [
        TritonRow(prompt=f"Question {i}?", adapter=[None, "a1", "a2"][i % 3], max_tokens=5 + i, temperature=0.0)
        for i in range(12)
    ]
    url = serving.ports.grpc_url

    def call(row: TritonRow) -> str:
        return stream_infer(url, row).text

    before = serving.batcher.largest_batch
    with ThreadPoolExecutor(max_workers=12) as pool:
        texts = list(pool.map(call, rows))
    assert texts == [direct(engine, row) for row in rows]
    assert serving.batcher.largest_batch > max(before, 1), "concurrent requests never shared a decode step"


def test_adapter_unloaded_while_serving_is_a_row_error(serving: TritonServing, engine: Engine, tmp_path: Path) -> None:
    assert serving.ports is not None
    client = triton_grpc.InferenceServerClient(serving.ports.grpc_url)
    try:
        engine.load_adapter("late", make_adapter(len(engine.tokenizer), tmp_path / "late", seed=9))
        row = TritonRow(prompt="Hi", adapter="late", max_tokens=3, temperature=0.0)
        assert (
            parse_answer(
                client.infer(MODEL_NAME, infer_inputs(triton_grpc, row), outputs=infer_outputs(triton_grpc))
            ).error
            == ""
        )
        engine.unload_adapter("late")
        answer = parse_answer(
            client.infer(MODEL_NAME, infer_inputs(triton_grpc, row), outputs=infer_outputs(triton_grpc))
        )
    finally:
        client.close()
    assert answer.finish_reason == "error" and "not loaded" in answer.error


def test_metrics_endpoint_counts_inferences(serving: TritonServing) -> None:
    assert serving.ports is not None
    with urllib.request.urlopen(serving.ports.metrics_url, timeout=10) as response:
        body = response.read().decode()
    assert f'nv_inference_request_success{{model="{MODEL_NAME}",version="1"}}' in body


def open_stream(url: str, row: TritonRow, request_id: str) -> tuple[triton_grpc.InferenceServerClient, queue.Queue]:
    """A gRPC stream to the stream model asking for pieces; its answers (or errors) land in the queue."""
    answers: queue.Queue = queue.Queue()
    client = triton_grpc.InferenceServerClient(url)
    client.start_stream(
        callback=lambda result, error: answers.put(error if error is not None else parse_answer(result))
    )
    client.async_stream_infer(
        STREAM_MODEL_NAME,
        infer_inputs(triton_grpc, row, stream=True, request_id=request_id),
        outputs=infer_outputs(triton_grpc),
    )
    return client, answers


def until_final(answers: queue.Queue) -> list:
    pieces = [answers.get(timeout=120)]
    while isinstance(pieces[-1], TritonAnswer) and not pieces[-1].finish_reason:
        pieces.append(answers.get(timeout=120))
    assert isinstance(pieces[-1], TritonAnswer), pieces[-1]
    return pieces


def test_the_stream_model_sends_pieces_as_they_are_decoded(serving: TritonServing, engine: Engine) -> None:
    assert serving.ports is not None
    row = TritonRow(prompt="Once upon a time", adapter="a1", max_tokens=12, temperature=0.0)
    client, answers = open_stream(serving.ports.grpc_url, row, "piecewise")
    try:
        pieces = until_final(answers)
    finally:
        client.stop_stream()
        client.close()
    final = pieces[-1]
    assert len([piece for piece in pieces if piece.text]) > 1, "the answer came in one piece"
    assert all(piece.finish_reason == "" and piece.error == "" for piece in pieces[:-1])
    assert "".join(piece.text for piece in pieces) == direct(engine, row)
    assert (final.finish_reason, final.completion_tokens, final.prompt_tokens) == (
        "length",
        12,
        len(engine.encode(row.prompt)),
    )


def test_cancelling_a_stream_takes_it_out_of_the_batch(serving: TritonServing) -> None:
    assert serving.ports is not None
    # 480 tokens is most of the tiny model's context: without the cancel it would decode for a long while.
    row = TritonRow(prompt="Tell me everything", adapter="a2", max_tokens=480, temperature=0.0)
    client, answers = open_stream(serving.ports.grpc_url, row, "abandoned")
    try:
        first = answers.get(timeout=120)
        assert isinstance(first, TritonAnswer) and first.finish_reason == "", first
        request = triton_grpc.InferInput("request_id", [1, 1], "BYTES")
        request.set_data_from_numpy(np.array([[b"abandoned"]], dtype=np.object_))
        cancelled = client.infer(CANCEL_MODEL_NAME, [request]).as_numpy("cancelled")
        final = until_final(answers)[-1]
        again = client.infer(CANCEL_MODEL_NAME, [request]).as_numpy("cancelled")
    finally:
        client.stop_stream()
        client.close()
    assert bool(cancelled.reshape(-1)[0]) and not bool(again.reshape(-1)[0]), (
        "the cancel model did not find the stream, or found it twice"
    )
    assert final.finish_reason == "cancelled" and 0 < final.completion_tokens < row.max_tokens
    assert serving.batcher.decoding == 0


async def test_an_answered_stream_ends_on_tritons_side_and_one_that_runs_on_is_cancelled(
    serving: TritonServing,
) -> None:
    """The gateway never cancels a stream whose answer has come (cancelling races tritonserver's own close
    of it, which crashed a CI run); a stream still decoding when its time is up is cancelled."""
    import grpc
    import tritonclient.grpc.aio as triton_aio

    assert serving.ports is not None
    client = triton_aio.InferenceServerClient(serving.ports.grpc_url)

    async def opened(row: TritonRow, *, stream: bool, request_id: str = "") -> _Responses:
        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": STREAM_MODEL_NAME,
                "inputs": infer_inputs(triton_aio, row, stream=stream, request_id=request_id),
                "outputs": infer_outputs(triton_aio),
            }

        responses = _Responses(client.stream_infer(one_request(), stream_timeout=60), client)
        result, error = await anext(responses.calls)
        assert error is None and parse_answer(result).error == ""
        return responses

    try:
        answered = await opened(TritonRow(prompt="Hi", adapter=None, max_tokens=2, temperature=0.0), stream=False)
        await answered.release(within_s=30)
        assert await answered.calls._grpc_call.code() == grpc.StatusCode.OK

        long_row = TritonRow(prompt="Tell me everything", adapter=None, max_tokens=480, temperature=0.0)
        decoding = await opened(long_row, stream=True, request_id="runs-on")
        await decoding.release(within_s=0.2)
        assert await decoding.calls._grpc_call.code() == grpc.StatusCode.CANCELLED
        # As the gateway does for a client that left: the row itself leaves the batch through the cancel model.
        request = triton_aio.InferInput("request_id", [1, 1], "BYTES")
        request.set_data_from_numpy(np.array([[b"runs-on"]], dtype=np.object_))
        assert bool((await client.infer(CANCEL_MODEL_NAME, [request])).as_numpy("cancelled").reshape(-1)[0])
    finally:
        await client.close()
