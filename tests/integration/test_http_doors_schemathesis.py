"""Property-based tests of every HTTP door (schemathesis over each process's /openapi.json) and the
role x endpoint authorisation matrix.

Each service runs as `flywheel run NAME` against the real broker, with API keys of every role created
through the registry's door. For every operation schemathesis generates requests from the published
schema; each generated request is sent with no key, with a key of a role below the one the operation
needs, with exactly the needed role, and as admin. Checks, for every single call:
- no 5xx, whatever the request;
- no key -> 401 and a role too low -> 403 on every protected operation;
- the needed role and admin are admitted (neither 401 nor 403).

What each operation needs is written down here (NEEDS), from the roles in services/runtime/auth.py,
not read from the code under test: a door that forgets its guard fails the matrix.
The serving gateway runs the real SmolLM2 on Triton (CPU) with `max_tokens` capped at 4, so that a
generated request costs little, and rate limits high enough not to answer 429 to the fuzzer.

Examples per operation: 4 (CI); FLYWHEEL_FAULTS_SIZE=full: 40.
"""

from __future__ import annotations

import asyncio
import re
import uuid
import warnings
from collections import defaultdict
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NonInteractiveExampleWarning

from contracts.http import Role
from services.runtime.broker import ensure_topics
from services.runtime.settings import FlywheelSettings
from tests.faults.support import ServiceProcess, size, stop_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

ADMIN_KEY = "schemathesis-admin-key-0123456789abcdef"
EXAMPLES = size(4, 40)
PUBLIC = "public"
KEYED = "any key"  # any valid key, whatever its role: a key asking who it is
SERVED_MODEL = "smollm2-135m-instruct"  # FLYWHEEL_SERVING_BASE_MODEL's default

# (service, method, path regex) -> the least role the operation needs; first match wins.
NEEDS: list[tuple[str, str, str, str]] = [
    ("*", "GET", r"/(healthz|readyz|metrics|openapi\.json)", PUBLIC),
    # The console signs in with a cookie, not a bearer key (its own tests); its forms refuse a missing CSRF token with 403.
    ("monitor", "*", r"/monitor/console(/.*)?", PUBLIC),
    ("registry", "GET", r"/registry/v1/keys/self", KEYED),
    ("registry", "*", r"/registry/v1/keys(/.*)?", Role.admin.value),
    ("registry", "POST", r"/registry/v1/(adapters|prompts)/.+/approvals", Role.approver.value),
    ("registry", "POST", r"/registry/v1/prompts/[^/]+/render", Role.viewer.value),
    ("monitor", "POST", r"/monitor/v1/query", Role.viewer.value),
    ("feedback", "POST", r"/feedback/v1/feedback", Role.app.value),
    ("feedback", "POST", r"/feedback/v1/review/(queues/[^/]+/claim|items/[^/]+/(submit|skip))", Role.reviewer.value),
    ("feedback", "POST", r"/v1/traces", Role.app.value),
    ("serving", "*", r"/v1/.*", Role.app.value),
    ("*", "GET", r".*", Role.viewer.value),
    ("*", "*", r".*", Role.operator.value),
]
# A role just below each need: it holds no grant of the needed role.
BELOW = {
    Role.viewer.value: Role.app.value,
    Role.app.value: Role.operator.value,
    Role.operator.value: Role.app.value,
    Role.approver.value: Role.operator.value,
    Role.reviewer.value: Role.operator.value,
    Role.admin.value: Role.operator.value,
    KEYED: None,
}


def needs(service: str, method: str, path: str) -> str:
    for who, verb, pattern, role in NEEDS:
        if who in ("*", service) and verb in ("*", method) and re.fullmatch(pattern, path):
            return role
    raise AssertionError(f"no rule for {method} {path}")


