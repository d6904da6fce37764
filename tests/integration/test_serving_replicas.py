"""Serving replicas follow the registry's events on real Kafka with real Triton and real LoRA adapters:
a replica started after the events rebuilds its routes and loads production's adapter from the replayed
topics; a stage change reaches every replica, not one of a consumer group; a restarted replica comes
back serving what production is now."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from contracts.events import AdapterRegistered, Stage, StageChanged
from services.runtime.artifacts import ArtifactStore
from services.runtime.auth import registry_database_url
from services.runtime.broker import EventBus, create_broker
from services.runtime.service import ServiceFactory, build_process
from services.runtime.settings import FlywheelSettings
from tests.integration.test_serving_app import app_key, model_dir, serving_on  # noqa: F401 - fixtures
from tests.fixtures.triton import tritonserver_pids
from tests.serving_support import make_adapter, smollm2_tokenizer
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


@asynccontextmanager
async def replica(
    settings: FlywheelSettings, home: Path, key: str, serving: ServiceFactory
) -> AsyncIterator[httpx.AsyncClient]:
    """One serving process (its own Triton) in `home`, sharing the broker and the key table."""
    # API keys live in the registry's database; adapters in the registry's artifact store, outside this home.
    shared = {
        "home": home,
        "database_url": registry_database_url(settings),
        "artifact_root": str(registry_artifacts(settings)),
    }
    app, _ = build_process(settings.model_copy(update=shared), [serving], title=f"serving@{home.name}")
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://serving",
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ) as http,
    ):
        yield http
    assert tritonserver_pids(home) == [], "tritonserver outlived its replica"


async def answered_by(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1})
    assert response.status_code == 200, response.text
    return response.json()["model"]


async def until_answered_by(
    http: httpx.AsyncClient, expected: str, what: str, caplog: pytest.LogCaptureFixture | None = None
) -> None:
    seen: list[str] = []

    async def probe() -> bool:
        seen.append(await answered_by(http))
        return seen[-1] == expected

    try:
        await eventually(probe, what=what, timeout_s=120, interval_s=0.5)
    except AssertionError as error:
        # What serving logged as it followed the registry tells a lost event from a slow one.
        logged = [
            f"{record.name}: {record.getMessage()}"
            for record in (caplog.records if caplog else [])
            if record.name.startswith("flywheel.") and record.levelno >= logging.INFO
        ]
        raise AssertionError(
            f"{error}; the last answers came from {seen[-3:]}; flywheel logged: {logged[-15:]}"
        ) from None


def registry_artifacts(settings: FlywheelSettings) -> Path:
    """The registry's store (FLYWHEEL_ARTIFACT_ROOT), outside every replica's home."""
    return settings.home.parent / "registry-artifacts"


@asynccontextmanager
async def registry_history(settings: FlywheelSettings, tmp_path: Path) -> AsyncIterator[EventBus]:
    """The registry's history before any replica starts: two versions of `tiny`, v1 promoted to
    production; yields the registry's bus to publish what comes next. Replicas started meanwhile read
    the registry's artifact store (serving loads adapters from that store only)."""
    artifacts = ArtifactStore(registry_artifacts(settings))
    vocab = len(smollm2_tokenizer(tmp_path / "tokenizer"))
    refs = {
        version: artifacts.put_directory(make_adapter(vocab, tmp_path / f"adapter-{version}", seed=version))
        for version in (1, 2)
    }
    publisher = create_broker(settings, client_id="registry")
    async with publisher:
        await publisher.start()
        registry = EventBus(publisher, producer="registry", topic_prefix=settings.topic_prefix)
        for version, ref in refs.items():
            await registry.publish(
                AdapterRegistered(
                    model_name="tiny",
                    adapter_version=version,
                    artifact_uri=ref.uri,
                    artifact_sha256=ref.sha256,
                    training_job_id=f"job-{version}",
                )
            )
        await registry.publish(
            StageChanged(
                model_name="tiny",
                adapter_version=1,
                from_stage=Stage.staging,
                to_stage=Stage.production,
                actor="alice",
                approver="bob",
            )
        )
        yield registry


