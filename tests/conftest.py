"""Shared fixtures. The real components (Kafka, PostgreSQL, ClickHouse) come from tests/fixtures/:
an address from the environment, else testcontainers where a Docker daemon answers, else local
processes started and stopped by the fixtures themselves."""

from __future__ import annotations

import os
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from services.runtime.broker import ensure_topics
from services.runtime.settings import FlywheelSettings

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.postgres",
    "tests.fixtures.clickhouse",
    "tests.fixtures.triton",
]

REPO = Path(__file__).resolve().parents[1]

# Lanes: each test carries the markers of what it needs, so one lane runs alone (`./scripts/test.sh -m
# security`) and the run prints each lane's share of the time. security and faults follow the folder;
# model means the test loads a language model (SmolLM2 or the tiny one) or starts Triton.
LANES = ("unit", "integration", "e2e", "security", "faults", "model")
MODEL_FIXTURES = frozenset(
    {"base_model_dir", "model_dir", "models", "engine", "triton", "served", "serving", "serving_door"}
)
# CI sets this (.ci/run): there a component a test needs and cannot find fails the test instead of
# skipping it; only the ClickHouse server backend, which no CI machine has, may skip.
STRICT_ENV = "FLYWHEEL_TESTS_REQUIRE_ALL"


_torch_threads: list[int] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    # Engines the tests build themselves take the cores other work leaves free, as the services' own do
    # (services/runtime/cpu.py): beside a CPU-heavy job, two threads on one free core crawl.
    from services.runtime.cpu import cores, use_free_cpus

    # Under pytest-xdist (scripts/test.sh) the workers start at once and would each find every core free.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _torch_threads.append(use_free_cpus(max(1, cores() // workers) if workers > 1 else 0))


def pytest_report_header(config: pytest.Config) -> str:
    return f"torch CPU threads: {_torch_threads[0] if _torch_threads else 'not set'} (the free cores at the start)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO).parts
        if parts[:2] == ("tests", "security"):
            item.add_marker(pytest.mark.security)
        if parts[:2] == ("tests", "faults"):
            item.add_marker(pytest.mark.faults)
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


def require(available: bool, missing: str) -> None:
    """Skip a test whose component is missing on a developer's machine; fail it under CI."""
    if available:
        return
    if os.environ.get(STRICT_ENV):
        pytest.fail(f"{missing} (CI must provide it; {STRICT_ENV} is set)")
    pytest.skip(missing)


_lane_seconds: dict[str, float] = defaultdict(float)
_lane_tests: dict[str, set[str]] = defaultdict(set)
# Whole modules, fixtures included: where a shared (module- or session-scoped) fixture would pay most.
_module_seconds: dict[str, float] = defaultdict(float)
SLOWEST_MODULES = 12


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for lane in LANES:
        if lane in report.keywords:
            _lane_seconds[lane] += report.duration
            _lane_tests[lane].add(report.nodeid)
    _module_seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001 - pytest's reporter type is private
    if not _lane_seconds:
        return
    terminalreporter.section("time per lane (setup + call + teardown; a test may be in several lanes)")
    for lane in LANES:
        if lane in _lane_seconds:
            terminalreporter.write_line(f"{lane:<12} {len(_lane_tests[lane]):>4} tests  {_lane_seconds[lane]:>8.1f} s")
    terminalreporter.section(f"slowest {SLOWEST_MODULES} modules (setup + call + teardown of their tests)")
    for module, seconds in sorted(_module_seconds.items(), key=lambda item: -item[1])[:SLOWEST_MODULES]:
        terminalreporter.write_line(f"{seconds:>8.1f} s  {module}")


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
    return FlywheelSettings(
        home=tmp_path / "home",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        consumer_max_retries=2,
        shutdown_grace_s=1.0,
    )
