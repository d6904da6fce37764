"""Serving's command handler (COMMANDS: deployment.requested) followed as app.py follows it, on FastStream's
TestKafkaBroker: it loads or unloads the adapter and reports the outcome on deployment.completed, a
failure included (ready false, with the reason), instead of failing the record."""

from __future__ import annotations

from functools import partial

import pytest
from faststream.kafka import KafkaBroker, KafkaMessage, TestKafkaBroker

from contracts.envelope import Envelope, wrap
from contracts.events import DeploymentAction, DeploymentCompleted, DeploymentRequested
from contracts.topics import topic_for
from services.runtime.broker import EventBus
from services.runtime.consumer import follow
from services.serving.handlers import COMMANDS, Deps
from services.serving.prompt_routes import PromptRoutes
from services.serving.routes import Routes

pytestmark = pytest.mark.unit


class _Loader:
    """Stands in for the engine's adapter loads; a version in `broken` fails to load."""

    def __init__(self, broken: set[int]) -> None:
        self.loaded: set[int] = set()
        self.broken = broken

    async def load(self, model_name: str, version: int) -> None:
        if version in self.broken:
            raise OSError(f"{model_name}:v{version} artifact unreadable")
        self.loaded.add(version)

    async def unload(self, model_name: str, version: int) -> None:
        self.loaded.discard(version)


def _request(deployment_id: str, version: int, action: DeploymentAction) -> bytes:
    return (
        wrap(
            DeploymentRequested(
                deployment_id=deployment_id,
                model_name="m",
                adapter_version=version,
                action=action,
                requested_by="monitor",
            ),
            producer="monitor",
        )
        .model_dump_json()
        .encode()
    )


async def test_a_deployment_request_is_carried_out_and_reported_either_way() -> None:
    broker = KafkaBroker()
    loader = _Loader(broken={3})
    deps = Deps(routes=Routes(), prompts=PromptRoutes(), loader=loader, bus=EventBus(broker, producer="serving"))  # type: ignore[arg-type]
    for event, handler in COMMANDS.items():
        follow(broker, event, partial(handler, deps=deps), name="serving", from_start=False, backoff_s=0.0)
    reports: list[DeploymentCompleted] = []

    @broker.subscriber(topic_for(DeploymentCompleted), group_id="reports")
    async def report(message: KafkaMessage) -> None:
        reports.append(Envelope[DeploymentCompleted].model_validate_json(message.body).payload)

    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish(_request("d-1", 2, DeploymentAction.load), topic_for(DeploymentRequested))
        await test_broker.publish(_request("d-2", 3, DeploymentAction.load), topic_for(DeploymentRequested))
        await test_broker.publish(_request("d-3", 2, DeploymentAction.unload), topic_for(DeploymentRequested))

    assert [(r.deployment_id, r.action, r.ready) for r in reports] == [
        ("d-1", DeploymentAction.load, True),
        ("d-2", DeploymentAction.load, False),
        ("d-3", DeploymentAction.unload, True),
    ]
    assert reports[1].error == "OSError: m:v3 artifact unreadable" and reports[0].error is None
    assert loader.loaded == set()
