"""The sink's benchmarks at a tiny size against the real components (Kafka, the feedback service as
`flywheel run feedback` builds it, chDB): every event and every span is stored exactly once, and the
stage split accounts for the sink's work. Timings are never asserted: only counts."""

from __future__ import annotations

import pytest

from services.feedback.bench import ingest_benchmark
from services.feedback.bench_traces import traces_benchmark
from services.feedback.settings import FeedbackSettings
from services.runtime.privacy import PrivacySettings
from services.runtime.settings import FlywheelSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SINK_STAGES = {"decode+validate", "already-stored check", "redact", "rows", "insert", "commit"}


@pytest.mark.usefixtures("own_embedded_clickhouse")
async def test_traces_benchmark_stores_every_span_once(settings: FlywheelSettings) -> None:
    result = await traces_benchmark(
        settings,
        FeedbackSettings(batch_max_wait_ms=100),
        PrivacySettings(),
        spans=120,
        batch=50,
        baseline_spans=7,
        steady_rate=100,
        steady_seconds=1.0,
        timeout_s=120,
    )

    assert result.steady is not None
    assert (result.stored_rows, result.stored_events) == (127 + result.steady.sent,) * 2
    assert result.steady.sent > 0
    assert set(result.stages) == SINK_STAGES
    assert result.rate > 0 and result.baseline_rate > 0


@pytest.mark.usefixtures("own_embedded_clickhouse")
async def test_ingest_benchmark_prints_where_the_sink_spent_its_time(settings: FlywheelSettings) -> None:
    result = await ingest_benchmark(
        settings, FeedbackSettings(batch_max_wait_ms=100), events=300, baseline_events=20, timeout_s=120
    )

    split = result.stage_split()
    assert set(result.stages) == SINK_STAGES
    assert split[-1][0].startswith("other")
    # The stages and the rest account for the wall time (more only when two batches overlap).
    assert sum(seconds for _, seconds, _ in split) >= result.sink_seconds * 0.999
