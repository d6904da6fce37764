"""`flywheel run A B` runs several services in one process and `flywheel up` runs them all; both stop
cleanly on a signal: exit status 0, no traceback, no "Task was destroyed", tritonserver gone, the
HTTP port free. Real subprocesses against the real local Kafka."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.processes import free_port, port_is_free, process_alive, process_cmdline
from contracts.http import Role
from services.runtime.service import descendant_pids
from services.runtime.settings import FlywheelSettings
from tests.conftest import REPO
from tests.integration.test_cli_errors import FLYWHEEL
from tests.support import api_key

pytestmark = pytest.mark.integration

# Long enough that only a hang reaches it: speed is not asserted here (a loaded 2-core box is slow).
HANG_S = 120


class Flywheel:
    """One `flywheel` command as a subprocess with its own home and port, its output in a file."""

    def __init__(self, tmp_path: Path, kafka_bootstrap: str, *args: str) -> None:
        self.port = free_port()
        self.home = tmp_path / "home"
        self.log = tmp_path / "flywheel.log"
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")}
        self.env.update(
            FLYWHEEL_HOME=str(self.home),
            FLYWHEEL_HTTP_PORT=str(self.port),
            FLYWHEEL_KAFKA_BOOTSTRAP=kafka_bootstrap,
            FLYWHEEL_TOPIC_PREFIX=f"{tmp_path.name}.",
        )
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [FLYWHEEL, *self.args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, (
                f"exited with {self.process.returncode} before it was ready:\n{self.output()[-4000:]}"
            )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"/readyz not 200 after {timeout_s:.0f} s:\n{self.output()[-4000:]}"
            time.sleep(1)

    def tritonservers(self) -> list[int]:
        assert self.process is not None
        return [pid for pid in descendant_pids(self.process.pid) if is_tritonserver(pid)]

    def stop_with(self, sig: signal.Signals) -> tuple[int, float]:
        """Send `sig`; the exit status and the seconds it took to exit."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(sig)
        try:
            code = self.process.wait(HANG_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {HANG_S} s after {sig.name}:\n{self.output()[-4000:]}")
        return code, time.monotonic() - started

    def kill(self) -> None:
        """What a failed test leaves running, by pid: the process and its children."""
        if self.process is None or self.process.poll() is not None:
            return
        for pid in descendant_pids(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait(30)


def is_tritonserver(pid: int) -> bool:
    return any(part.endswith("tritonserver") for part in process_cmdline(pid)[:1])


@pytest.fixture
def flywheel(tmp_path: Path, kafka_bootstrap: str) -> Iterator[type[Flywheel]]:
    started: list[Flywheel] = []

    def make(*args: str) -> Flywheel:
        process = Flywheel(tmp_path, kafka_bootstrap, *args)
        started.append(process)
        return process

    yield make  # type: ignore[misc]
    for process in started:
        process.kill()


def assert_stopped_cleanly(
    process: Flywheel, code: int, seconds: float, tritons: list[int], expected_code: int = 0
) -> None:
    output = process.output()
    print(f"\n{' '.join(process.args)}: exited {code} {seconds:.1f} s after the signal")
    assert code == expected_code, output[-4000:]
    assert "Task was destroyed" not in output, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert not [pid for pid in tritons if is_tritonserver(pid)], f"tritonserver still running: {tritons}"
    assert port_is_free(process.port), f"port {process.port} still in use"


@pytest.mark.timeout(420)
def test_run_several_services_in_one_process(flywheel) -> None:
    # The registry runs with them: the doors check API keys through it (never its database themselves).
    process = flywheel("run", "registry", "feedback", "monitor")
    process.start()
    process.wait_ready(300)
    settings = FlywheelSettings(home=process.home)
    app = {"Authorization": f"Bearer {api_key(settings, Role.app)}"}
    viewer = {"Authorization": f"Bearer {api_key(settings, Role.viewer)}"}
    inference_id = f"cli-run-{uuid.uuid4()}"

    # The feedback door publishes, the sink stores it in the embedded ClickHouse, and the monitor's
    # query door reads it from the same store: both services share this process's one chDB.
    sent = httpx.post(
        f"{process.url}/feedback/v1/feedback",
        json={"inference_id": inference_id, "thumbs": "down"},
        headers=app,
        timeout=30,
    )
    assert sent.status_code == 202, sent.text
    query = {"sql": "SELECT count() FROM feedback WHERE inference_id = {id:String}", "parameters": {"id": inference_id}}
    deadline = time.monotonic() + 120
    while (counted := httpx.post(f"{process.url}/monitor/v1/query", json=query, headers=viewer, timeout=30)).json().get(
        "rows"
    ) != [[1]]:
        assert counted.status_code == 200, counted.text
        assert time.monotonic() < deadline, (
            f"the monitor never saw the stored feedback: {counted.text}\n{process.output()[-4000:]}"
        )
        time.sleep(0.5)
    stored = httpx.get(
        f"{process.url}/feedback/v1/feedback", params={"inference_id": inference_id}, headers=viewer, timeout=30
    )
    assert stored.status_code == 200, stored.text
    assert [item["thumbs"] for item in stored.json()["items"]] == ["down"], stored.text

    # `flywheel ops sql` beside it, as a user in another terminal: the same home, no port, a viewer key.
    # It finds the live process's door under the home (the process holds the embedded ClickHouse).
    beside = {name: value for name, value in process.env.items() if name != "FLYWHEEL_HTTP_PORT"}
    counted_sql = f"SELECT count() AS n FROM feedback WHERE inference_id = '{inference_id}'"
    answered = subprocess.run(
        [FLYWHEEL, "ops", "sql", counted_sql],
        cwd=REPO,
        env={**beside, "FLYWHEEL_API_KEY": viewer["Authorization"].removeprefix("Bearer ")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert answered.returncode == 0 and answered.stdout.split() == ["n", "1"], answered.stdout + answered.stderr
    # The admin key the registry wrote for this fresh home is not presented once others may read it.
    (process.home / "admin.key").chmod(0o644)
    keyless = subprocess.run(
        [FLYWHEEL, "ops", "sql", counted_sql], cwd=REPO, env=beside, capture_output=True, text=True, timeout=120
    )
    assert keyless.returncode != 0 and "Traceback" not in keyless.stderr, keyless.stderr
    assert (
        f"a Flywheel process serves the monitor at {process.url} and holds the ClickHouse data: set FLYWHEEL_API_KEY"
        in keyless.stdout + keyless.stderr
    )

    code, seconds = process.stop_with(signal.SIGTERM)
    assert_stopped_cleanly(process, code, seconds, tritons=[])
    assert not list((process.home / "run").glob("*.json")), "the stopped process left its door recorded"


def test_run_names_the_valid_services_when_one_is_unknown() -> None:
    result = subprocess.run(
        [FLYWHEEL, "run", "feedback", "monitr"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        "unknown service 'monitr': choose from registry, trainer, evaluator, serving, feedback, monitor"
        in result.stderr
    )


@pytest.mark.model
@pytest.mark.timeout(600)
def test_up_on_a_fresh_home_starts_its_broker_serves_the_commands_beside_it_and_stops_everything_on_sigint(
    flywheel,
) -> None:
    """A new user: `flywheel up` with nothing configured, then `flywheel ops sql` and `flywheel registry`
    in another terminal with nothing set either; Ctrl-C stops the services and the broker up started."""
    process = flywheel("up")
    for name in ("FLYWHEEL_KAFKA_BOOTSTRAP", "FLYWHEEL_TOPIC_PREFIX"):
        process.env.pop(name)
    process.start()
    process.wait_ready(420)
    tritons = process.tritonservers()
    assert tritons, "flywheel up started no tritonserver"
    broker = json.loads((process.home / "infra" / "kafka" / "state.json").read_text())
    assert process_alive(broker["pid"]), broker
    assert (process.home / "admin.key").stat().st_mode & 0o777 == 0o600

    beside = {name: value for name, value in process.env.items() if name != "FLYWHEEL_HTTP_PORT"}
    counted = subprocess.run(
        [FLYWHEEL, "ops", "sql", "SELECT count() AS n FROM inference_log"],
        cwd=REPO,
        env=beside,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert counted.returncode == 0 and counted.stdout.split() == ["n", "0"], counted.stdout + counted.stderr
    models = subprocess.run(
        [FLYWHEEL, "registry", "models"], cwd=REPO, env=beside, capture_output=True, text=True, timeout=120
    )
    assert models.returncode == 0 and "Traceback" not in models.stderr, models.stdout + models.stderr

    # The console of every service, opened with the key up wrote; the monitor's page asks the registry
    # for the production lineage with that same key, having none of its own.
    admin = {"Authorization": f"Bearer {(process.home / 'admin.key').read_text().strip()}"}
    index = httpx.get(f"{process.url}/console", headers=admin, timeout=60)
    assert index.status_code == 200, index.text
    for page in ("/registry/console/models", "/evaluator/console/evaluations", "/monitor/console"):
        assert f'href="{page}"' in index.text, f"{page} missing from the console's navigation"
        assert httpx.get(f"{process.url}{page}", headers=admin, timeout=60).status_code == 200, page
    assert "missing_api_key on /registry/v1" not in process.output(), "the monitor called the registry without a key"

    code, seconds = process.stop_with(signal.SIGINT)
    assert_stopped_cleanly(process, code, seconds, tritons)
    assert not process_alive(broker["pid"]), f"the broker flywheel up started (pid {broker['pid']}) outlived it"
    assert port_is_free(int(broker["bootstrap"].rsplit(":", 1)[1]))


@pytest.mark.model
@pytest.mark.timeout(600)
def test_demo_interrupted_stops_every_service_and_writes_its_report(flywheel) -> None:
    process = flywheel("-v", "demo", "--step-timeout", "600")
    process.start()
    # The demo picks a free port itself; uvicorn's start line names it.
    deadline = time.monotonic() + 420
    while not (running := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", process.output())):
        assert process.process is not None and process.process.poll() is None, process.output()[-4000:]
        assert time.monotonic() < deadline, f"the demo's process did not start:\n{process.output()[-4000:]}"
        time.sleep(1)
    process.port = int(running.group(1))
    process.wait_ready(120)
    tritons = process.tritonservers()
    assert tritons, "the demo started no tritonserver"

    code, seconds = process.stop_with(signal.SIGINT)
    # 130: interrupted, as a shell reports a command stopped by Ctrl-C; the report is still written.
    assert_stopped_cleanly(process, code, seconds, tritons, expected_code=130)
    summary = (process.home / "reports" / "demo-summary.txt").read_text()
    assert "interrupted by SIGINT" in summary
    assert f"http port {process.port} free" in summary


@pytest.mark.model
@pytest.mark.timeout(600)
def test_a_second_sigint_exits_at_once_and_leaves_no_tritonserver(flywheel) -> None:
    process = flywheel("up")
    process.start()
    process.wait_ready(420)
    tritons = process.tritonservers()
    assert tritons, "flywheel up started no tritonserver"
    assert process.process is not None

    process.process.send_signal(signal.SIGINT)
    time.sleep(1)  # inside the graceful stop, which takes several seconds (Triton's alone)
    code, seconds = process.stop_with(signal.SIGINT)
    print(f"\nup: exited {code} {seconds:.1f} s after the second SIGINT")
    assert code == 128 + signal.SIGINT, process.output()[-4000:]
    assert "SIGINT received again: exited without stopping the services" in process.output()
    assert "Traceback" not in process.output()
    assert not [pid for pid in tritons if is_tritonserver(pid)], f"tritonserver still running: {tritons}"
    assert port_is_free(process.port), f"port {process.port} still in use"
