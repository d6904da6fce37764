"""Settings every process shares, read from `FLYWHEEL_*` environment variables when an app is built.

Each service adds its own `<Name>Settings` in `services/<name>/settings.py`; nothing reads the
environment at import time.
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.publisher import KafkaSecurity, SaslMechanism, SecurityProtocol
from services.runtime.errors import ConfigurationError


S = TypeVar("S", bound=BaseSettings)

# The principal of a process that runs several services on one broker connection (`flywheel up`,
# `flywheel demo`): it may do what those services may do together, and no more (infra/kafka_acls.py).
PROCESS_PRINCIPAL = "flywheel"


def load_settings(cls: type[S], **overrides: Any) -> S:
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
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore", populate_by_name=True)

    home: Path = Field(
        default=Path(".flywheel"),
        description="Data directory: registry database, artifacts, embedded ClickHouse, local infra state.",
    )
    cache: Path = Field(
        default=Path.home() / ".cache" / "flywheel",
        description="Downloads shared by every checkout: Kafka jars, virtual environments.",
    )
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP doors listen on.")
    http_port: int = Field(default=8080, ge=0, le=65535, description="Port the HTTP doors listen on.")
    http_max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest request body any door reads (413 beyond it); a dataset upload has the registry's own, larger cap.",
    )
    kafka_bootstrap: str | None = Field(
        default=None, description="Kafka bootstrap servers; unset: the broker `flywheel infra up` started."
    )
    kafka_security_protocol: SecurityProtocol | None = Field(
        default=None,
        description="PLAINTEXT, SASL_PLAINTEXT, SASL_SSL or SSL; unset: what `flywheel infra up` recorded (SASL_PLAINTEXT with --secure), else PLAINTEXT. SASL_SSL in production.",
    )
    kafka_sasl_mechanism: SaslMechanism = Field(
        default="SCRAM-SHA-512", description="SASL mechanism: SCRAM-SHA-512 (or SCRAM-SHA-256)."
    )
    kafka_sasl_username: str | None = Field(
        default=None,
        description="This process's Kafka principal; unset with `flywheel infra up --secure`: read from its credentials file.",
    )
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="The principal's SCRAM password (never logged)."
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None,
        description="CA bundle (PEM) that signed the brokers' TLS certificates; unset: the system's trust store.",
    )
    artifact_root: str | None = Field(
        default=None,
        description="Artifact store every service reads and writes (models, datasets, adapters, reports): a directory or fsspec URL (s3://bucket/prefix); unset: <FLYWHEEL_HOME>/artifacts. Serving loads adapters from this store only.",
    )
    clickhouse_url: str | None = Field(
        default=None,
        description="ClickHouse server URL (http://user:pass@host:8123/db); unset: embedded chDB under home.",
    )
    database_url: str | None = Field(default=None, description="Registry database URL; unset: SQLite under home.")
    bootstrap_admin_key: SecretStr | None = Field(
        default=None, description="Creates the first admin API key when none exists; at least 32 characters."
    )
    key_pepper: SecretStr | None = Field(
        default=None,
        description="Server-side secret API keys are hashed under (HMAC-SHA256), read by the registry only; unset: a pepper generated once into a 0600 file beside the SQLite registry database (required with a server database).",
    )
    registry_url: str | None = Field(
        default=None,
        description="Base URL of the registry's door; set: this process checks API keys by asking the registry (introspection) instead of opening its database.",
    )
    engine_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="float32",
        description="What the model engine (serving, the evaluator) computes in: auto is bfloat16 where the hardware computes it natively (AMX, AVX-512-BF16, a CUDA GPU with bf16), float32 elsewhere. float32 by default: an adapter trained in float32 can lose what it learned when served in bfloat16 (docs/explanation/serving.md).",
    )
    topic_prefix: str = Field(default="", description="Prefix for every topic name; lets test runs share a broker.")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: str = Field(default="console", description="`console` for people, `json` for log shippers.")
    shutdown_grace_s: float = Field(
        default=15.0,
        ge=0,
        description="Seconds a stopping consumer waits for in-flight handlers before cancelling them.",
    )
    consumer_max_retries: int = Field(
        default=3, ge=0, le=100, description="Attempts before a failing message goes to `<topic>.dlq`."
    )

    console_session_s: int = Field(
        default=8 * 3600,
        ge=60,
        validation_alias=AliasChoices("FLYWHEEL_CONSOLE_SESSION_S", "FLYWHEEL_MONITOR_CONSOLE_SESSION_S"),
        description="Seconds a console sign-in (its server-side session and HttpOnly cookie) lasts. FLYWHEEL_MONITOR_CONSOLE_SESSION_S, its name when only the monitor had a console, is still read.",
    )
    console_secure_cookie: bool = Field(
        default=False,
        validation_alias=AliasChoices("FLYWHEEL_CONSOLE_SECURE_COOKIE", "FLYWHEEL_MONITOR_CONSOLE_SECURE_COOKIE"),
        description="Mark the console's session cookie Secure even when the request arrives over plain HTTP, because TLS terminates in front (a proxy); over https it is Secure anyway. FLYWHEEL_MONITOR_CONSOLE_SECURE_COOKIE is still read.",
    )

    # The names artifact_root had when each service read its own (one release): still read when
    # FLYWHEEL_ARTIFACT_ROOT is unset, and named in a warning when the process starts.
    legacy_registry_artifact_root: str | None = Field(
        default=None, validation_alias=AliasChoices("FLYWHEEL_REGISTRY_ARTIFACT_ROOT"), exclude=True
    )
    legacy_trainer_artifact_root: str | None = Field(
        default=None, validation_alias=AliasChoices("FLYWHEEL_TRAINER_ARTIFACT_ROOT"), exclude=True
    )
    legacy_evaluator_artifact_root: str | None = Field(
        default=None, validation_alias=AliasChoices("FLYWHEEL_EVALUATOR_ARTIFACT_ROOT"), exclude=True
    )
    legacy_serving_artifact_root: str | None = Field(
        default=None, validation_alias=AliasChoices("FLYWHEEL_SERVING_ARTIFACT_ROOT"), exclude=True
    )
    _deprecations: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _legacy_artifact_roots(self) -> FlywheelSettings:
        legacy = self.legacy_artifact_roots()
        if legacy and "artifact_root" in self.model_fields_set:
            self._deprecations = [f"ignoring deprecated {', '.join(legacy)}: FLYWHEEL_ARTIFACT_ROOT is set"]
            return self
        if len(set(legacy.values())) > 1:
            # Services of one process share one store now; two different roots cannot both be it.
            named = ", ".join(f"{name}={value}" for name, value in legacy.items())
            raise ConfigurationError(
                f"{named} name different artifact stores; every service reads one now: set FLYWHEEL_ARTIFACT_ROOT instead"
            )
        if legacy:
            self.artifact_root = next(iter(legacy.values()))
            self._deprecations = [
                f"{name} is deprecated: set FLYWHEEL_ARTIFACT_ROOT (the artifact store every service reads)"
                for name in legacy
            ]
        return self

    def legacy_artifact_roots(self) -> dict[str, str]:
        """The deprecated per-service artifact root variables that are set, by name."""
        return {
            f"FLYWHEEL_{service.upper()}_ARTIFACT_ROOT": value
            for service in ("registry", "trainer", "evaluator", "serving")
            if (value := getattr(self, f"legacy_{service}_artifact_root")) is not None
        }

    def deprecation_warnings(self) -> list[str]:
        """One line per deprecated variable this process was configured with, saying what to set instead."""
        return list(self._deprecations)

    @property
    def infra_dir(self) -> Path:
        return self.home / "infra"

    def resolved_kafka_bootstrap(self) -> str:
        """The broker address: the setting, or the one recorded by `flywheel infra up`."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        state_file = self.infra_dir / "kafka" / "state.json"
        if state_file.exists():
            recorded: str = json.loads(state_file.read_text())["bootstrap"]
            return recorded
        raise ConfigurationError(
            "no Kafka broker configured: run `flywheel infra up` or set FLYWHEEL_KAFKA_BOOTSTRAP=host:port"
        )

    def resolved_kafka_security(self, principal: str = PROCESS_PRINCIPAL) -> KafkaSecurity:
        """How this process authenticates to Kafka: the FLYWHEEL_KAFKA_* settings, or else, against the
        broker `flywheel infra up --secure` started, `principal`'s entry in its credentials file
        (`PROCESS_PRINCIPAL` when the file has no such principal: a process running several services)."""
        local = self._local_kafka_state()
        # Unset everywhere: the credentials and CA decide (KafkaSecurity.of); neither means PLAINTEXT.
        protocol = self.kafka_security_protocol or (local or {}).get("security_protocol")
        username = self.kafka_sasl_username
        password = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
        if protocol in ("SASL_PLAINTEXT", "SASL_SSL") and username is None and local and local.get("credentials_file"):
            username, password = local_kafka_credentials(Path(local["credentials_file"]), principal)
        if protocol in ("SASL_PLAINTEXT", "SASL_SSL") and not (username and password):
            raise ConfigurationError(
                f"Kafka security {protocol} needs FLYWHEEL_KAFKA_SASL_USERNAME and FLYWHEEL_KAFKA_SASL_PASSWORD "
                "(this service's principal), or a broker started with `flywheel infra up --secure`"
            )
        if username and not password:
            raise ConfigurationError("FLYWHEEL_KAFKA_SASL_USERNAME is set without FLYWHEEL_KAFKA_SASL_PASSWORD")
        if self.kafka_ssl_cafile is not None and not self.kafka_ssl_cafile.is_file():
            raise ConfigurationError(f"FLYWHEEL_KAFKA_SSL_CAFILE={self.kafka_ssl_cafile}: no such file")
        # `flywheel infra up --secure --tls` made its own CA: its processes trust it without a setting.
        cafile = self.kafka_ssl_cafile or (Path(local["ssl_cafile"]) if local and local.get("ssl_cafile") else None)
        try:
            return KafkaSecurity.of(
                protocol=protocol,
                sasl_username=username,
                sasl_password=password,
                sasl_mechanism=self.kafka_sasl_mechanism,
                ssl_cafile=cafile,
            )
        except ValueError as error:  # e.g. a username with FLYWHEEL_KAFKA_SECURITY_PROTOCOL=SSL
            raise ConfigurationError(
                f"invalid Kafka security settings (FLYWHEEL_KAFKA_SECURITY_PROTOCOL and FLYWHEEL_KAFKA_SASL_*): {error}"
            ) from None

    def _local_kafka_state(self) -> dict[str, Any] | None:
        """What `flywheel infra up` recorded, when this process talks to that broker."""
        state_file = self.infra_dir / "kafka" / "state.json"
        if not state_file.exists():
            return None
        state: dict[str, Any] = json.loads(state_file.read_text())
        if self.kafka_bootstrap and self.kafka_bootstrap != state.get("bootstrap"):
            return None  # another broker: its security is whatever the settings say
        return state


def local_kafka_credentials(credentials_file: Path, principal: str) -> tuple[str, str]:
    """`principal`'s SCRAM name and password from the file `flywheel infra up --secure` wrote (0600)."""
    try:
        principals = json.loads(credentials_file.read_text())["principals"]
    except (OSError, ValueError, KeyError) as error:
        raise ConfigurationError(
            f"cannot read the local broker's Kafka credentials from {credentials_file}: {error}"
        ) from None
    name = principal if principal in principals else PROCESS_PRINCIPAL
    if name not in principals:
        raise ConfigurationError(f"{credentials_file} has no principal {principal!r} (nor {PROCESS_PRINCIPAL!r})")
    return name, principals[name]
