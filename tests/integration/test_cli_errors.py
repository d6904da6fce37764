"""Bad configuration gives one clear error line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

FLYWHEEL = str(REPO / ".venv" / "bin" / "flywheel")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")}
    clean.update({"FLYWHEEL_HOME": str(tmp_path / "home"), **env})
    return subprocess.run([FLYWHEEL, "doctor"], capture_output=True, text=True, env=clean, timeout=120)


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_unreachable_broker(tmp_path: Path) -> None:
    port = closed_port()
    result = run(tmp_path, FLYWHEEL_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}")
    assert_one_error_line(result, f"cannot reach Kafka at 127.0.0.1:{port}", "flywheel infra up")


def test_no_broker_configured_at_all(tmp_path: Path) -> None:
    assert_one_error_line(run(tmp_path), "no Kafka broker configured", "FLYWHEEL_KAFKA_BOOTSTRAP")


def test_clickhouse_url_with_a_wrong_scheme(tmp_path: Path, kafka_bootstrap: str) -> None:
    result = run(tmp_path, FLYWHEEL_KAFKA_BOOTSTRAP=kafka_bootstrap, FLYWHEEL_CLICKHOUSE_URL="tcp://ch:9000/flywheel")
    assert_one_error_line(result, "FLYWHEEL_CLICKHOUSE_URL must use http or https")


def test_unreachable_clickhouse_server_hides_the_password(tmp_path: Path, kafka_bootstrap: str) -> None:
    result = run(
        tmp_path,
        FLYWHEEL_KAFKA_BOOTSTRAP=kafka_bootstrap,
        FLYWHEEL_CLICKHOUSE_URL=f"http://flywheel:s3cret@127.0.0.1:{closed_port()}/flywheel",
    )
    line = assert_one_error_line(result, "cannot reach ClickHouse")
    assert "s3cret" not in line


def test_bad_database_url(tmp_path: Path, kafka_bootstrap: str) -> None:
    result = run(tmp_path, FLYWHEEL_KAFKA_BOOTSTRAP=kafka_bootstrap, FLYWHEEL_DATABASE_URL="postgres-ish://nowhere")
    assert_one_error_line(result, "FLYWHEEL_DATABASE_URL is not a usable database URL")


def test_invalid_setting_value(tmp_path: Path) -> None:
    assert_one_error_line(run(tmp_path, FLYWHEEL_HTTP_PORT="eighty"), "FLYWHEEL_HTTP_PORT='eighty'", "valid integer")


def test_every_check_passes_against_the_real_broker(tmp_path: Path, kafka_bootstrap: str) -> None:
    result = run(tmp_path, FLYWHEEL_KAFKA_BOOTSTRAP=kafka_bootstrap)
    assert result.returncode == 0, result.stderr
    assert "all checks passed" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["eval", "request"], "Missing option '--model'"), (["no-such-command"], "No such command 'no-such-command'")],
)
def test_a_usage_error_is_the_usage_hint_and_exit_2_not_an_unexpected_error(args: list[str], message: str) -> None:
    result = subprocess.run([FLYWHEEL, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    assert f"Error: {message}" in result.stderr and "--help' for help" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["local", "--method", "sft_then_dpo", "--no-score"], "--method sft_then_dpo needs --preference-data"),
        (
            ["submit", "--model", "m", "--dataset", "d:1", "--preference-dataset", "p:1"],
            "--preference-dataset is only for --method sft_then_dpo",
        ),
        (
            ["submit", "--model", "m", "--dataset", "d:1", "--method", "sft_then_dpo", "--preference-dataset", "p"],
            "--preference-dataset must be NAME:VERSION",
        ),
    ],
)
def test_train_refuses_a_preference_dataset_that_does_not_fit_its_method_before_it_trains_or_calls(
    tmp_path: Path, args: list[str], message: str
) -> None:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")}
    clean["FLYWHEEL_HOME"] = str(tmp_path / "home")
    result = subprocess.run([FLYWHEEL, "train", *args], capture_output=True, text=True, env=clean, timeout=120)
    assert_one_error_line(result, message)
