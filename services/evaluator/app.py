"""create_app for the evaluator: its catalogue and runs on Kafka, the /evaluator/v1 door, and its console pages."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from services.evaluator.api import create_router
from services.evaluator.console import create_console_router
from services.evaluator.handlers import HANDLERS, Deps
from services.evaluator.service import Evaluator
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.store import EvaluatorStore
from services.evaluator.worker import EvaluationWorker
from services.runtime.auth import Authenticator
from services.runtime.console import Section
from services.runtime.scoring import Embedder, Judge, judge_client
from services.runtime.service import Runtime, Service

GROUP = "evaluator"


def judge_factory(settings: EvaluatorSettings):
    """The LLM judge the settings describe, or None when no endpoint is configured."""

    def build() -> Judge | None:
        if not settings.judge_base_url or not settings.judge_model:
            return None
        client = judge_client(settings.judge_base_url, settings.judge_api_key)
        return Judge(client, model=settings.judge_model, rubric=settings.judge_rubric)

    return build


def create_app(runtime: Runtime, settings: EvaluatorSettings) -> Service:
    store = EvaluatorStore(runtime.home / GROUP / "evaluator.db")
    evaluator = Evaluator(
        store=store,
        artifacts=runtime.artifacts,
        clickhouse=runtime.clickhouse,
        settings=settings,
        home=runtime.home,
        cache=runtime.settings.cache,
        engine_dtype=runtime.settings.engine_dtype,
        embedder=Embedder(),
        judge=judge_factory(settings),
    )
    bus = runtime.bus(GROUP)
    worker = EvaluationWorker(evaluator, bus.publish)
    runtime.subscribe_all(GROUP, HANDLERS, Deps(evaluator, worker))

    async def clickhouse_answers() -> None:
        await asyncio.to_thread(runtime.clickhouse)

    async def stop() -> None:
        await worker.stop()
        await asyncio.to_thread(store.close)

    api = APIRouter()
    api.include_router(create_router(store, Authenticator.for_settings(runtime.settings), bus.publish))
    api.include_router(
        create_console_router(
            store,
            runtime.console,
            golden=evaluator.load_golden,
            clickhouse=runtime.clickhouse,
            publish=bus.publish,
        )
    )
    runtime.console.add(Section(GROUP, "Evaluations", "/evaluator/console/evaluations"))

    return Service(
        name=GROUP,
        api=api,
        readiness={"clickhouse": clickhouse_answers},
        on_start=[clickhouse_answers, worker.start],
        on_stop=[stop],
    )
