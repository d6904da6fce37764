"""The registry's and the monitor's HANDLERS, subscribed as their apps subscribe them (Runtime.subscribe_all
on the process's broker), driven in memory by FastStream's TestKafkaBroker with fakes of their
dependencies. What TestKafkaBroker covers of the consumer and what it cannot (offsets, commits,
redelivery after a crash): tests/unit/test_consumer_testbroker.py. The handlers with their real stores on
the real broker: tests/integration."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from faststream.kafka import KafkaMessage, TestKafkaBroker

from contracts.envelope import wrap
from contracts.events import (
    DatasetRef,
    EvaluationCompleted,
    Hyperparameters,
    ModelTarget,
    Stage,
    StageChanged,
    TrainingCompleted,
)
from contracts.topics import dlq_for, topic_for
from services.monitor.app import GROUP as MONITOR
from services.monitor.handlers import HANDLERS as MONITOR_HANDLERS
from services.registry.handlers import HANDLERS as REGISTRY_HANDLERS
from services.runtime.service import Runtime
from services.runtime.settings import FlywheelSettings

pytestmark = pytest.mark.unit

TRAINED = TrainingCompleted(
    job_id="job-1",
    model_name="smol",
    dataset=DatasetRef(name="support", version=1),
    hyperparameters=Hyperparameters(rank=4),
    artifact_uri="file:///artifacts/ab",
    artifact_sha256="ab" * 32,
)
EVALUATED = EvaluationCompleted(
    evaluation_id="eval-1",
    candidate=ModelTarget(model_name="smol", adapter_version=1),
    golden=DatasetRef(name="golden", version=1),
    passed=True,
    gate_policy="default@v1",
    reasons=["beats baseline"],
)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    # No broker is reached: TestKafkaBroker replaces the connection; the address only has to parse.
    built = Runtime(
        FlywheelSettings(home=tmp_path, kafka_bootstrap="127.0.0.1:9", consumer_max_retries=1),
        client_id="flywheel-test",
    )
    yield built
    built.close()


class FakeAdapters:
    """The registry's adapters sub-domain as its handlers call it; `refuse` names a job it cannot register."""

    def __init__(self, refuse: str | None = None) -> None:
        self.refuse = refuse
        self.registered: list[tuple[str, str, str | None]] = []
        self.evaluations: list[tuple[str, str]] = []

    def register_trained_adapter(
        self, completed: TrainingCompleted, *, event_id: str, correlation_id: str | None
    ) -> None:
        if completed.job_id == self.refuse:
            raise ValueError(f"artifact of {completed.job_id} does not match its digest")
        self.registered.append((completed.job_id, event_id, correlation_id))

    def attach_evaluation(self, completed: EvaluationCompleted, *, event_id: str) -> None:
        self.evaluations.append((completed.evaluation_id, event_id))


async def test_the_registry_registers_a_trained_adapter_once_and_attaches_its_evaluation(runtime: Runtime) -> None:
    adapters = FakeAdapters()
    runtime.subscribe_all("registry", REGISTRY_HANDLERS, adapters)
    trained = wrap(TRAINED, producer="trainer", correlation_id="corr-1")
    evaluated = wrap(EVALUATED, producer="evaluator")
    async with TestKafkaBroker(runtime.broker) as broker:
        await broker.publish(trained.model_dump_json().encode(), topic_for(TrainingCompleted))
        await broker.publish(trained.model_dump_json().encode(), topic_for(TrainingCompleted))  # redelivered
        await broker.publish(evaluated.model_dump_json().encode(), topic_for(EvaluationCompleted))

    assert adapters.registered == [("job-1", str(trained.event_id), "corr-1")]
    assert adapters.evaluations == [("eval-1", str(evaluated.event_id))]


async def test_a_training_result_the_registry_keeps_refusing_is_dead_lettered_with_the_reason(runtime: Runtime) -> None:
    adapters = FakeAdapters(refuse="job-1")
    runtime.subscribe_all("registry", REGISTRY_HANDLERS, adapters)
    letters: list[dict[str, Any]] = []

    @runtime.broker.subscriber(dlq_for(topic_for(TrainingCompleted)), group_id="dlq-reader")
    async def dead_letter(message: KafkaMessage) -> None:
        letters.append(dict(message.headers))

    async with TestKafkaBroker(runtime.broker) as broker:
        await broker.publish(wrap(TRAINED, producer="trainer").model_dump_json().encode(), topic_for(TrainingCompleted))

    assert adapters.registered == []
    assert [
        (letter["x-flywheel-error"], letter["x-flywheel-attempts"], letter["x-flywheel-consumer-group"])
        for letter in letters
    ] == [
        ("ValueError: artifact of job-1 does not match its digest", "2", "registry"),
    ]


class FakeCanaries:
    def __init__(self) -> None:
        self.watched: list[tuple[StageChanged, datetime]] = []

    def watch(self, changed: StageChanged, declared_at: datetime) -> None:
        self.watched.append((changed, declared_at))


class FakeMonitor:
    def __init__(self) -> None:
        self.canaries = FakeCanaries()


async def test_the_monitor_watches_a_canary_from_when_the_registry_declared_it(runtime: Runtime) -> None:
    monitor = FakeMonitor()
    runtime.subscribe_all(MONITOR, MONITOR_HANDLERS, monitor)
    changed = StageChanged(
        model_name="smol",
        adapter_version=2,
        from_stage=Stage.staging,
        to_stage=Stage.production,
        actor="alice",
        canary_percent=10,
    )
    envelope = wrap(changed, producer="registry")
    async with TestKafkaBroker(runtime.broker) as broker:
        await broker.publish(envelope.model_dump_json().encode(), topic_for(StageChanged))

    assert monitor.canaries.watched == [(changed, envelope.occurred_at)]
