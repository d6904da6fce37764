"""`flywheel ops dataset-from-spans` as a user runs it: spans and feedback the sink stored in chDB (read on
the store opened read-only, as `flywheel ops traces` reads them with no monitor running), published to a
real registry (tests/integration/ops_support.py) with the caller's FLYWHEEL_API_KEY. The store is seeded
in a subprocess, because chDB lets one process own a data directory, and the command runs as one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from services.runtime.doors import bearer_header
from services.runtime.registry_client import RegistryClient, RegistryError
from services.runtime.running import forget, record
from tests.conftest import REPO
from tests.integration.ops_support import (
    ADMIN,
    ops_env,
    registry_url,  # noqa: F401 - a fixture
    run_ops,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DISLIKED = "4bf92f3577b34da6a3ce929d0e0e4736"
LIKED = "0af7651916cd43dd8448eb211c80319c"
CORRECTED = "5b8efff798038103d269b633813fc60c"
OLD = "9c2d7a1e0b3f4c5d8e6f7a8b9c0d1e2f"
CONVERSATION = '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Refund window?"}]'

# Four traces: one disliked as a whole (two LLM calls and a retrieval under a chain), one liked, one whose
# LLM answer a reviewer corrected in a disliked session, one from another service three days ago. The
# disliked trace's first LLM span is sent twice under new event ids, as an exporter's retry does.
SEED = f"""
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from contracts.envelope import wrap
from contracts.events import FeedbackReceived, FeedbackReviewed, FeedbackSource, SpanLogged
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.runtime.clickhouse import open_clickhouse
from services.runtime.privacy import Redactor

now = datetime.now(UTC)
def span(trace, span_id, parent, name, kind, start, **fields):
    return wrap(SpanLogged(trace_id=trace, span_id=span_id, parent_span_id=parent, name=name, kind=kind,
                           started_at=start, ended_at=start + timedelta(milliseconds=300), **fields), producer="seed")
app = dict(service_name="rag-app")
minutes = lambda n: now - timedelta(minutes=n)
first_call = span("{DISLIKED}", "a000000000000002", "a000000000000001", "chat smollm2", "llm", minutes(30),
                  input_text={CONVERSATION!r}, output_text="Ninety days.", inference_id="chatcmpl-a",
                  session_id="conv-1", **app)
with open_clickhouse(None, Path(sys.argv[1])) as store:
    store.migrate()
    sink = Sink(FeedbackStore(lambda: store), Redactor())
    sink.store_spans([
        span("{DISLIKED}", "a000000000000001", None, "answer", "chain", minutes(30), session_id="conv-1",
             input_text="Refund window?", output_text="Ninety days.", **app),
        first_call,
        span("{DISLIKED}", "a000000000000003", "a000000000000001", "retrieve", "retrieval", minutes(30),
             input_text="refund", output_text="policy.md", session_id="conv-1", **app),
        span("{DISLIKED}", "a000000000000004", "a000000000000001", "chat rewrite", "llm", minutes(29),
             input_text="Rewrite: Ninety days.", output_text="It is ninety days.", session_id="conv-1", **app),
        span("{LIKED}", "b000000000000002", None, "chat smollm2", "llm", minutes(20),
             input_text="Shipping time?", output_text="Two days.", inference_id="chatcmpl-b", session_id="conv-2", **app),
        span("{CORRECTED}", "c000000000000002", None, "chat smollm2", "llm", minutes(10),
             input_text="Warranty?", output_text="Forever.", session_id="conv-3", **app),
        span("{OLD}", "d000000000000002", None, "chat smollm2", "llm", now - timedelta(days=3),
             input_text="Old question?", output_text="Old answer.", service_name="batch-app"),
    ])
    sink.store_spans([wrap(first_call.payload, producer="seed")])
    sink.store_feedback([
        wrap(FeedbackReceived(feedback_id="fb-trace-down", trace_id="{DISLIKED}", thumbs="down"), producer="seed"),
        wrap(FeedbackReceived(feedback_id="fb-b-up", inference_id="chatcmpl-b", thumbs="up"), producer="seed"),
        wrap(FeedbackReceived(feedback_id="fb-conv3-down", session_id="conv-3", thumbs="down"), producer="seed"),
        wrap(FeedbackReviewed(feedback_id="fb-c-fix", trace_id="{CORRECTED}", span_id="c000000000000002",
                              correction="Two years.", source=FeedbackSource.reviewer, actor="rita"), producer="seed"),
    ])
