"""docker-compose.yml: valid for the compose CLI, and in step with the contract (services, topics,
settings). No Docker engine is needed: `config` only loads, interpolates and validates the file."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

import services
from services.runtime.settings import FlywheelSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
CONTRACT_SERVICES = ("registry", "trainer", "evaluator", "serving", "feedback", "monitor")
INSTALL_HINT = "run scripts/install-compose.sh (it builds the Compose v2 plugin from the Go module proxy)"


def compose_cli() -> list[str]:
    """The compose command: the plugin where scripts/install-compose.sh puts it, else one on PATH."""
    docker_config = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker"))
    plugin = docker_config / "cli-plugins" / "docker-compose"
    if plugin.is_file() and os.access(plugin, os.X_OK):
        # The plugin binary also runs on its own, so a machine without the docker client works too.
        return [str(plugin)]
    if standalone := shutil.which("docker-compose"):
        return [standalone]
    pytest.fail(f"no compose CLI at {plugin} or on PATH: {INSTALL_HINT}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def documented_settings() -> set[str]:
    """Every FLYWHEEL_* variable a process reads: the shared settings and each service's own."""
    names = {f"FLYWHEEL_{field.upper()}" for field in FlywheelSettings.model_fields}
    for package in (info.name for info in pkgutil.iter_modules(services.__path__) if info.ispkg):
        try:
            module = importlib.import_module(f"services.{package}.settings")
        except ModuleNotFoundError as error:
            if error.name != f"services.{package}.settings":
                raise
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseSettings) and cls.__module__ == module.__name__:
                prefix = cls.model_config.get("env_prefix", "")
                names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    return names


@pytest.mark.integration
def test_compose_cli_validates_the_file() -> None:
    result = subprocess.run(
        [*compose_cli(), "--file", str(COMPOSE_FILE), "--profile", "dashboards", "config", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"compose config rejected {COMPOSE_FILE.name}:\n{result.stderr}"


@pytest.mark.unit
@pytest.mark.parametrize("name", CONTRACT_SERVICES)
def test_each_service_runs_alone_with_a_healthcheck(compose: dict, name: str) -> None:
    service = compose["services"].get(name)
    assert service is not None, f"no `{name}` service in {COMPOSE_FILE.name}"
    assert service["command"] == ["flywheel", "run", name]
    health = " ".join(service["healthcheck"]["test"])
    assert "/healthz" in health or "/readyz" in health, health
    assert environment(service)["FLYWHEEL_HTTP_PORT"] in health


@pytest.mark.unit
def test_infrastructure_is_present(compose: dict) -> None:
    assert {"kafka", "clickhouse", "postgres", "topics"} <= compose["services"].keys()
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:")


@pytest.mark.unit
def test_topics_come_only_from_the_init_step(compose: dict) -> None:
    services_ = compose["services"]
    assert services_["topics"]["command"] == ["flywheel", "infra", "topics"]
    kafka_env = environment(services_["kafka"])
    assert str(kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"
    topics_env = environment(services_["topics"])
    for name in CONTRACT_SERVICES:
        service = services_[name]
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully", name
        env = environment(service)
        # The init step must create the very names the services subscribe to.
        for key in ("FLYWHEEL_KAFKA_BOOTSTRAP", "FLYWHEEL_TOPIC_PREFIX"):
            assert env[key] == topics_env[key], f"{name}: {key} differs from the topics step's"


@pytest.mark.unit
def test_settings_point_at_the_compose_services(compose: dict) -> None:
    services_ = compose["services"]
    for name in CONTRACT_SERVICES:
        env = environment(services_[name])
        assert env["FLYWHEEL_KAFKA_BOOTSTRAP"].split(":")[0] in services_, name
        assert urlsplit(env["FLYWHEEL_CLICKHOUSE_URL"]).hostname in services_, name
    assert urlsplit(environment(services_["registry"])["FLYWHEEL_DATABASE_URL"]).hostname == "postgres"


@pytest.mark.unit
def test_every_flywheel_variable_is_a_setting(compose: dict) -> None:
    used = set(re.findall(r"\$\{(FLYWHEEL_[A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    for service in compose["services"].values():
        used |= {key for key in environment(service) if key.startswith("FLYWHEEL_")}
    unknown = used - documented_settings()
    assert not unknown, f"{COMPOSE_FILE.name} sets variables no settings class reads: {sorted(unknown)}"
