"""`flywheel bench all` turns each benchmark's figures into one table of ratios. The serving benchmark
prints its figures, so the table reads lines made by its own Figures class: a change of that format
breaks this test rather than silently dropping rows from the table."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.cli.bench_cmd import to_markdown
from services.runtime.bench import Row
from services.serving.bench import Figures, lora_cost_line, stacked_lora_line
from services.serving.cli import dtype_rows, gateway_rows, serve_rows
from services.serving.dtype_bench import decode_line, first_token_line, identical_line, roofline_line, shared_prefix
from services.serving.gateway_bench import (
    GUARDS_ON,
    PER_REQUEST_OVERHEAD,
    latency_line,
    median_interval,
    overhead_interval_line,
)

SIZE = {"requests": 8, "max_tokens": 8, "concurrencies": (1, 8), "adapters": 4}


def _lines() -> list[str]:
    lines = []
    for concurrency, (slow, fast) in {1: (4.0, 2.0), 8: (8.0, 1.0)}.items():
        lines.append(Figures(f"per-request generate, concurrency {concurrency}", 8, slow, [100.0] * 8).line())
        lines.append(Figures(f"Triton continuous batching, concurrency {concurrency}", 8, fast, [50.0] * 8).line())
        lines.append(f"{'':<44} ratio {slow / fast:.2f}x throughput (40 vs 64 tokens generated)")
    lines.append("mixed batches: 1.50 s, switching: 6.00 s, ratio 4.00x")
    lines.append(stacked_lora_line(8, 45.5, 60.75, 3))
    lines.append(lora_cost_line(8, 45.5, 30.25, 3))
    lines.append(Figures("direct Triton gRPC stream", 8, 1.0, [20.0] * 8).line())
    lines.append(Figures("through the gateway (HTTP in, Triton gRPC)", 8, 1.2, [25.0] * 8).line())
    return lines


def test_the_serving_figures_become_rows_with_ratios_against_their_baselines() -> None:
    rows = {row.measure: row for row in serve_rows(_lines(), SIZE)}

    at_8 = rows["throughput, 8 requests x 8 tokens, concurrency 8"]
    assert (at_8.flywheel, at_8.baseline, at_8.better) == (8.0, 1.0, "higher") and at_8.ratio == pytest.approx(8.0)
    assert rows["throughput, 8 requests x 8 tokens, concurrency 1"].ratio == pytest.approx(2.0)
    adapters = rows["seconds for 8 requests over 4 LoRA adapters"]
    assert (adapters.flywheel, adapters.baseline, adapters.better) == (1.5, 6.0, "lower")
    lora = rows["time a generated token, a batch of 8 over 4 LoRA adapters"]
    assert (lora.flywheel, lora.baseline, lora.better) == (45.5, 30.25, "lower")
    stacked = rows["time a generated token, a batch of 8 over 4 LoRA adapters, stacked against peft"]
    assert (stacked.flywheel, stacked.baseline) == (45.5, 60.75) and stacked.ratio == pytest.approx(45.5 / 60.75)
    gateway = rows["p50 latency, concurrency 1"]
    assert (gateway.flywheel, gateway.baseline) == (25.0, 20.0) and gateway.ratio == pytest.approx(1.25)


def test_the_gateway_figures_become_rows() -> None:
    lines = [
        latency_line("guard off", [300.0, 310.0, 320.0]),
        latency_line(GUARDS_ON, [301.0, 311.0, 330.0]),
        latency_line("overhead: the pairs' differences", [-2.0, 1.0, 10.0]),
        overhead_interval_line(-2.0, 10.0),
        latency_line(PER_REQUEST_OVERHEAD, [0.5, 1.5, 2.5]),
        overhead_interval_line(0.5, 2.5),
        latency_line("the guard's own check, streamed word by word", [0.2, 0.25, 0.3]),
        latency_line("generated through the gateway (cache miss)", [300.0]),
        latency_line("answered from the gateway's response cache", [1.5]),
    ]
    rows = {row.measure: row for row in gateway_rows(lines, {"pairs": 3, "requests": 1, "max_tokens": 8})}
    p50 = rows["p50 latency, 8 tokens, every guard on (3 pairs)"]
    assert (p50.flywheel, p50.baseline) == (311.0, 310.0)
    assert rows["p95 latency, 8 tokens, every guard on (3 pairs)"].flywheel == 330.0
    assert rows["the output guard's own check per streamed answer, p50"].flywheel == 0.25
    overhead = rows[
        "guard overhead, 8 tokens, p50 of the pairs' differences "
        "(-2.000 to 10.000 ms; goal (at most 5 ms) not shown met: the interval spans it)"
    ]
    assert (overhead.flywheel, overhead.baseline) == (1.0, None)
    per_request = rows[
        "guard overhead per request, 1 token, p50 of the pairs' differences "
        "(0.500 to 2.500 ms; goal (at most 5 ms) met: the whole interval is under it)"
    ]
    assert per_request.flywheel == 1.5
    cached = rows["p50 latency of a repeated greedy request, 8 tokens"]
    assert (cached.flywheel, cached.baseline) == (1.5, 300.0) and cached.ratio == pytest.approx(0.005)
    with pytest.raises(RuntimeError, match="no figures"):
        gateway_rows(["loading SmolLM2-135M-Instruct ..."], {"pairs": 3, "requests": 1, "max_tokens": 8})


def test_the_overheads_interval_holds_the_median_and_narrows_as_pairs_are_added() -> None:
    few = [float(value % 7) - 1.0 for value in range(21)]
    many = few * 20
    low, high = median_interval(few)
    assert low <= 2.0 <= high and high - low >= 2.0
    low_many, high_many = median_interval(many)
    assert low_many <= 2.0 <= high_many and high_many - low_many < high - low


def test_the_overheads_verdict_is_met_only_when_the_whole_interval_is_under_the_goal() -> None:
    assert "met: the whole interval is under it" in overhead_interval_line(1.0, 4.9)
    assert "not shown met" in overhead_interval_line(1.0, 5.1)
    assert "missed" in overhead_interval_line(5.1, 9.0)


def test_the_dtype_figures_become_rows_with_bfloat16_against_float32() -> None:
    lines = [
        first_token_line("float32", 120.0),
        first_token_line("bfloat16", 40.0),
        decode_line("float32", 50.0),
        decode_line("bfloat16", 20.0),
        roofline_line("float32", 20.0, 44.5, 540_000_000, 24.03),
        roofline_line("bfloat16", 50.0, 89.0, 270_000_000, 24.03),
        identical_line(22, 72),
    ]
    rows = {row.measure: row for row in dtype_rows(lines)}
    prefill = rows["prefill + first token p50"]
    assert (prefill.flywheel, prefill.baseline, prefill.better) == (40.0, 120.0, "lower")
    decode = rows["batch-1 decode"]
    assert (decode.flywheel, decode.baseline, decode.unit) == (
        50.0,
        20.0,
        "tokens/s",
    ) and decode.ratio == pytest.approx(2.5)
    assert (
        rows["greedy answers identical to float32's"].flywheel,
        rows["greedy answers identical to float32's"].baseline,
    ) == (22.0, 72.0)
    roofline = rows["batch-1 decode against the memory-bandwidth limit, float32 (goal: a share of at least 0.6)"]
    assert (roofline.flywheel, roofline.baseline, roofline.baseline_label) == (
        20.0,
        44.5,
        "limit: 540 MB a step at 24.0 GB/s",
    ) and roofline.ratio == pytest.approx(20.0 / 44.5)
    assert rows[
        "batch-1 decode against the memory-bandwidth limit, bfloat16 (goal: a share of at least 0.6)"
    ].ratio == pytest.approx(50.0 / 89.0)
    with pytest.raises(RuntimeError, match="no figures"):
        dtype_rows(["bfloat16 on this hardware: native"])


def test_answers_share_the_tokens_before_their_first_difference() -> None:
    assert shared_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert shared_prefix([1, 2], [1, 2, 3]) == 2
    assert shared_prefix([5], [6]) == 0


def test_output_without_figures_is_an_error_not_an_empty_table() -> None:
    with pytest.raises(RuntimeError, match="no figures"):
        serve_rows(["loading SmolLM2-135M-Instruct ...", "(1) 8 requests"], SIZE)


def test_the_markdown_table_names_the_machine_failures_and_what_was_not_run() -> None:
    machine = {
        "cpu": "Xeon",
        "cpu_count": 2,
        "cpu_flags": ["avx2", "avx512f", "amx_tile"],
        "torch_threads": 2,
        "memory": "23.5 GiB",
        "gpu": None,
        "platform": "Linux",
        "python": "3.11",
        "torch": "2",
        "load_average": [1.0],
    }
    rows = [
        Row("ingest", "events/s", 1000.0, 5.0, "events/s", "higher", "sink", "one insert"),
        Row("train", "-", None, None, "", "", error="RuntimeError: bench side baseline failed"),
        Row("gateway", "p50 of a cache hit", 2.8, 587.0, "ms", "lower", "cache", "generated"),
    ]
    table = to_markdown(rows, machine, "quick", datetime(2026, 11, 22, tzinfo=UTC), 12.0, ["train", "ingest"])

    assert "Machine: Xeon, 2 cores, 23.5 GiB memory, GPU none" in table
    assert "CPU flags avx2 avx512f amx_tile; torch threads 2;" in table
    assert "not run this time: serve" in table
    assert "| ingest | events/s | 1,000.0 events/s (sink) | 5.0 events/s (one insert) | **200.00x** | higher |" in table
    assert "| train | - | failed: RuntimeError: bench side baseline failed |" in table
    assert "| **0.00477x** | lower |" in table, "a ratio far below 1 keeps its digits"
