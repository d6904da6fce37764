"""Refusals cost the caller, not the platform: a body over its door's cap is refused (413) before any
door reads it, every refusal is counted in /metrics and logged once per reason and interval, and a
refused request publishes nothing. Against a real process (registry + feedback) on real Kafka."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts.events import FeedbackReceived
from contracts.topics import topic_for
from services.feedback.app import create_app as create_feedback
from services.registry.app import create_app as create_registry
from services.runtime.http import DEFAULT_MAX_BODY_BYTES, RefusalLog
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from tests.faults.support import topic_size

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BAD_KEY = {"Authorization": "Bearer fw_000000000000_not-a-real-secret"}


def refusals_counted(metrics: str, status: int, code: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "flywheel_http_refusals_total" and sample.labels == {"status": str(status), "code": code}
    )


async def chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


async def test_bodies_over_the_cap_and_bad_keys_are_refused_counted_and_publish_nothing(
    settings: FlywheelSettings, topics: str, chdb_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # chDB opens one data directory per process: the session's, shared by every in-process chDB test.
    settings = settings.model_copy(update={"home": chdb_home, "database_url": f"sqlite:///{tmp_path / 'registry.db'}"})
    app, _ = build_process(settings, [create_registry, create_feedback], title="refusals-test")
    feedback_topic = topic_for(FeedbackReceived, settings.topic_prefix)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test", timeout=60
        ) as client:
            before = (await client.get("/metrics")).text

            declared = await client.post(
                "/feedback/v1/feedback",
                content=b"{" + b" " * DEFAULT_MAX_BODY_BYTES + b"}",
                headers={"content-type": "application/json"},
            )
            assert declared.status_code == 413, declared.text
            assert declared.json()["error"]["code"] == "request_too_large"
            assert (
                f"the limit of /feedback/v1/feedback is {DEFAULT_MAX_BODY_BYTES} bytes"
                in declared.json()["error"]["message"]
            )

            # No Content-Length: the cap holds as the body streams in.
            streamed = await client.post(
                "/feedback/v1/feedback",
                content=chunks(DEFAULT_MAX_BODY_BYTES + 1),
                headers={"content-type": "application/json"},
            )
            assert streamed.status_code == 413, streamed.text
            assert "nothing was read past it" in streamed.json()["error"]["message"]

            # The registry's dataset upload has its own, larger cap: past the default it reaches the door (401 here, no key).
            upload = await client.post(
                "/registry/v1/datasets",
                content=b"{" + b" " * (DEFAULT_MAX_BODY_BYTES + 1024) + b"}",
                headers={"content-type": "application/json"},
            )
            assert upload.status_code == 401, upload.text

            with caplog.at_level(logging.WARNING, logger="flywheel.http"):
                for _ in range(25):
                    refused = await client.post(
                        "/feedback/v1/feedback", json={"inference_id": "i-1", "thumbs": "up"}, headers=BAD_KEY
                    )
                    assert refused.status_code == 401
            after = (await client.get("/metrics")).text

    assert refusals_counted(after, 401, "invalid_api_key") - refusals_counted(before, 401, "invalid_api_key") == 25
    assert refusals_counted(after, 413, "request_too_large") - refusals_counted(before, 413, "request_too_large") == 2
    logged = [
        record
        for record in caplog.records
        if record.name == "flywheel.http" and "invalid_api_key" in record.getMessage()
    ]
    assert len(logged) <= 1, [
        record.getMessage() for record in logged
    ]  # one line per reason and interval (none if an earlier test logged it)
    assert all("not-a-real-secret" not in record.getMessage() for record in caplog.records)
    assert await topic_size(settings.resolved_kafka_bootstrap(), feedback_topic) == 0


def test_the_refusal_log_folds_repeats_into_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = RefusalLog(interval_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="flywheel.http"):
        assert refusals.record(401, "unit_reason", "/x")
        assert not any(refusals.record(401, "unit_reason", "/x") for _ in range(9))
        assert refusals.record(403, "unit_reason", "/x")  # another reason has its own line
        now[0] = 61.0
        assert refusals.record(401, "unit_reason", "/x")
    lines = [record.getMessage() for record in caplog.records if "unit_reason" in record.getMessage()]
    assert lines == [
        "refused 401 unit_reason on /x",
        "refused 403 unit_reason on /x",
        "refused 401 unit_reason on /x (9 more of these in the last 60 s)",
    ]
