"""The LLM-as-judge metric against a live OpenAI-compatible endpoint: Flywheel's own gateway, serving
the real SmolLM2-135M on Triton over uvicorn, called by the openai client the judge is built with.

The answers under evaluation come from the tiny random model (the judge is what is tested here). A
judge's parsed scores are stored per example; a reply without a score is that example's error.
SmolLM2-135M cannot follow correctness@v1 (it answers the question instead of grading), so v1
shows the error path, and v2 (worked examples) the scored one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import uvicorn

from infra.processes import free_port
from contracts.events import DatasetRef, EvaluationRequested, ModelTarget
from services.runtime.auth import ApiKey, Authenticator, KeyStore, Role, create_database_engine
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.http import create_http_app
from services.runtime.inference import Engine
from services.runtime.scoring import Embedder, Judge
from services.runtime.service import Runtime
from services.runtime.settings import FlywheelSettings
from services.serving.api import create_router
from services.serving.gateway import Gateway
from services.serving.inference_log import InferenceLogBuffer
from services.serving.limits import RateLimiter
from services.serving.routes import Routes
from services.serving.settings import ServingSettings
from services.serving.triton import TritonServing
from tests.evaluator_support import MODEL, evaluator_for, golden_lines, random_adapter, register, tiny_base_dir
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.fixtures.trainer_model import base_model_dir  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

JUDGE = "smollm2-judge"
EXAMPLES = 3


@contextlib.asynccontextmanager
async def judge_gateway(base_model_dir: Path, workdir: Path, runtime: Runtime) -> AsyncIterator[tuple[str, str]]:  # noqa: F811
    """(base URL, app key) of a gateway serving the real SmolLM2 base model on Triton, over uvicorn."""
    engine = Engine.from_pretrained(base_model_dir, model_name=JUDGE)
    database = create_database_engine(f"sqlite:///{workdir / 'keys.db'}")
    ApiKey.metadata.create_all(database, tables=[ApiKey.__table__])  # type: ignore[attr-defined]
    keys = KeyStore(database)
    app_key, _ = keys.create(principal="evaluator-judge", role=Role.app, created_by="test")
    routes = Routes()
    routes.add_model(JUDGE)  # no adapter in production: requests go to the base model
    triton = TritonServing(engine, workdir=workdir / "triton", max_batch_size=4)
    buffer = InferenceLogBuffer(runtime.bus("serving"), capacity=100)
    gateway = None
    task = None
    server = None
    try:
        triton.start()
        assert triton.ports is not None
        await buffer.start()
        gateway = Gateway(
            routes=routes,
            tokenizer=engine.tokenizer,
            triton_grpc_url=triton.ports.grpc_url,
            settings=ServingSettings(),
            log_buffer=buffer,
            loaded_adapters=set,
        )
        router = create_router(
            lambda: gateway,
            guard=Authenticator(keys).require(Role.app),
            limiter=RateLimiter(rate_per_s=1000, burst=1000),
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_http_app("judge-gateway", routers=[router]),
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="off",
            )
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), "uvicorn stopped while starting"
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1", app_key
    finally:
        if server is not None and task is not None:
            server.should_exit = True
            await task
        if gateway is not None:
            await gateway.close()
        await buffer.stop()
        triton.stop()


@pytest.fixture
async def runtime(settings: FlywheelSettings, topics: str) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings, client_id="evaluator-judge-test")
    await runtime.broker.start()
    try:
        yield runtime
    finally:
        await runtime.broker.stop()
        runtime.close()


async def test_the_judge_grades_through_flywheels_gateway_and_an_unparseable_reply_is_an_error(
    base_model_dir: Path,
    tmp_path: Path,
    chdb_target: ClickHouseTarget,
    runtime: Runtime,  # noqa: F811
) -> None:
    clickhouse: ClickHouseStore = chdb_target.open()
    clickhouse.migrate()
    evaluator = evaluator_for(tmp_path / "home", clickhouse, Embedder())
    register(
        evaluator,
        tiny_base_dir(tmp_path),
        adapters={1: random_adapter(tmp_path, seed=3)},
        golden={1: "\n".join(golden_lines(EXAMPLES))},
    )

    async with judge_gateway(base_model_dir, tmp_path, runtime) as (base_url, key):
        client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
        results = {}
        for rubric in ("correctness@v2", "correctness@v1"):
            evaluator.judge = lambda rubric=rubric: Judge(client, model=JUDGE, rubric=rubric, max_tokens=8)
            evaluation_id = f"ev-judge-{rubric.replace('@', '-')}"
            results[rubric] = await evaluator.run(
                EvaluationRequested(
                    evaluation_id=evaluation_id,
                    candidate=ModelTarget(model_name=MODEL, adapter_version=1),
                    golden=DatasetRef(name="acme-golden", version=1),
                    metric_suite="judge",
                    requested_by="test",
                )
            )
        await client.close()

    def judged(evaluation_id: str, metric: str) -> list[dict]:
        return clickhouse.query(
            "SELECT target, example_id, score, error FROM evaluation_result FINAL WHERE evaluation_id = {id:String} AND metric = {metric:String} ORDER BY target, example_id",
            {"id": evaluation_id, "metric": metric},
        )

    scored = results["correctness@v2"]
    assert scored.status == "completed", scored.error
    summary = next(m for m in scored.metrics if m.metric == "judge_correctness_v2")
    rows = judged("ev-judge-correctness-v2", "judge_correctness_v2")
    print("\ncorrectness@v2:", rows, "\ncorrectness@v1:", judged("ev-judge-correctness-v1", "judge_correctness_v1"))
    assert len(rows) == 2 * EXAMPLES  # every example of both targets was graded
    assert all(row["error"] is None and row["score"] in (0.0, 0.25, 0.5, 0.75, 1.0) for row in rows), (
        rows
    )  # "Score: N", N in 1-5, normalised
    assert (summary.examples, summary.errors) == (EXAMPLES, 0)

    unparsed = results["correctness@v1"]
    assert unparsed.status == "completed", unparsed.error
    summary = next(m for m in unparsed.metrics if m.metric == "judge_correctness_v1")
    assert (summary.examples, summary.errors) == (0, EXAMPLES)  # counted as errors, not as any score
    rows = judged("ev-judge-correctness-v1", "judge_correctness_v1")
    assert len(rows) == 2 * EXAMPLES
    assert all(
        row["score"] is None and row["error"].startswith("JudgeParseError: no score in the judge's reply")
        for row in rows
    ), rows
