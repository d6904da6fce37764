"""Settings every process shares, read from `FLYWHEEL_*` environment variables when an app is built.

Each service adds its own `<Name>Settings` in `services/<name>/settings.py`; nothing reads the
environment at import time.
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.runtime.errors import ConfigurationError


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build settings from the environment; a bad value is a one-line ConfigurationError naming the variable."""
    try:
        return cls(**overrides)
    except ValidationError as error:
        prefix = cls.model_config.get("env_prefix", "")
        problems = [
            f"{prefix}{'_'.join(str(part) for part in problem['loc']).upper()}={problem.get('input')!r}: {problem['msg']}"
            for problem in error.errors()
        ]
        raise ConfigurationError("invalid setting " + "; ".join(problems)) from None


class FlywheelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    home: Path = Field(default=Path(".flywheel"), description="Data directory: registry database, artifacts, embedded ClickHouse, local infra state.")
    cache: Path = Field(default=Path.home() / ".cache" / "flywheel", description="Downloads shared by every checkout: Kafka jars, virtual environments.")
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP doors listen on.")
    http_port: int = Field(default=8080, ge=0, le=65535, description="Port the HTTP doors listen on.")
    http_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest request body any door reads (413 beyond it); a dataset upload has the registry's own, larger cap.")
    kafka_bootstrap: str | None = Field(default=None, description="Kafka bootstrap servers; unset: the broker `flywheel infra up` started.")
    clickhouse_url: str | None = Field(default=None, description="ClickHouse server URL (http://user:pass@host:8123/db); unset: embedded chDB under home.")
    database_url: str | None = Field(default=None, description="Registry database URL; unset: SQLite under home.")
    bootstrap_admin_key: str | None = Field(default=None, description="Creates the first admin API key when none exists.")
    topic_prefix: str = Field(default="", description="Prefix for every topic name; lets test runs share a broker.")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: str = Field(default="console", description="`console` for people, `json` for log shippers.")
    shutdown_grace_s: float = Field(default=15.0, ge=0, description="Seconds a stopping consumer waits for in-flight handlers before cancelling them.")
    consumer_max_retries: int = Field(default=3, ge=0, le=100, description="Attempts before a failing message goes to `<topic>.dlq`.")

    @property
    def infra_dir(self) -> Path:
        return self.home / "infra"

    def resolved_kafka_bootstrap(self) -> str:
        """The broker address: the setting, or the one recorded by `flywheel infra up`."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        state_file = self.infra_dir / "kafka" / "state.json"
        if state_file.exists():
            return json.loads(state_file.read_text())["bootstrap"]
        raise ConfigurationError(
            "no Kafka broker configured: run `flywheel infra up` or set FLYWHEEL_KAFKA_BOOTSTRAP=host:port"
        )
