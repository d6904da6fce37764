"""The registry's `import-base` into the home its caller names: `flywheel demo --home X` imports the base
model into X by handing its settings, with the environment's FLYWHEEL_HOME left as it is (the demo
no longer writes the environment for the commands it runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import create_engine, text

from services.cli.service_commands import service_cli
from services.runtime.auth import registry_database_url
from services.runtime.settings import FlywheelSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_import_base_into_the_handed_home_not_the_environment_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "environment-home"
    monkeypatch.setenv("FLYWHEEL_HOME", str(elsewhere))
    model_dir = tmp_path / "Tiny-LM"
    model_dir.mkdir()
    save_file({"embed.weight": torch.zeros(10, 4)}, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"], "model_type": "tiny"}))
    home = tmp_path / "demo-home"
    registry_cli = service_cli("registry")
    assert registry_cli is not None

    before = dict(os.environ)
    settings = FlywheelSettings(home=home)
    registry_cli.import_base_into(settings, model_dir, "tiny")
    assert dict(os.environ) == before

    with create_engine(registry_database_url(settings)).connect() as connection:
        names = connection.execute(text("SELECT name FROM base_model")).scalars().all()
    assert names == ["tiny"]
    assert any((home / "artifacts").rglob("*")), "the weights were not stored in the handed home's artifact store"
    assert not elsewhere.exists(), "the environment's FLYWHEEL_HOME was written to"
