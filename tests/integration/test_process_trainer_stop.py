"""An idle trainer worker stops when asked, instead of waiting out stop_pause_s for a step that is not running
(every `flywheel up` and `flywheel demo` shutdown waited 120 s for it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.runtime.artifacts import ArtifactStore
from services.trainer.service import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.store import JobStore
from tests.integration.test_trainer_service import DictCatalog, RecordingPublisher

pytestmark = pytest.mark.integration

# stop() may wait this long for a training step in flight; with no job it must not wait at all. The
# test's own wait (60 s) only catches that hang; it measures no speed.
PAUSE_S = 3600


@pytest.mark.parametrize("idle_for_s", [0.0, 1.0], ids=["stopped-at-once", "stopped-while-idle"])
async def test_an_idle_worker_stops_without_waiting_for_a_step(tmp_path: Path, idle_for_s: float) -> None:
    trainer = Trainer(
        JobStore(tmp_path / "jobs.db"),
        DictCatalog(tmp_path / "no-model", {}),
        ArtifactStore(tmp_path / "artifacts"),
        RecordingPublisher(),
        work_root=tmp_path / "jobs",
        settings=TrainerSettings(stop_pause_s=PAUSE_S),
    )
    await trainer.start()
    await asyncio.sleep(idle_for_s)
    await asyncio.wait_for(trainer.stop(), 60)
    assert trainer._worker is None  # noqa: SLF001 - the worker task was ended, not left behind
