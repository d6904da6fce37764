"""The production shape, run here: each service as its own process with exactly the environment
docker-compose.yml gives it, and every door's role matrix checked there.

The environment blocks are read from docker-compose.yml itself (anchors and merge keys included) and
interpolated as Compose does; then only what cannot exist on this machine is mapped:

- the `kafka` host -> a local broker started secure (SASL/SCRAM-SHA-512, the StandardAuthorizer and the
  ACLs of infra/kafka_acls.py), its principals given the passwords docker-compose gives them;
- the `postgres` host -> a fresh database on the PostgreSQL of tests/fixtures/postgres.py;
- the `clickhouse` server -> embedded chDB in the processes that use ClickHouse (evaluator, feedback,
  monitor; the monitor's query-door user goes with the server); chDB lets one process own a data
  directory, so each process gets a home of its own where the containers share the `flywheel-home`
  volume (no door of the role matrix reads another service's files);
- `registry:8080` and each container's port 8080 -> 127.0.0.1 and a free port per process.

Serving is left out: it needs Triton and the imported base model, minutes on this machine before its
door answers; its door admits `app` only and is covered in-process by the serving tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest
import yaml

from infra.kafka_acls import PRINCIPAL_NAMES
from infra.local_kafka import SCRAM_MECHANISM, LocalKafka
from infra.processes import free_port
from services.runtime.settings import FlywheelSettings
from tests.faults.support import FLYWHEEL, ServiceProcess, stop_all
from tests.fixtures import running
from tests.fixtures.postgres import fresh_database

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
SHAPE = ("registry", "trainer", "evaluator", "feedback", "monitor")
ADMIN = "fw_boot_compose-shape-admin-0123456789abcdef"
ROLES = ("admin", "operator", "approver", "reviewer", "app", "viewer")

# Who each door admits, written out (not derived from the code under test): `viewer` doors admit every
# role but app; operator doors admin and operator; approvals admin and approver; key management admin.
READERS = frozenset({"admin", "operator", "approver", "reviewer", "viewer"})
OPERATORS = frozenset({"admin", "operator"})
MATRIX: dict[str, list[tuple[str, str, frozenset[str]]]] = {
    "registry": [
        ("GET", "/registry/v1/models", READERS),
        ("GET", "/registry/v1/audit", READERS),
        ("POST", "/registry/v1/prompts", OPERATORS),
        ("GET", "/registry/v1/rubrics", READERS),
        ("POST", "/registry/v1/rubrics", OPERATORS),
        ("POST", "/registry/v1/adapters/smol/versions/1/transitions", OPERATORS),
        ("POST", "/registry/v1/adapters/smol/versions/1/approvals", frozenset({"admin", "approver"})),
        ("GET", "/registry/v1/keys", frozenset({"admin"})),
        ("POST", "/registry/v1/keys", frozenset({"admin"})),
        ("GET", "/registry/v1/keys/self", frozenset(ROLES)),
    ],
    "trainer": [
        ("GET", "/trainer/v1/training-jobs", READERS),
        ("POST", "/trainer/v1/training-jobs", OPERATORS),
    ],
    "evaluator": [
        ("GET", "/evaluator/v1/evaluations", READERS),
        ("POST", "/evaluator/v1/evaluations", OPERATORS),
    ],
    "feedback": [
        ("GET", "/feedback/v1/feedback?inference_id=compose-shape", READERS),
        # Apps send their end users' feedback, reviewers their corrections; nobody else.
        ("POST", "/feedback/v1/feedback", frozenset({"admin", "app", "reviewer"})),
    ],
    "monitor": [
        ("GET", "/monitor/v1/alerts", READERS),
        ("GET", "/monitor/v1/metrics/summary", READERS),
        ("POST", "/monitor/v1/query", READERS),
        ("POST", "/monitor/v1/alerts/compose-shape/ack", OPERATORS),
    ],
}

# Compose's interpolation, for the forms docker-compose.yml uses: $$, ${VAR}, ${VAR:-default},
# ${VAR-default}, ${VAR:?error} and ${VAR?error}. Written here because no Compose implementation
# installs offline as a library; the `yaml` parser does the rest (anchors, merge keys).
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>[^}]*))?\}")


def interpolate(value: str, host: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        present = name in host and (host[name] != "" or op in ("-", "?"))
        if present:
            return host[name]
        if op in (":?", "?"):
            raise AssertionError(f"docker-compose.yml requires {name}: {arg}")
        return arg if op in (":-", "-") else ""

    return _VARIABLE.sub(one, value)


def compose_environment(service: str, host: Mapping[str, str]) -> dict[str, str]:
    """The environment docker-compose.yml gives `service`'s container; a key without a value is passed
    through from the host only when set there, as Compose does."""
    document = yaml.safe_load(COMPOSE.read_text())
    environment = document["services"][service]["environment"]
    resolved: dict[str, str] = {}
    for name, value in environment.items():
        if value is None:
            if name in host:
                resolved[name] = host[name]
            continue
        resolved[name] = interpolate(str(value), host)
    return resolved


def compose_command(service: str) -> list[str]:
    command = yaml.safe_load(COMPOSE.read_text())["services"][service]["command"]
    assert command[0] == "flywheel", command
    return [*FLYWHEEL, *command[1:]]


def kafka_passwords(host: Mapping[str, str]) -> dict[str, str]:
    """Each Kafka principal's password as docker-compose.yml gives it to the broker (KAFKA_<NAME>_PASSWORD)."""
    broker = yaml.safe_load(COMPOSE.read_text())["services"]["kafka"]["environment"]
    return {name: interpolate(str(broker[f"KAFKA_{name.upper()}_PASSWORD"]), host) for name in PRINCIPAL_NAMES}


