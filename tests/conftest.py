"""Shared fixtures. The real components (Kafka, PostgreSQL, ClickHouse) come from tests/fixtures/:
an address from the environment, else testcontainers where a Docker daemon answers, else local
processes started and stopped by the fixtures themselves."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.runtime.broker import ensure_topics
from services.runtime.settings import FlywheelSettings

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.postgres", "tests.fixtures.clickhouse"]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def topic_prefix() -> str:
    """Topics of their own for each test, so tests sharing a broker never see each other's events."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
async def topics(kafka_bootstrap: str, topic_prefix: str) -> str:
    await ensure_topics(kafka_bootstrap, topic_prefix)
    return topic_prefix


@pytest.fixture
def settings(tmp_path: Path, kafka_bootstrap: str, topic_prefix: str) -> FlywheelSettings:
    return FlywheelSettings(home=tmp_path / "home", kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, consumer_max_retries=2, shutdown_grace_s=1.0)