"""


@pytest.fixture
def client_home(tmp_path: Path, registry_url: str) -> Path:
    """The caller's FLYWHEEL_HOME: the sink's chDB store, and the registry recorded as a live process there
    (as `flywheel run registry` records itself), so the command finds the registry's door while no monitor
    answers on FLYWHEEL_HTTP_PORT and the spans are read on the store."""
    home = tmp_path / "client-home"
    subprocess.run([sys.executable, "-c", SEED, str(home)], cwd=REPO, env=ops_env(home), check=True, timeout=180)
    return home


async def dataset_from_spans(home: Path, *arguments: str) -> tuple[int, str, str]:
    return await run_ops(home, "dataset-from-spans", *arguments)


async def test_thumbs_down_spans_become_a_dataset_version_with_provenance(client_home: Path, registry_url: str) -> None:
    recorded = record(client_home, ["registry"], registry_url)
    registry = RegistryClient(registry_url, ADMIN)
    try:
        chosen = ("--feedback", "thumbs-down", "--name", "chat*", "--since", "1h", "--name-dataset", "support-fixes")

        code, out, err = await dataset_from_spans(client_home, *chosen, "--dry-run")
        assert code == 0, err[-2000:]
        assert out.startswith("3 records from 3 spans; dry run: nothing published"), out
        with pytest.raises(RegistryError) as missing:
            await registry.dataset_rows("support-fixes", 1)
        assert missing.value.status == 404, "a dry run publishes nothing"

        code, out, err = await dataset_from_spans(client_home, *chosen)
        assert code == 0, err[-2000:]
        assert "published support-fixes:v1: 3 records from 3 spans" in out, out
        rows = {row["provenance"]["span_id"]: row for row in await registry.dataset_rows("support-fixes", 1)}
        # The disliked trace's two LLM calls (the one sent twice once), and the call of the disliked
        # session, whose answer a reviewer corrected; not the liked trace, nor the chain or retrieval spans.
        assert sorted(rows) == ["a000000000000002", "a000000000000004", "c000000000000002"]

        first = rows["a000000000000002"]
        assert first["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Refund window?"},
            {"role": "assistant", "content": "Ninety days."},
        ]
        assert {key: first["provenance"][key] for key in ("trace_id", "session_id", "inference_id", "assistant")} == {
            "trace_id": DISLIKED,
            "session_id": "conv-1",
            "inference_id": "chatcmpl-a",
            "assistant": "output",
        }
        assert [(f["feedback_id"], f["target"], f["thumbs"]) for f in first["provenance"]["feedback"]] == [
            ("fb-trace-down", "trace", "down")
        ]
        assert rows["a000000000000004"]["messages"] == [
            {"role": "user", "content": "Rewrite: Ninety days."},
            {"role": "assistant", "content": "It is ninety days."},
        ]
        corrected = rows["c000000000000002"]
        assert corrected["messages"][-1] == {"role": "assistant", "content": "Two years."}
        assert corrected["provenance"]["assistant"] == "correction"
        assert sorted((f["feedback_id"], f["target"]) for f in corrected["provenance"]["feedback"]) == [
            ("fb-c-fix", "span"),
            ("fb-conv3-down", "session"),
        ]

        code, out, err = await dataset_from_spans(
            client_home, "--feedback", "corrected", "--since", "1h", "--name-dataset", "support-fixes"
        )
        assert code == 0, err[-2000:]
        assert "published support-fixes:v2: 1 records from 1 spans" in out, out
        async with httpx.AsyncClient(base_url=registry_url, headers=bearer_header(ADMIN)) as door:
            versions = (await door.get("/registry/v1/datasets", params={"name": "support-fixes"})).json()["items"]
        assert {v["version"]: v["provenance"] for v in versions} == {1: "uploaded", 2: "feedback"}, (
            "feedback: every answer is a reviewer's correction"
        )
        [only] = await registry.dataset_rows("support-fixes", 2)
        assert only["provenance"]["span_id"] == "c000000000000002"

        # Older than --since, or of another service: nothing matches, and nothing is published.
        code, out, err = await dataset_from_spans(
            client_home, "--service", "batch-app", "--since", "1h", "--name-dataset", "support-fixes"
        )
        assert code != 0 and "no spans match: nothing published" in err, (out, err)
        with pytest.raises(RegistryError) as missing:
            await registry.dataset_rows("support-fixes", 3)
        assert missing.value.status == 404

        code, _, err = await dataset_from_spans(
            client_home, "--service", "batch-app", "--since", "7d", "--name-dataset", "batch", "--dry-run"
        )
        assert code == 0, err[-2000:]
        code, _, err = await dataset_from_spans(client_home, "--name", "chat*x*", "--name-dataset", "support-fixes")
        assert code == 2 and "--name" in err and "trailing *" in err, err
        code, _, err = await dataset_from_spans(client_home, "--split", "dev", "--name-dataset", "support-fixes")
        assert code == 2 and "--split" in err, err
    finally:
        forget(recorded)