@pytest.fixture(scope="module")
def shape_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(bootstrap, topic prefix) of a secure broker whose principals have docker-compose's passwords."""
    prefix = f"compose{os.getpid()}."
    kafka = LocalKafka(
        tmp_path_factory.mktemp("compose-kafka-home"),
        FlywheelSettings().cache,
        port=free_port(),
        secure=True,
        topic_prefix=prefix,
    )
    kafka.dir.mkdir(parents=True, exist_ok=True)
    kafka.credentials_file.write_text(json.dumps({"mechanism": SCRAM_MECHANISM, "principals": kafka_passwords({})}))
    kafka.credentials_file.chmod(0o600)
    with running(kafka, timeout=180, failure="the secure local broker did not start") as bootstrap:
        yield bootstrap, prefix


def mapped(
    service: str,
    environment: dict[str, str],
    *,
    bootstrap: str,
    database_url: str,
    registry_url: str,
    home: Path,
    port: int,
) -> dict[str, str]:
    """docker-compose's environment with its hosts mapped to this machine (see the module docstring)."""
    env = dict(environment)
    assert env.pop("FLYWHEEL_KAFKA_BOOTSTRAP") == "kafka:9092"
    env["FLYWHEEL_KAFKA_BOOTSTRAP"] = bootstrap
    if "FLYWHEEL_DATABASE_URL" in env:
        assert "@postgres:5432/" in env["FLYWHEEL_DATABASE_URL"]
        env["FLYWHEEL_DATABASE_URL"] = database_url
    for name in ("FLYWHEEL_REGISTRY_URL", "FLYWHEEL_MONITOR_REGISTRY_URL"):
        if name in env:
            assert env[name] == "http://registry:8080"
            env[name] = registry_url
    # Every ClickHouse server URL (the process's and, for the monitor, its query door's own user).
    for name in [name for name, value in env.items() if "@clickhouse:8123" in value]:
        del env[name]
    assert env.pop("FLYWHEEL_HOME") == "/var/lib/flywheel"
    assert (env.pop("FLYWHEEL_HTTP_HOST"), env.pop("FLYWHEEL_HTTP_PORT")) == ("0.0.0.0", "8080")
    env |= {"FLYWHEEL_HOME": str(home), "FLYWHEEL_HTTP_HOST": "127.0.0.1", "FLYWHEEL_HTTP_PORT": str(port)}
    # The host's own FLYWHEEL_* settings stay out: the container sees only what the file gives it.
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")}
    return {**inherited, "PYTHONWARNINGS": "ignore", **env}


def process(service: str, tmp_path: Path, env: dict[str, str]) -> ServiceProcess:
    proc = ServiceProcess(tmp_path, env["FLYWHEEL_KAFKA_BOOTSTRAP"], "", [service], home=Path(env["FLYWHEEL_HOME"]))
    proc.port = int(env["FLYWHEEL_HTTP_PORT"])
    proc.env = env
    proc.command = lambda: compose_command(service)  # type: ignore[method-assign]
    return proc


async def check_matrix(http: httpx.AsyncClient, service: str, base_url: str, keys: dict[str, str]) -> list[str]:
    """Every route of `service`'s door, asked by each role, without a key and with a wrong one; the
    problems found (empty when the matrix holds). Admitted callers send a body that cannot validate, so
    nothing is changed: 422 or 404 means the door let them through."""
    problems = []
    for method, path, admitted in MATRIX[service]:
        body = {"json": []} if method == "POST" else {}
        for role in (*ROLES, None, "wrong"):
            headers = (
                {"Authorization": f"Bearer {keys[role]}"}
                if role in keys
                else ({"Authorization": "Bearer fw_000000000000_wrong"} if role == "wrong" else {})
            )
            status = (await http.request(method, f"{base_url}{path}", headers=headers, **body)).status_code
            expected = "admitted" if role in admitted else (403 if role in ROLES else 401)
            wrong = status in (401, 403, 500, 503) if expected == "admitted" else status != expected
            if wrong:
                problems.append(f"{service} {method} {path} as {role or 'no key'}: {status}, expected {expected}")
    return problems


