"""The reference pages in docs/reference/ are what the code generates now (settings, events, HTTP doors,
CLI, ClickHouse tables), and the check that says so fails when a page and the code part ways.

Run as the `flywheel` command in a subprocess: the generator opens an embedded chDB of its own, and chDB
allows one data directory per process (the test session's is another)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "reference"
FLYWHEEL = [sys.executable, "-m", "services.cli.main"]


def flywheel_docs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLYWHEEL, "docs", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pages as the code generates them now, written by `flywheel docs generate` (one generation per session)."""
    directory = tmp_path_factory.mktemp("reference")
    done = flywheel_docs("generate", "--directory", str(directory))
    assert done.returncode == 0, f"{done.stdout}{done.stderr}"
    return directory


def test_the_committed_reference_pages_are_what_the_code_generates(generated: Path) -> None:
    # What `flywheel docs check` compares, without a second generation.
    assert sorted(path.name for path in generated.iterdir()) == sorted(path.name for path in REFERENCE.iterdir())
    stale = [
        path.name for path in sorted(generated.iterdir()) if path.read_text() != (REFERENCE / path.name).read_text()
    ]
    assert stale == [], f"stale reference pages {stale}: run `flywheel docs generate` and commit the result"


def test_the_pages_carry_what_a_reader_looks_up(generated: Path) -> None:
    assert "`FLYWHEEL_HTTP_PORT`" in (generated / "settings.md").read_text()
    assert "`FLYWHEEL_MONITOR_REGISTRY_URL`" in (generated / "settings.md").read_text()
    assert "| POST | `/v1/chat/completions` |" in (generated / "http.md").read_text()
    assert "| `feedback.reviewed` | `feedback.reviewed` | feedback |" in (generated / "events.md").read_text()
    assert "### `inference_log` (ReplacingMergeTree)" in (generated / "clickhouse.md").read_text()
    assert "### `flywheel ops sql`" in (generated / "cli.md").read_text()
    # Id types by the names contracts/ids.py gives them, SessionId too though it constrains as InferenceId does.
    events = (generated / "events.md").read_text()
    assert "| `session_id` | SessionId \\| None |" in events and "| `trace_id` | TraceId \\| None |" in events


def test_a_page_that_no_longer_matches_the_code_fails_the_check_and_is_named(generated: Path, tmp_path: Path) -> None:
    pages = tmp_path / "reference"
    shutil.copytree(generated, pages)
    # As if a setting had been added to the code without regenerating: the page lacks its row.
    settings = pages / "settings.md"
    settings.write_text(
        "\n".join(line for line in settings.read_text().splitlines() if "`FLYWHEEL_HTTP_PORT`" not in line) + "\n"
    )
    (pages / "openapi.json").unlink()
    checked = flywheel_docs("check", "--directory", str(pages))
    assert checked.returncode == 1, checked.stdout
    assert "stale reference pages: settings.md, openapi.json" in checked.stderr
    assert "Traceback" not in checked.stderr
