"""Settings are built once by the composition root and handed to the services.

Every service's `create_app(runtime, settings, ...)` declares the settings it takes; `build_process`
reads from the environment only those its caller did not hand over (`flywheel run` hands none, a
test or the demo hands `functools.partial(create_app, settings=...)`), once per class per process.
No service module reads its own settings.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from functools import partial
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.cli.run_cmd import SERVICES, factory
from services.runtime.privacy import PrivacySettings
from services.runtime.service import Runtime, Service, with_settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


class EchoSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_ECHO_", extra="ignore")

    greeting: str = Field(default="hello", description="What the echo service says.")


def echo_app(runtime: Runtime, settings: EchoSettings, privacy: PrivacySettings) -> Service:
    return Service(name=f"echo:{settings.greeting}:{id(privacy)}")


def test_settings_not_handed_over_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_ECHO_GREETING", "from-the-environment")
    bound = with_settings(echo_app, {})
    assert isinstance(bound, partial) and bound.keywords["settings"].greeting == "from-the-environment"


def test_settings_handed_over_are_used_and_the_environment_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_ECHO_GREETING", "ignored")
    handed = EchoSettings(greeting="handed")
    bound = with_settings(partial(echo_app, settings=handed), {})
    assert isinstance(bound, partial) and bound.keywords["settings"] is handed


def test_shared_settings_are_one_object_per_process() -> None:
    built: dict = {}
    first = with_settings(echo_app, built)
    second = with_settings(partial(echo_app, settings=EchoSettings()), built)
    assert isinstance(first, partial) and isinstance(second, partial)
    assert first.keywords["privacy"] is second.keywords["privacy"] is built[PrivacySettings]
    assert first.keywords["settings"] is built[EchoSettings]


def test_a_factory_taking_only_the_runtime_is_left_as_it_is() -> None:
    def plain(runtime: Runtime) -> Service:
        return Service(name="plain")

    assert with_settings(plain, {}) is plain


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_takes_its_own_settings_object(name: str) -> None:
    own = importlib.import_module(f"services.{name}.settings")
    parameters = inspect.signature(factory(name), eval_str=True).parameters
    assert list(parameters)[:2] == ["runtime", "settings"], parameters
    assert parameters["settings"].annotation.__module__ == own.__name__


@pytest.mark.parametrize("name", SERVICES)
def test_no_service_app_reads_settings_itself(name: str) -> None:
    source = ROOT / "services" / name / "app.py"
    calls = [
        node.lineno
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "load_settings"
    ]
    assert calls == [], (
        f"{source.relative_to(ROOT)} calls load_settings on lines {calls}: take the settings as a create_app parameter"
    )
