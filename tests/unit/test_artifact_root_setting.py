"""One artifact store per process: FLYWHEEL_ARTIFACT_ROOT, read by every service through the runtime.

The per-service names it replaces (FLYWHEEL_{REGISTRY,TRAINER,EVALUATOR,SERVING}_ARTIFACT_ROOT) still
work for one release, with a warning at start naming the new variable. Setting only the registry's
used to leave serving on the default store, refusing every adapter the registry recorded: now every
service of the process follows it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.runtime.errors import ConfigurationError
from services.runtime.service import Runtime, build_process
from services.runtime.settings import FlywheelSettings, load_settings

pytestmark = pytest.mark.unit

LEGACY = ("REGISTRY", "TRAINER", "EVALUATOR", "SERVING")


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A process environment with a home and a broker address (never contacted: nothing here starts)."""
    for name in ("FLYWHEEL_ARTIFACT_ROOT", *(f"FLYWHEEL_{service}_ARTIFACT_ROOT" for service in LEGACY)):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    return monkeypatch


def test_unset_the_store_is_the_home_artifacts_directory(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = load_settings(FlywheelSettings)
    assert settings.artifact_root is None and settings.deprecation_warnings() == []
    assert Runtime(settings, client_id="flywheel").artifacts.root == (tmp_path / "home" / "artifacts").as_uri()


def test_flywheel_artifact_root_is_the_store_of_every_service(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment.setenv("FLYWHEEL_ARTIFACT_ROOT", str(tmp_path / "elsewhere"))
    settings = load_settings(FlywheelSettings)
    for client_id in ("flywheel", "flywheel-registry", "flywheel-serving"):
        assert Runtime(settings, client_id=client_id).artifacts.root == (tmp_path / "elsewhere").as_uri()
    assert settings.deprecation_warnings() == []


@pytest.mark.parametrize("service", LEGACY)
def test_each_former_name_still_works_with_a_warning_at_start(
    service: str, environment: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    environment.setenv(f"FLYWHEEL_{service}_ARTIFACT_ROOT", str(tmp_path / "legacy"))
    settings = load_settings(FlywheelSettings)
    assert settings.artifact_root == str(tmp_path / "legacy")
    with caplog.at_level(logging.WARNING, logger="flywheel.process"):
        _, runtime = build_process(settings, [], title="flywheel-test")
    assert runtime.artifacts.root == (tmp_path / "legacy").as_uri()
    warned = [record.getMessage() for record in caplog.records if record.name == "flywheel.process"]
    assert warned == [
        f"FLYWHEEL_{service}_ARTIFACT_ROOT is deprecated: set FLYWHEEL_ARTIFACT_ROOT (the artifact store every service reads)"
    ]


def test_the_registry_s_former_name_moves_serving_too(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The bug: a serving process given only the registry's variable loaded adapters from the default store."""
    environment.setenv("FLYWHEEL_REGISTRY_ARTIFACT_ROOT", f"memory://{tmp_path.name}/artifacts")
    runtime = Runtime(load_settings(FlywheelSettings), client_id="flywheel-serving")
    assert runtime.artifacts.root == f"memory:///{tmp_path.name}/artifacts"


def test_the_new_name_wins_and_the_ignored_former_one_is_named(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment.setenv("FLYWHEEL_ARTIFACT_ROOT", str(tmp_path / "new"))
    environment.setenv("FLYWHEEL_SERVING_ARTIFACT_ROOT", str(tmp_path / "old"))
    settings = load_settings(FlywheelSettings)
    assert settings.artifact_root == str(tmp_path / "new")
    assert settings.deprecation_warnings() == [
        "ignoring deprecated FLYWHEEL_SERVING_ARTIFACT_ROOT: FLYWHEEL_ARTIFACT_ROOT is set"
    ]


def test_former_names_that_disagree_are_refused_naming_both(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment.setenv("FLYWHEEL_REGISTRY_ARTIFACT_ROOT", str(tmp_path / "a"))
    environment.setenv("FLYWHEEL_TRAINER_ARTIFACT_ROOT", str(tmp_path / "b"))
    with pytest.raises(ConfigurationError) as refused:
        load_settings(FlywheelSettings)
    message = str(refused.value)
    assert (
        "FLYWHEEL_REGISTRY_ARTIFACT_ROOT" in message
        and "FLYWHEEL_TRAINER_ARTIFACT_ROOT" in message
        and "set FLYWHEEL_ARTIFACT_ROOT" in message
    )


def test_former_names_that_agree_are_one_store(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for service in LEGACY:
        environment.setenv(f"FLYWHEEL_{service}_ARTIFACT_ROOT", str(tmp_path / "shared"))
    settings = load_settings(FlywheelSettings)
    assert settings.artifact_root == str(tmp_path / "shared") and len(settings.deprecation_warnings()) == 4