async def test_each_service_in_its_compose_environment_enforces_its_role_matrix(
    shape_broker: tuple[str, str], postgres_url: str, tmp_path: Path
) -> None:
    bootstrap, prefix = shape_broker
    host = {"FLYWHEEL_BOOTSTRAP_ADMIN_KEY": ADMIN, "FLYWHEEL_TOPIC_PREFIX": prefix}
    ports = {service: free_port() for service in SHAPE}
    registry_url = f"http://127.0.0.1:{ports['registry']}"

    # What each service is given, before anything is mapped: only the registry holds database and key secrets.
    for service in SHAPE:
        given = compose_environment(service, host)
        secrets_given = {"FLYWHEEL_DATABASE_URL", "FLYWHEEL_KEY_PEPPER", "FLYWHEEL_BOOTSTRAP_ADMIN_KEY"} & set(given)
        if service == "registry":
            assert secrets_given == {"FLYWHEEL_DATABASE_URL", "FLYWHEEL_KEY_PEPPER", "FLYWHEEL_BOOTSTRAP_ADMIN_KEY"}
            assert "FLYWHEEL_REGISTRY_URL" not in given
        else:
            assert not secrets_given, f"{service} is given {sorted(secrets_given)}"
            assert given["FLYWHEEL_REGISTRY_URL"] == "http://registry:8080"

    processes: list[ServiceProcess] = []
    with fresh_database(postgres_url) as database_url:
        try:

            def start(service: str, host_env: dict[str, str]) -> ServiceProcess:
                home = tmp_path / f"home-{service}"
                env = mapped(
                    service,
                    compose_environment(service, host_env),
                    bootstrap=bootstrap,
                    database_url=database_url,
                    registry_url=registry_url,
                    home=home,
                    port=ports[service],
                )
                proc = process(service, tmp_path, env)
                proc.start()
                processes.append(proc)
                return proc

            registry = start("registry", host)
            await registry.wait_ready(240)
            async with httpx.AsyncClient(timeout=30) as http:
                keys: dict[str | None, str] = {"admin": ADMIN}
                for role in ROLES[1:]:
                    created = await http.post(
                        f"{registry_url}/registry/v1/keys",
                        json={"principal": f"compose-{role}", "role": role},
                        headers={"Authorization": f"Bearer {ADMIN}"},
                    )
                    assert created.status_code == 201, created.text
                    keys[role] = created.json()["key"]
                # As an operator would: an operator key for the monitor, passed from the host.
                monitor_key = (
                    await http.post(
                        f"{registry_url}/registry/v1/keys",
                        json={"principal": "monitor", "role": "operator"},
                        headers={"Authorization": f"Bearer {ADMIN}"},
                    )
                ).json()["key"]
                others = {
                    service: start(service, host | {"FLYWHEEL_MONITOR_API_KEY": monitor_key}) for service in SHAPE[1:]
                }
                await asyncio.gather(*(proc.wait_ready(400) for proc in others.values()))

                problems = []
                for service in SHAPE:
                    problems += await check_matrix(http, service, f"http://127.0.0.1:{ports[service]}", keys)  # type: ignore[arg-type]
                assert not problems, "\n".join(problems)

                # A revoked key stops working at another service's door within seconds (it asks the registry).
                viewer_id = (
                    await http.get(
                        f"{registry_url}/registry/v1/keys/self", headers={"Authorization": f"Bearer {keys['viewer']}"}
                    )
                ).json()["key_id"]
                assert (
                    await http.delete(
                        f"{registry_url}/registry/v1/keys/{viewer_id}", headers={"Authorization": f"Bearer {ADMIN}"}
                    )
                ).status_code == 204
                revoked = time.monotonic()
                alerts = f"http://127.0.0.1:{ports['monitor']}/monitor/v1/alerts"
                while (
                    await http.get(alerts, headers={"Authorization": f"Bearer {keys['viewer']}"})
                ).status_code == 200:
                    assert time.monotonic() - revoked < 10, "the revoked key still opens the monitor's door after 10 s"
                    await asyncio.sleep(0.25)
            # Nobody fell back to a registry database of its own (the registry's is PostgreSQL).
            assert not [path for service in SHAPE for path in (tmp_path / f"home-{service}").rglob("registry.db")]
        finally:
            stop_all(processes)