@pytest.fixture(scope="module")
def keys_and_doors(
    tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str
) -> Iterator[tuple[dict[str, str], dict[str, ServiceProcess]]]:
    workdir = tmp_path_factory.mktemp("doors")
    prefix = f"t{uuid.uuid4().hex[:10]}."
    asyncio.run(ensure_topics(kafka_bootstrap, prefix))
    env = {
        "FLYWHEEL_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
        "FLYWHEEL_DATABASE_URL": f"sqlite:///{workdir / 'registry.db'}",
        "FLYWHEEL_MONITOR_API_KEY": ADMIN_KEY,
    }
    processes = {
        name: ServiceProcess(workdir, kafka_bootstrap, prefix, [name], **env)
        for name in ("registry", "feedback", "monitor", "evaluator", "trainer")
    }
    try:
        registry = processes["registry"]
        registry.start()
        asyncio.run(registry.wait_ready())
        keys = {Role.admin.value: ADMIN_KEY}
        for role in (Role.operator, Role.approver, Role.reviewer, Role.app, Role.viewer):
            created = httpx.post(
                f"{registry.url}/registry/v1/keys",
                json={"principal": f"door-test-{role.value}", "role": role.value},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=30,
            )
            assert created.status_code == 201, created.text
            keys[role.value] = created.json()["key"]
        processes["monitor"].env["FLYWHEEL_MONITOR_REGISTRY_URL"] = registry.url
        for name, process in processes.items():
            if name != "registry":
                process.env["FLYWHEEL_REGISTRY_URL"] = registry.url  # keys are checked through the registry's door
                process.start()
        for process in processes.values():
            asyncio.run(process.wait_ready())
        yield keys, processes
    finally:
        stop_all(processes.values())


@pytest.fixture(scope="module")
def serving_door(
    keys_and_doors: tuple[dict[str, str], dict[str, ServiceProcess]], kafka_bootstrap: str
) -> Iterator[ServiceProcess]:
    from services.runtime.base_model import smollm2_weights

    # The GGUF exported once to safetensors (shared with the other tests): loads in a second.
    model_dir = smollm2_weights(FlywheelSettings().cache)
    registry = keys_and_doors[1]["registry"]
    limits = {
        "FLYWHEEL_SERVING_MAX_TOKENS_LIMIT": "4",
        "FLYWHEEL_SERVING_DEFAULT_MAX_TOKENS": "4",
        "FLYWHEEL_SERVING_RATE_LIMIT_RPS": "1000",
        "FLYWHEEL_SERVING_RATE_LIMIT_BURST": "1000",
    }
    serving = ServiceProcess(
        registry.log.parent,
        kafka_bootstrap,
        registry.env["FLYWHEEL_TOPIC_PREFIX"],
        ["serving"],
        FLYWHEEL_SERVING_MODEL_DIR=str(model_dir),
        **{**_shared_env(registry), **limits},
    )
    try:
        serving.start()
        asyncio.run(serving.wait_ready(600))
        yield serving
    finally:
        serving.stop()


def _shared_env(process: ServiceProcess) -> dict[str, str]:
    return {
        **{name: process.env[name] for name in ("FLYWHEEL_BOOTSTRAP_ADMIN_KEY", "FLYWHEEL_DATABASE_URL")},
        "FLYWHEEL_REGISTRY_URL": process.url,
    }


MATRIX_SERVICES = ["registry", "trainer", "evaluator", "feedback", "monitor", "serving"]


