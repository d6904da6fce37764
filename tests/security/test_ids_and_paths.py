"""Ids are never paths, and artifacts load only from the configured store (issue 13).

An operator's `job_id` of `../../victim` used to make the trainer delete `FLYWHEEL_HOME/victim` when
the job failed. Here that id, and its variants, arrive through the trainer's door (422 with the
reason) and as a `training.requested` event on real Kafka (dead-lettered with the reason); a planted
sentinel directory survives every attempt. A job id that got past the contract (a row stored before
it) is refused by the path check itself. Artifact URIs from outside (`file:///etc/passwd`, another
bucket, a path with `..`, another store's well-formed adapter) are refused by the trainer's, the
evaluator's and the registry's intake and by the function serving loads adapters with.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from safetensors.numpy import save_file

from contracts.envelope import wrap
from contracts.events import (
    AdapterRegistered,
    DatasetPublished,
    DatasetRef,
    Hyperparameters,
    ModelRegistered,
    Stage,
    StageChanged,
    TrainingRequested,
)
from contracts.http import Role
from contracts.topics import dlq_for, topic_for
from services.registry.app import create_app as create_registry
from services.runtime.artifacts import ArtifactOutsideStore, ArtifactStore
from services.runtime.service import build_process
from services.runtime.settings import FlywheelSettings
from services.serving.handlers import (
    AdapterLoader,
    Deps,
    when_adapter_registered_remember_it,
    when_stage_changed_route_and_load,
)
from services.serving.prompt_routes import PromptRoutes
from services.serving.routes import Routes
from services.trainer.app import create_app as create_trainer
from services.trainer.service import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobRecord, JobStore
from tests.support import api_key, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SENTINEL_TEXT = "this directory must outlive every attempt"

# job_id -> what the 422 says about it.
HOSTILE_JOB_IDS = {
    "../../victim": "should match pattern",
    "..": "should match pattern",
    "a/b": "should match pattern",
    "%2e%2e%2f": "should match pattern",
    "/etc/passwd": "should match pattern",
    "..\\victim": "should match pattern",
    "a\x00b": "should match pattern",
    "x" * 231: "at most 230 characters",
}


def plant_victim(home: Path) -> Path:
    """`FLYWHEEL_HOME/victim/keep.txt`: where `../../victim` from the trainer's work root leads."""
    victim = home / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text(SENTINEL_TEXT)
    return victim


def assert_victim_survived(victim: Path) -> None:
    assert (victim / "keep.txt").read_text() == SENTINEL_TEXT, f"{victim} was changed"


@asynccontextmanager
async def trainer_door(
    settings: FlywheelSettings, role: Role, trainer: TrainerSettings | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    app, runtime = build_process(
        settings, [partial(create_trainer, settings=trainer or TrainerSettings())], title="flywheel-security"
    )
    key = api_key(settings, role)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://trainer",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ) as http,
    ):
        yield http, runtime


