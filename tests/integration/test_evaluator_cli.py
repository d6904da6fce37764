"""`flywheel eval request|show|list` as a user runs them: subprocesses against a running evaluator
(its create_app under build_process on the real broker, served by uvicorn), with real API keys.
The evaluation runs on the tiny random model; what is tested is the command line and the door."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contracts.events import DatasetPublished, ModelRegistered, PromptPublished
from contracts.http import Role
from infra.processes import free_port
from services.evaluator.app import create_app
from services.evaluator.settings import EvaluatorSettings
from services.evaluator.store import EvaluatorStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.service import Runtime, build_process
from services.runtime.settings import FlywheelSettings
from tests.evaluator_support import MODEL, golden_lines, tiny_base_dir
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.support import api_key, eventually, served

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


async def flywheel(*args: str) -> tuple[int, str, str]:
    """Run the CLI without blocking the loop that serves the evaluator it talks to."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")} | {
        "PYTHONWARNINGS": "ignore"
    }
    process = await asyncio.create_subprocess_exec(
        FLYWHEEL, *args, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=300)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, out.decode(), err.decode()


@pytest.fixture
async def evaluator_url(
    settings: FlywheelSettings, chdb_target: ClickHouseTarget, tmp_path: Path
) -> AsyncIterator[str]:
    clickhouse: ClickHouseStore = chdb_target.open()
    clickhouse.migrate()
    artifacts = ArtifactStore(settings.home / "artifacts")
    base = artifacts.put_directory(tiny_base_dir(tmp_path))
    golden = artifacts.put_bytes("\n".join(golden_lines(3)).encode(), kind="jsonl")

    def evaluator(runtime: Runtime):  # noqa: ANN202
        runtime.clickhouse = lambda: clickhouse  # chDB allows one data directory per process: the session's
        return create_app(runtime, EvaluatorSettings(max_tokens=6, resamples=200))

    app, runtime = build_process(settings, [evaluator], title="flywheel-evaluator-cli-test")
    async with app.router.lifespan_context(app):
        bus = runtime.bus("registry")
        await bus.publish(
            ModelRegistered(
                model_name=MODEL,
                source="test",
                architecture="LlamaForCausalLM",
                parameter_count=1,
                artifact_uri=base.uri,
                artifact_sha256=base.sha256,
            )
        )
        await bus.publish(
            DatasetPublished(
                dataset_name="acme-golden",
                version=1,
                split="golden",
                row_count=3,
                sha256=golden.sha256,
                artifact_uri=golden.uri,
                provenance="uploaded",
                model_name=MODEL,
            )
        )
        await bus.publish(
            PromptPublished(
                prompt_name="acme-support",
                version=1,
                template="You are Acme Nimbus hub support.",
                labels=["production"],
            )
        )
        await bus.publish(
            PromptPublished(
                prompt_name="acme-support",
                version=2,
                template="You are Acme Nimbus hub support. Answer in one sentence.",
            )
        )
        catalogue = EvaluatorStore(settings.home / "evaluator" / "evaluator.db")
        try:
            await eventually(
                lambda: (
                    catalogue.base_model(MODEL) is not None
                    and catalogue.latest_golden(MODEL) is not None
                    and catalogue.prompt("acme-support", 2) is not None
                ),
                what="the catalogue",
            )
        finally:
            catalogue.close()
        async with served(app, lifespan="off") as url:
            yield url


async def test_request_wait_show_and_list_through_the_cli(evaluator_url: str, settings: FlywheelSettings) -> None:
    operator, viewer = api_key(settings, Role.operator), api_key(settings, Role.viewer)
    door = ("--url", evaluator_url)

    code, out, err = await flywheel(
        "eval",
        "request",
        "--model",
        MODEL,
        "--prompt",
        "acme-support:2",
        "--golden",
        "acme-golden:1",
        "--suite",
        "fast",
        "--wait",
        *door,
        "--api-key",
        operator,
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    evaluation_id = lines[0].split()[0]
    assert lines[0] == f"{evaluation_id}  queued"
    assert lines[1] in (f"{evaluation_id}  completed PASSED", f"{evaluation_id}  completed FAILED")
    assert any(line.startswith("  FAIL token_f1") or line.startswith("  PASS token_f1") for line in lines)
    assert any(line.startswith("  POLICY facts@v1 (auto: 3/3 golden references state numbers") for line in lines)
    assert lines[-1].startswith("  report: ")

    code, out, err = await flywheel("eval", "show", evaluation_id, "--json", *door, "--api-key", viewer)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["status"] == "completed" and shown["request"]["requested_by"] == "test-operator"
    result = shown["result"]
    assert result["candidate"] == {
        "model_name": MODEL,
        "adapter_version": None,
        "prompt_name": "acme-support",
        "prompt_version": 2,
    }
    assert result["baseline"] == {
        "model_name": MODEL,
        "adapter_version": None,
        "prompt_name": "acme-support",
        "prompt_version": 1,
    }  # the production label

    code, out, err = await flywheel("eval", "list", "--model", MODEL, *door, "--api-key", viewer)
    assert (code, out.split()) == (0, [evaluation_id, "completed", lines[1].split()[-1]]), err


async def test_bad_requests_are_one_clear_line(evaluator_url: str, settings: FlywheelSettings) -> None:
    viewer = api_key(settings, Role.viewer)
    door = ("--url", evaluator_url)
    request = ("eval", "request", "--model", MODEL, "--golden", "acme-golden:1")

    evaluations = f"{evaluator_url}/evaluator/v1/evaluations"
    code, _, err = await flywheel(*request, *door, "--api-key", viewer)
    assert (
        code != 0 and err.startswith(f"error: POST {evaluations} answered 403: ") and len(err.strip().splitlines()) == 1
    )
    assert "operator" in err, err  # names the role that may

    code, _, err = await flywheel(*request, *door, "--api-key", "fw_not_a_key")
    assert (
        code != 0 and err.startswith(f"error: POST {evaluations} answered 401: ") and len(err.strip().splitlines()) == 1
    )

    code, _, err = await flywheel("eval", "request", "--model", MODEL, "--golden", "acme-golden", *door)
    assert code == 1 and err.strip() == "error: --golden 'acme-golden': write it as NAME:VERSION, e.g. acme-golden:1"
    code, _, err = await flywheel(
        "eval", "request", "--model", MODEL, "--golden", "acme-golden:1", "--prompt", "acme-support:latest", *door
    )
    assert (
        code == 1
        and err.strip() == "error: --prompt 'acme-support:latest': write it as NAME:VERSION, e.g. acme-support:2"
    )

    code, _, err = await flywheel("eval", "show", "ev-nope", *door, "--api-key", viewer)
    assert code != 0 and err.strip() == f"error: GET {evaluations}/ev-nope answered 404: no evaluation 'ev-nope'"

    code, _, err = await flywheel("eval", "list", "--url", f"http://127.0.0.1:{free_port()}", "--api-key", viewer)
    assert (
        code != 0
        and err.startswith("error: cannot reach the evaluator at http://127.0.0.1:")
        and "Traceback" not in err
    )