@pytest.mark.parametrize("service", MATRIX_SERVICES)
def test_no_generated_request_gets_a_5xx_and_every_matrix_cell_holds(
    service: str, keys_and_doors: tuple[dict[str, str], dict[str, ServiceProcess]], request: pytest.FixtureRequest
) -> None:
    keys, processes = keys_and_doors
    process = request.getfixturevalue("serving_door") if service == "serving" else processes[service]
    schema = schemathesis.openapi.from_url(f"{process.url}/openapi.json")
    cells: dict[tuple[str, str], dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    server_errors: list[str] = []
    refusals: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, f"{service} publishes no operation"

    for operation in operations:
        method, path = operation.method.upper(), operation.path
        need = needs(service, method, path)
        callers = {"no key": None, "admin": ADMIN_KEY}
        if need != PUBLIC:
            callers["right role"] = keys[Role.app.value if need == KEYED else need]
            if BELOW[need] is not None:
                callers["wrong role"] = keys[BELOW[need]]  # type: ignore[index]

        # No shrinking: failures are collected with their curl command, not raised.
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        @given(case=operation.as_strategy(), served=st.booleans())
        def exercise(case: schemathesis.Case, served: bool) -> None:
            if service == "serving" and served and isinstance(case.body, dict) and "model" in case.body:
                # A generated model name is never served (404); half the requests name the one that is,
                # so the fuzzer reaches generation on Triton and not only the routing errors.
                case.body["model"] = SERVED_MODEL
            claims_review = (
                service == "feedback" and isinstance(case.body, dict) and case.body.get("source") == "reviewer"
            )
            for caller, key in callers.items():
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                try:
                    response = case.call(base_url=process.url, headers=headers, timeout=60, allow_redirects=False)
                except requests.RequestException as error:
                    # Recorded, not raised: hypothesis would spend minutes shrinking a timeout on a loaded machine.
                    server_errors.append(
                        f"no answer: {method} {path} as {caller}: {type(error).__name__}: {error}\n  {case.as_curl_command(headers=headers)}"
                    )
                    continue
                status = response.status_code
                cells[(method, path)][caller].add(status)
                where = f"{method} {path} as {caller}: {status} {response.text[:200]!r}\n  {case.as_curl_command(headers=headers)}"
                if status >= 500:
                    server_errors.append(f"5xx: {where}")
                elif need != PUBLIC and caller == "no key" and status != 401:
                    refusals.append(f"expected 401: {where}")
                elif caller == "wrong role" and status != 403:
                    refusals.append(f"expected 403: {where}")
                elif (
                    need != PUBLIC
                    and caller in ("right role", "admin")
                    and status in (401, 403)
                    and not (
                        caller == "right role"
                        and claims_review
                        and response.json()["error"]["code"] == "reviewer_role_required"
                    )
                ):
                    # An app key may send feedback but not claim `source: reviewer`: that needs a reviewer's key.
                    refusals.append(f"expected admitted: {where}")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonInteractiveExampleWarning)
            exercise()

    print(f"\n== {service}: status codes per cell over {EXAMPLES} generated requests per operation")
    print(f"  {'operation':<62} {'needs':<9} {'no key':<12} {'wrong role':<12} {'right role':<14} {'admin':<14}")
    for (method, path), by_caller in sorted(cells.items(), key=lambda item: item[0][1]):
        need = needs(service, method, path)
        row = [
            ",".join(map(str, sorted(by_caller[c]))) if c in by_caller else "-"
            for c in ("no key", "wrong role", "right role", "admin")
        ]
        print(f"  {method + ' ' + path:<62} {need:<9} {row[0]:<12} {row[1]:<12} {row[2]:<14} {row[3]:<14}")
    assert not server_errors, f"{len(server_errors)} calls answered 5xx, first ones:\n" + "\n".join(server_errors[:15])
    assert process.running() and all(p.running() for p in processes.values()), "a service died under generated requests"
    assert not refusals, f"{len(refusals)} calls broke the matrix, first ones:\n" + "\n".join(refusals[:15])


def test_every_published_operation_has_a_rule(keys_and_doors: tuple[dict[str, str], dict[str, ServiceProcess]]) -> None:
    _, processes = keys_and_doors
    for service in MATRIX_SERVICES[:-1]:  # serving's operations are covered when its door runs
        paths = httpx.get(f"{processes[service].url}/openapi.json", timeout=30).json()["paths"]
        for path, methods in paths.items():
            for method in methods:
                assert needs(service, method.upper(), path) in {PUBLIC, *BELOW}, (service, method, path)