async def dead_letters(bootstrap: str, topic: str) -> list[tuple[bytes | None, dict[str, str]]]:
    """Every record of `topic` (a `<topic>.dlq`) so far: its key and headers."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    letters: list[tuple[bytes | None, dict[str, str]]] = []
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001 - the topic may be new to this client
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not partitions:
            return letters
        consumer.assign(partitions)
        end = await consumer.end_offsets(partitions)
        await consumer.seek_to_beginning(*partitions)
        while any([await consumer.position(tp) < end[tp] for tp in partitions]):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                letters.extend(
                    (record.key, {name: value.decode() for name, value in record.headers}) for record in records
                )
    finally:
        await consumer.stop()
    return letters


# --------------------------------------------------------------------------------------- HTTP door


async def test_hostile_ids_at_the_trainer_door_get_422_with_the_reason_and_change_nothing(
    settings: FlywheelSettings, topics: str
) -> None:
    victim = plant_victim(settings.home)
    async with trainer_door(settings, Role.operator) as (http, _):
        for job_id, reason in HOSTILE_JOB_IDS.items():
            answer = await http.post(
                "/trainer/v1/training-jobs",
                json={"model_name": "smollm2", "dataset": {"name": "tiny", "version": 1}, "job_id": job_id},
            )
            assert answer.status_code == 422, (job_id, answer.text)
            error = answer.json()["error"]
            assert (
                error["param"] == "job_id" and error["message"].startswith("job_id: ") and reason in error["message"]
            ), (job_id, error)

        for field, body in {
            "model_name": {"model_name": "../../victim", "dataset": {"name": "tiny", "version": 1}},
            "dataset.name": {"model_name": "smollm2", "dataset": {"name": "../victim", "version": 1}},
        }.items():
            answer = await http.post("/trainer/v1/training-jobs", json=body)
            assert answer.status_code == 422 and answer.json()["error"]["param"] == field, answer.text

        # The id in the path has the same type: a decoded `..`, a NUL, a leading dot, an overlong id.
        for raw in ("%2e%2e", "%00", ".hidden", "x" * 231):
            for method, path in (
                ("GET", f"/trainer/v1/training-jobs/{raw}"),
                ("POST", f"/trainer/v1/training-jobs/{raw}/cancel"),
            ):
                answer = await http.request(method, path)
                assert answer.status_code == 422 and answer.json()["error"]["param"] == "path.job_id", (
                    method,
                    raw,
                    answer.text,
                )
        # An encoded slash splits the path: no door matches, so no job is looked up at all.
        answer = await http.post("/trainer/v1/training-jobs/..%2F..%2Fvictim/cancel")
        assert answer.status_code == 404 and answer.json()["error"]["code"] != "job_not_found", answer.text

        assert (await http.get("/trainer/v1/training-jobs")).json() == []
    assert_victim_survived(victim)
    assert not (settings.home / "trainer" / "jobs").exists() or not any((settings.home / "trainer" / "jobs").iterdir())


# ------------------------------------------------------------------------------------- Kafka events


async def test_a_hostile_training_requested_event_is_dead_lettered_and_the_trainer_goes_on(
    settings: FlywheelSettings, topics: str, kafka_bootstrap: str
) -> None:
    victim = plant_victim(settings.home)
    hp = Hyperparameters(rank=4, alpha=8, batch_size=2, epochs=1, max_seq_length=128)
    valid = TrainingRequested(
        job_id="job-after-hostile",
        model_name="smollm2",
        dataset=DatasetRef(name="tiny", version=1),
        hyperparameters=hp,
        requested_by="test",
    )
    # What a forger on the broker writes: a well-formed envelope whose job id is a path.
    hostile = json.loads(wrap(valid, producer="forger").model_dump_json())
    hostile["event_id"] = str(uuid.uuid4())
    hostile["payload"]["job_id"] = "../../victim"
    topic = topic_for(TrainingRequested, settings.topic_prefix)

    # input_wait_s=0: the valid job after it fails at once (no such model).
    async with trainer_door(settings, Role.viewer, TrainerSettings(input_wait_s=0)) as (http, runtime):
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, json.dumps(hostile).encode(), key=b"hostile")
        finally:
            await producer.stop()
        await runtime.bus("test").publish(valid)

        async def valid_job_failed() -> bool:
            answer = await http.get("/trainer/v1/training-jobs/job-after-hostile")
            return answer.status_code == 200 and answer.json()["status"] == "failed"

        await eventually(
            valid_job_failed,
            what="the request after the hostile one to be consumed and to end",
            timeout_s=120,
            interval_s=0.5,
        )

        async def hostile_dead_lettered() -> list[dict[str, str]]:
            return [
                headers for key, headers in await dead_letters(kafka_bootstrap, dlq_for(topic)) if key == b"hostile"
            ]

        await eventually(
            hostile_dead_lettered, what="the hostile request in the dead-letter topic", timeout_s=60, interval_s=0.5
        )
        [letter] = await hostile_dead_lettered()
        assert letter["x-flywheel-consumer-group"] == "trainer"
        assert "job_id" in letter["x-flywheel-error"] and "should match pattern" in letter["x-flywheel-error"], letter
        assert [job["job_id"] for job in (await http.get("/trainer/v1/training-jobs")).json()] == ["job-after-hostile"]
    assert_victim_survived(victim)


async def test_a_model_registered_event_naming_an_artifact_outside_the_store_is_dead_lettered(
    settings: FlywheelSettings, topics: str, kafka_bootstrap: str
) -> None:
    forged = ModelRegistered(
        model_name="smollm2",
        source="forger",
        architecture="LlamaForCausalLM",
        parameter_count=1,
        artifact_uri="file:///etc/passwd",
        artifact_sha256="0" * 64,
    )
    async with trainer_door(settings, Role.viewer) as (_, runtime):
        await runtime.bus("forger").publish(forged)
        topic = dlq_for(topic_for(ModelRegistered, settings.topic_prefix))

        async def letters() -> list[dict[str, str]]:
            return [
                headers
                for _, headers in await dead_letters(kafka_bootstrap, topic)
                if headers.get("x-flywheel-consumer-group") == "trainer"
            ]

        await eventually(
            letters, what="the forged model.registered in the dead-letter topic", timeout_s=60, interval_s=0.5
        )
        [letter] = await letters()
    assert letter["x-flywheel-error-type"] == "ArtifactOutsideStore"
    assert (
        "file:///etc/passwd" in letter["x-flywheel-error"]
        and "outside the artifact store" in letter["x-flywheel-error"]
    ), letter


# ------------------------------------------------------------------------------ defence in depth


class _RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def publish(self, payload: object, **_: object) -> None:
        self.events.append(payload)

    async def publish_envelope(self, envelope: object) -> None:
        self.events.append(envelope)


async def test_a_stored_job_whose_id_is_a_path_is_refused_by_the_path_check(tmp_path: Path) -> None:
    """A row written before ids were constrained skips the contract; the path check alone stops it."""
    home = tmp_path / "home"
    victim = plant_victim(home)
    store = JobStore(home / "trainer" / "jobs.db")
    job, _ = store.add(
        JobRecord(
            job_id="../../victim",
            model_name="smollm2",
            dataset=DatasetRef(name="tiny", version=1),
            hyperparameters=Hyperparameters(),
            status="queued",
            correlation_id=None,
            requested_by="legacy",
        )
    )
    publisher = _RecordingPublisher()

    class NoCatalog:
        def model_path(self, model_name: str) -> Path:
            raise AssertionError("a refused job must not resolve its inputs")

        dataset_path = model_path

    trainer = Trainer(
        store,
        NoCatalog(),
        ArtifactStore(home / "artifacts"),
        publisher,
        work_root=home / "trainer" / "jobs",
        settings=TrainerSettings(input_wait_s=0),
    )
    try:
        await trainer.run_job(job)
        refused = store.get("../../victim")
    finally:
        store.close()
    assert refused is not None and refused.status == "failed" and refused.error_type == "invalid_input"
    assert "not inside" in (refused.error or ""), refused.error
    assert publisher.events == []  # no event could carry that id
    assert_victim_survived(victim)


# ------------------------------------------------------------------------------------ artifact URIs


class _RecordingEngine:
    """Stands in for the inference engine (Triton is not under test): which adapter directories it was handed."""

    def __init__(self) -> None:
        self.adapters: dict[str, str] = {}
        self.loads: list[tuple[str, Path]] = []

    def load_adapter(self, name: str, path: str | Path) -> None:
        self.loads.append((name, Path(path)))
        self.adapters[name] = str(path)

    def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)


def _adapter(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True)
    save_file({"lora_A": np.full((2, 2), seed, dtype=np.float32)}, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"r": 2, "seed": seed}))
    return directory


async def test_serving_loads_adapters_only_from_its_configured_store(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    elsewhere = ArtifactStore(tmp_path / "elsewhere")
    own = store.put_directory(_adapter(tmp_path / "own", seed=1))
    foreign = elsewhere.put_directory(_adapter(tmp_path / "foreign", seed=2))  # well formed, right digest, wrong place
    hostile = {
        "file:///etc/passwd": "0" * 64,
        f"s3://elsewhere/sha256/{foreign.sha256[:2]}/{foreign.sha256}": foreign.sha256,
        f"{store.root}/sha256/../../elsewhere/sha256/{foreign.sha256[:2]}/{foreign.sha256}": foreign.sha256,
        foreign.uri: foreign.sha256,
        f"simplecache::{own.uri}": own.sha256,
    }
    routes, engine = Routes(), _RecordingEngine()
    routes.add_model("m")
    cache = tmp_path / "serving-cache"
    loader = AdapterLoader(routes, store, cache, lambda: engine)
    deps = Deps(routes=routes, prompts=PromptRoutes(), loader=loader, bus=None)  # type: ignore[arg-type]  # no deployment.requested here
    register = partial(when_adapter_registered_remember_it, deps=deps)
    promote = partial(when_stage_changed_route_and_load, deps=deps)

    for version, (uri, sha256) in enumerate(hostile.items(), start=1):
        await register(
            wrap(
                AdapterRegistered(model_name="m", adapter_version=version, artifact_uri=uri, artifact_sha256=sha256),
                producer="forger",
            )
        )
        with pytest.raises(ArtifactOutsideStore, match="outside the artifact store"):
            await promote(
                wrap(
                    StageChanged(
                        model_name="m",
                        adapter_version=version,
                        from_stage=Stage.staging,
                        to_stage=Stage.production,
                        actor="forger",
                        approver="forger",
                    ),
                    producer="forger",
                )
            )
        assert routes.resolve("m").route == "direct", uri  # production still answers from the base model
    assert engine.loads == [] and not cache.exists()

    # The same path with the store's own adapter: the check refuses the place, not the mechanism.
    await register(
        wrap(
            AdapterRegistered(model_name="m", adapter_version=99, artifact_uri=own.uri, artifact_sha256=own.sha256),
            producer="registry",
        )
    )
    await promote(
        wrap(
            StageChanged(
                model_name="m",
                adapter_version=99,
                from_stage=Stage.staging,
                to_stage=Stage.production,
                actor="a",
                approver="b",
            ),
            producer="registry",
        )
    )
    assert routes.resolve("m").label == "m:v99"
    [(_, directory)] = engine.loads
    assert directory.is_relative_to(cache.resolve()) and (directory / "adapter_config.json").exists()


async def test_the_registry_refuses_a_base_model_outside_its_store(settings: FlywheelSettings, topics: str) -> None:
    app, _ = build_process(settings, [create_registry], title="flywheel-security")
    # The key after the start: the registry's migrations create the key table.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://registry", timeout=30) as http,
    ):
        http.headers["Authorization"] = f"Bearer {api_key(settings, Role.operator)}"
        answer = await http.post(
            "/registry/v1/models",
            json={
                "name": "smollm2",
                "source": "forger",
                "architecture": "LlamaForCausalLM",
                "parameter_count": 1,
                "artifact_uri": "file:///etc/passwd",
                "artifact_sha256": "0" * 64,
            },
        )
        assert answer.status_code == 422, answer.text
        assert (
            answer.json()["error"]["param"] == "artifact_uri"
            and "outside the artifact store" in answer.json()["error"]["message"]
        )
        assert (await http.get("/registry/v1/models/smollm2")).status_code == 404
        assert (await http.get("/registry/v1/models/..%2e")).status_code == 422  # the name in the path has its type too


async def test_the_evaluator_refuses_artifacts_outside_its_store_on_arrival(tmp_path: Path) -> None:
    """Its consumer dead-letters what a handler refuses; here the handlers themselves, as its consumer calls them."""
    from services.evaluator.handlers import (
        Deps,
        when_adapter_registered_evaluate_against_production,
        when_dataset_published_remember_it,
        when_model_registered_remember_it,
    )
    from tests.evaluator_support import evaluator_for

    evaluator = evaluator_for(tmp_path / "home", clickhouse=None, embedder=None)

    class Worker:
        kicked = 0

        def kick(self) -> None:
            self.kicked += 1

    worker = Worker()
    deps = Deps(evaluator, worker)  # type: ignore[arg-type]  # a worker that only counts kicks
    outside = "file:///etc/passwd"
    forged = [
        (
            when_model_registered_remember_it,
            ModelRegistered(
                model_name="m",
                source="forger",
                architecture="LlamaForCausalLM",
                parameter_count=1,
                artifact_uri=outside,
                artifact_sha256="0" * 64,
            ),
        ),
        (
            when_adapter_registered_evaluate_against_production,
            AdapterRegistered(
                model_name="m",
                adapter_version=1,
                artifact_uri=f"s3://elsewhere/sha256/00/{'0' * 64}",
                artifact_sha256="0" * 64,
            ),
        ),
        (
            when_dataset_published_remember_it,
            DatasetPublished(
                dataset_name="g",
                version=1,
                split="golden",
                row_count=1,
                sha256="0" * 64,
                artifact_uri=outside,
                provenance="uploaded",
                model_name="m",
            ),
        ),
    ]
    for handle, event in forged:
        with pytest.raises(ArtifactOutsideStore, match="outside the artifact store"):
            await handle(wrap(event, producer="forger"), deps)
    assert (
        evaluator.store.base_model("m") is None
        and evaluator.store.adapter("m", 1) is None
        and evaluator.store.dataset("g", 1) is None
    )
    assert worker.kicked == 0 and evaluator.store.evaluations(model_name="m", limit=10) == []
