"""A terminal event published while the broker is down is not lost: it arrives once the broker is back, once.

The test runs its own broker (not the session's) because it stops it. `flywheel run trainer` runs as a
subprocess: its job fails while the broker is down, the process is killed with SIGKILL while the
event is still unsent, the broker comes back on the same port and data, and the trainer started
again on the same home publishes the staged event.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from contracts.events import TrainingFailed
from contracts.http import Role
from contracts.topics import topic_for
from infra.local_kafka import LocalKafka
from infra.processes import free_port
from services.runtime.broker import ensure_topics
from services.runtime.settings import FlywheelSettings
from services.trainer.store import JobStore
from tests.faults.support import ServiceProcess, eventually
from tests.integration.test_event_bus import read_all
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture
async def own_kafka(tmp_path: Path) -> AsyncIterator[LocalKafka]:
    kafka = LocalKafka(tmp_path / "kafka-home", FlywheelSettings().cache, port=free_port())
    try:
        await asyncio.to_thread(kafka.start, 120)
        yield kafka
    finally:
        await asyncio.to_thread(kafka.stop)


def unsent(jobs_db: Path) -> list[str]:
    store = JobStore(jobs_db)
    try:
        return [event.event_id for event in store.unsent()]
    finally:
        store.close()


async def test_training_failed_while_the_broker_is_down_arrives_exactly_once_after_broker_and_trainer_restart(
    own_kafka: LocalKafka, tmp_path: Path
) -> None:
    bootstrap = f"127.0.0.1:{own_kafka.port}"
    prefix = f"t{uuid.uuid4().hex[:10]}."
    await ensure_topics(bootstrap, prefix)
    # An unknown model fails the job at once, so the terminal event is due while the broker is down.
    trainer = ServiceProcess(
        tmp_path,
        bootstrap,
        prefix,
        ("trainer",),
        FLYWHEEL_TRAINER_INPUT_WAIT_S="0",
        FLYWHEEL_TRAINER_PUBLISH_RETRY_INITIAL_S="0.2",
    )
    jobs_db = trainer.home / "trainer" / "jobs.db"
    registry = trainer.registry_beside()  # the trainer's door checks the operator's key through it
    expected_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "flywheel-trainer/job-down/failed"))
    body = {"job_id": "job-down", "model_name": "never-registered", "dataset": {"name": "d", "version": 1}}
    try:
        registry.start()
        trainer.start()
        await registry.wait_ready()
        operator = api_key(FlywheelSettings(home=trainer.home), Role.operator)
        await trainer.wait_ready()
        await asyncio.to_thread(own_kafka.stop)
        async with httpx.AsyncClient(
            base_url=trainer.url, headers={"Authorization": f"Bearer {operator}"}, timeout=10
        ) as client:
            assert (await client.post("/trainer/v1/training-jobs", json=body)).status_code == 202

            async def status() -> str:
                return (await client.get("/trainer/v1/training-jobs/job-down")).json()["status"]

            deadline = asyncio.get_running_loop().time() + 60
            while await status() != "failed":
                assert asyncio.get_running_loop().time() < deadline, (
                    f"the job did not fail within 60 s:\n{trainer.log_tail()}"
                )
                await asyncio.sleep(0.2)
        assert unsent(jobs_db) == [expected_id]
        # The worker dies with the event staged and the broker still down.
        await asyncio.to_thread(trainer.kill)

        await asyncio.to_thread(own_kafka.start, 120)
        trainer.start()
        await eventually(
            lambda: not unsent(jobs_db),
            180,
            "the staged training.failed to be published after the restart",
            alive=trainer,
        )
    finally:
        await asyncio.to_thread(trainer.stop)
        await asyncio.to_thread(registry.stop)
    records = await read_all(bootstrap, topic_for(TrainingFailed, prefix), expected=2, timeout_s=10)
    envelopes = [json.loads(record.value) for record in records]
    assert [envelope["event_id"] for envelope in envelopes] == [expected_id]
    assert envelopes[0]["payload"]["error_type"] == "invalid_input"
    assert "unknown base model 'never-registered'" in envelopes[0]["payload"]["reason"]
