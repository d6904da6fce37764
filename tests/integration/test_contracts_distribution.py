"""An app can publish events with only the contracts installed: a fresh virtual environment gets
`pip install ./contracts` (pydantic and aiokafka, nothing of the platform) and publishes to the
real broker."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contracts.envelope import Envelope
from contracts.events import FeedbackReceived, InferenceLogged
from contracts.topics import topic_for
from tests.conftest import REPO
from tests.integration.test_event_bus import read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

APP = textwrap.dedent(
    """
    import asyncio, importlib.util, sys
    from contracts.events import FeedbackReceived, InferenceLogged
    from contracts.publisher import EventPublisher

    for forbidden in ("services", "faststream", "torch", "fastapi"):
        assert importlib.util.find_spec(forbidden) is None, f"{forbidden} should not be installed"

    async def main(bootstrap, prefix):
        async with EventPublisher(bootstrap, producer="standalone-app", topic_prefix=prefix) as publisher:
            envelope = await publisher.publish(InferenceLogged(inference_id="from-standalone-app", model_name="smollm2", output_text="hi"))
        print(envelope.event_id)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def test_an_app_publishes_with_only_the_contracts_installed(tmp_path: Path, kafka_bootstrap: str, topics: str) -> None:
    source = tmp_path / "contracts"
    shutil.copytree(REPO / "contracts", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    script = tmp_path / "app.py"
    script.write_text(APP)
    run = subprocess.run(
        [str(python), str(script), kafka_bootstrap, topics], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    event_id = run.stdout.strip()

    records = asyncio.run(read_all(kafka_bootstrap, topic_for(InferenceLogged, topics), 1))
    assert len(records) == 1
    envelope = Envelope[InferenceLogged].model_validate_json(records[0].value)
    assert str(envelope.event_id) == event_id
    assert envelope.producer == "standalone-app"
    assert envelope.payload.inference_id == "from-standalone-app"


def test_the_documented_app_example_runs_with_only_the_contracts(
    tmp_path: Path, kafka_bootstrap: str, topics: str
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    source = tmp_path / "contracts"
    shutil.copytree(REPO / "contracts", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    run = subprocess.run(
        [
            str(python),
            str(REPO / "examples" / "app_publishes_events.py"),
            "--bootstrap",
            kafka_bootstrap,
            "--topic-prefix",
            topics,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    inference_id = run.stdout.split()[1].rstrip(":")
    inferences = asyncio.run(read_all(kafka_bootstrap, topic_for(InferenceLogged, topics), 1))
    feedback = asyncio.run(read_all(kafka_bootstrap, topic_for(FeedbackReceived, topics), 1))
    assert Envelope[InferenceLogged].model_validate_json(inferences[0].value).payload.inference_id == inference_id
    assert Envelope[FeedbackReceived].model_validate_json(feedback[0].value).payload.inference_id == inference_id
