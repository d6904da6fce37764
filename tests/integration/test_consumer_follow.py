"""Followers on the real broker: every instance reads a state topic in full (a broadcast, not a group's
share), a restarted one replays it from the start, a command follower reads only what comes after its
start, and the registry's state topics are created to be kept forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from contracts.envelope import Envelope
from contracts.events import AdapterRegistered, DeploymentAction, DeploymentRequested, InferenceLogged, StageChanged
from contracts.topics import topic_for
from services.runtime.broker import EventBus, create_broker
from services.runtime.consumer import follow
from services.runtime.settings import FlywheelSettings
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def registered(version: int) -> AdapterRegistered:
    return AdapterRegistered(
        model_name=f"model-{version % 3}",
        adapter_version=version,
        artifact_uri=f"file:///a/{version}",
        artifact_sha256="0" * 64,
        training_job_id=f"job-{version}",
    )


@asynccontextmanager
async def follower(settings: FlywheelSettings, event: type, into: list, *, from_start: bool) -> AsyncIterator[None]:
    broker = create_broker(settings, client_id="follower")

    async def handle(envelope: Envelope) -> None:
        into.append(envelope.payload)

    follow(
        broker, event, handle, name="serving", from_start=from_start, topic_prefix=settings.topic_prefix, backoff_s=0.01
    )
    async with broker:
        await broker.start()
        yield


async def test_every_follower_reads_the_whole_state_topic_and_a_restarted_one_replays_it(
    settings: FlywheelSettings, topics: str
) -> None:
    publisher = create_broker(settings, client_id="registry")
    async with publisher:
        await publisher.start()
        bus = EventBus(publisher, producer="registry", topic_prefix=settings.topic_prefix)
        for version in range(1, 10):  # keyed by model name: spread over the topic's 3 partitions
            await bus.publish(registered(version))
        first, second = [], []
        async with (
            follower(settings, AdapterRegistered, first, from_start=True),
            follower(settings, AdapterRegistered, second, from_start=True),
        ):
            await eventually(lambda: len(first) == 9 and len(second) == 9, what="both replicas holding all nine")
            await bus.publish(registered(10))
            await eventually(lambda: len(first) == 10 and len(second) == 10, what="a new event reaching both replicas")
        restarted: list = []
        async with follower(settings, AdapterRegistered, restarted, from_start=True):
            await eventually(lambda: len(restarted) == 10, what="the restarted replica replaying the topic")
    assert (
        sorted(event.adapter_version for event in first)
        == sorted(event.adapter_version for event in second)
        == list(range(1, 11))
    )
    assert sorted(event.adapter_version for event in restarted) == list(range(1, 11))


async def test_a_command_follower_reads_only_what_comes_after_its_start_and_skips_poison(
    settings: FlywheelSettings, topics: str
) -> None:
    publisher = create_broker(settings, client_id="registry")
    async with publisher:
        await publisher.start()
        bus = EventBus(publisher, producer="registry", topic_prefix=settings.topic_prefix)
        old = DeploymentRequested(
            deployment_id="old", model_name="m", adapter_version=1, action=DeploymentAction.load, requested_by="test"
        )
        await bus.publish(old)
        seen: list = []
        async with follower(settings, DeploymentRequested, seen, from_start=False):
            await asyncio.sleep(3)  # past the follower's first fetch: "latest" is fixed by then
            await publisher.publish(
                b"not an envelope", topic=topic_for(DeploymentRequested, settings.topic_prefix), key=b"m"
            )
            await bus.publish(old.model_copy(update={"deployment_id": "new"}))
            await eventually(lambda: len(seen) >= 1, what="the command sent after the start")
            await asyncio.sleep(1)
    assert [command.deployment_id for command in seen] == ["new"], (
        "the old command is not replayed; the poison record is skipped"
    )


async def test_state_topics_are_kept_forever_and_others_keep_the_brokers_default(
    settings: FlywheelSettings, topics: str
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.resolved_kafka_bootstrap())
    await admin.start()
    try:
        names = [
            topic_for(event, settings.topic_prefix) for event in (StageChanged, AdapterRegistered, InferenceLogged)
        ]
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names])
    finally:
        await admin.close()
    retention = {}
    for response in described:
        for resource in response.resources:
            _, _, _, name, configs = resource[:5]
            retention[name] = next(entry[1] for entry in configs if entry[0] == "retention.ms")
    assert [retention[name] for name in names] == ["-1", "-1", retention[names[2]]] and retention[names[2]] != "-1", (
        retention
    )