async def promote_v2(registry: EventBus) -> None:
    """As the registry publishes a replacement: the promotion, then the archive of the version it replaced."""
    await registry.publish(
        StageChanged(
            model_name="tiny",
            adapter_version=2,
            from_stage=Stage.staging,
            to_stage=Stage.production,
            actor="alice",
            approver="bob",
            replaces_version=1,
        )
    )
    await registry.publish(
        StageChanged(
            model_name="tiny", adapter_version=1, from_stage=Stage.production, to_stage=Stage.archived, actor="alice"
        )
    )


async def test_replicas_rebuild_routes_from_the_replayed_topics_and_each_gets_every_stage_change(
    settings: FlywheelSettings,
    topics: str,
    model_dir: Path,
    app_key: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    caplog.set_level(logging.INFO, logger="flywheel")
    async with registry_history(settings, tmp_path) as registry:
        homes = [settings.home.parent / f"replica-{name}" for name in "ab"]
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(replica(settings, homes[0], app_key, serving_on(model_dir)))
            b = await stack.enter_async_context(replica(settings, homes[1], app_key, serving_on(model_dir)))
            for name, http in (("a", a), ("b", b)):
                await until_answered_by(
                    http, "tiny:v1", f"replica {name} serving production v1 from the replayed history", caplog
                )

            await promote_v2(registry)
            for name, http in (("a", a), ("b", b)):
                await until_answered_by(http, "tiny:v2", f"replica {name} following the promotion of v2")

        async with replica(settings, homes[0], app_key, serving_on(model_dir)) as restarted:
            await until_answered_by(restarted, "tiny:v2", "the restarted replica serving v2")
            pinned = await restarted.post("/v1/completions", json={"model": "tiny:v1", "prompt": "Hi", "max_tokens": 1})
    assert pinned.status_code == 404 and "not loaded" in pinned.text, pinned.text


async def test_a_promotion_under_load_answers_every_request_and_unloads_the_old_adapter_after_its_requests(
    settings: FlywheelSettings,
    topics: str,
    model_dir: Path,
    app_key: str,
    tmp_path: Path,  # noqa: F811
) -> None:
    """Production moves from v1 to v2 while requests keep coming: none fails (a request already routed
    to v1 when v1 is archived still finds it loaded), and v1 is unloaded once its requests are done."""
    serving = serving_on(
        model_dir, rate_limit_rps=1000, rate_limit_burst=1000
    )  # one key sends all of it; the limit is not under test
    async with registry_history(settings, tmp_path) as registry:
        async with replica(settings, settings.home.parent / "replica-load", app_key, serving) as http:
            await until_answered_by(http, "tiny:v1", "serving production v1")
            statuses: list[int] = []
            served: list[str] = []
            promoted = asyncio.Event()

            async def client() -> None:
                while not promoted.is_set() or served.count("tiny:v2") < 8:
                    response = await http.post(
                        "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 16}
                    )
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        served.append(response.json()["model"])

            clients = [asyncio.create_task(client()) for _ in range(6)]
            await eventually(lambda: len(served) >= 12, what="traffic on v1 before the promotion", timeout_s=60)
            await promote_v2(registry)
            promoted.set()
            await asyncio.wait_for(asyncio.gather(*clients), timeout=180)
            pinned = await http.post("/v1/completions", json={"model": "tiny:v1", "prompt": "Hi", "max_tokens": 1})
    assert set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
    assert served[0] == "tiny:v1" and served[-1] == "tiny:v2" and set(served) == {"tiny:v1", "tiny:v2"}, set(served)
    assert "tiny" not in served, "production was empty (the base model answered) during the promotion"
    assert pinned.status_code == 404 and "not loaded" in pinned.text, pinned.text  # v1 was unloaded after its requests
