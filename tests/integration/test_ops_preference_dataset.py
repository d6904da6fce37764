"""`flywheel ops preference-dataset` as a user runs it: inferences and feedback the sink stored in chDB (read
on the store opened read-only, as with no monitor running), published to a real registry
(tests/integration/ops_support.py) as a train version of preference records, which the registry reads back."""

from __future__ import annotations

import json
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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REFUND = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Refund window?"}]

# support-bot, versions 1 and 2. "Refund window?": a reviewer corrected a1; thumbs up on a2, a3 and a5 (a5
# says what a2 said), thumbs down on a1, a4 and a7, both on a6, and an end user's correction of a4.
# "Shipping time?" (a plain completion): rated answers. "Warranty?": thumbs and ratings that disagree, and a
# reviewer's correction that repeats the answer. other-bot: one liked answer to the same refund question.
SEED = f"""
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from contracts.envelope import wrap
from contracts.events import FeedbackReceived, FeedbackReviewed, InferenceLogged
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.runtime.clickhouse import open_clickhouse
from services.runtime.privacy import Redactor

now = datetime.now(UTC)
def inference(inference_id, minutes_ago, version, prompt, answer, messages=(), model="support-bot"):
    event = wrap(InferenceLogged(inference_id=inference_id, model_name=model, adapter_version=version,
                                 input_messages=list(messages), input_text=prompt, output_text=answer), producer="seed")
    return event.model_copy(update={{"occurred_at": now - timedelta(minutes=minutes_ago)}})
def feedback(feedback_id, inference_id, **fields):
    return wrap(FeedbackReceived(feedback_id=feedback_id, inference_id=inference_id, **fields), producer="seed")
def reviewed(feedback_id, inference_id, correction):
    return wrap(FeedbackReviewed(feedback_id=feedback_id, inference_id=inference_id, correction=correction,
                                 actor="rita"), producer="seed")
refund = dict(prompt="system: Be brief. user: Refund window?", messages={REFUND!r})
with open_clickhouse(None, Path(sys.argv[1])) as store:
    store.migrate()
    sink = Sink(FeedbackStore(lambda: store), Redactor())
    sink.store_inferences([
        inference("a1", 50, 1, answer="Ninety days.", **refund),
        inference("a2", 40, 2, answer="Thirty days.", **refund),
        inference("a3", 30, 2, answer="30 days from delivery.", **refund),
        inference("a4", 20, 1, answer="I do not know.", **refund),
        inference("a6", 16, 2, answer="Thirty days or so.", **refund),
        inference("a7", 15, 1, answer="Ask support.", **refund),
        inference("a5", 10, 2, answer="Thirty days.", **refund),
        inference("b1", 50, 1, "Shipping time?", "Two days."),
        inference("b2", 40, 2, "Shipping time?", "Two to five days."),
        inference("b3", 30, 2, "Shipping time?", "Tomorrow, maybe."),
        inference("c1", 50, 1, "Warranty?", "Two years."),
        inference("c2", 40, 2, "Warranty?", "One year."),
        inference("o1", 50, 1, answer="Sixty days.", model="other-bot", **refund),
    ])
    sink.store_feedback([
        feedback("fb-a1-down", "a1", thumbs="down"),
        reviewed("fb-a1-fix", "a1", "Thirty days, with a receipt."),
        feedback("fb-a2-up", "a2", thumbs="up"),
        feedback("fb-a3-up", "a3", thumbs="up"),
        feedback("fb-a4-down", "a4", thumbs="down"),
        feedback("fb-a4-fix", "a4", correction="Contact us."),
        feedback("fb-a5-up", "a5", thumbs="up"),
        feedback("fb-a6-up", "a6", thumbs="up"),
        feedback("fb-a6-down", "a6", thumbs="down"),
        feedback("fb-a7-down", "a7", thumbs="down"),
        feedback("fb-b1-5", "b1", rating=5),
        feedback("fb-b1-4", "b1", rating=4),
        feedback("fb-b2-3", "b2", rating=3),
        feedback("fb-b3-4", "b3", rating=4),
        feedback("fb-c1-up", "c1", thumbs="up", rating=1),
        reviewed("fb-c1-fix", "c1", "Two years."),
        feedback("fb-c2-down", "c2", thumbs="down", rating=5),
        feedback("fb-o1-up", "o1", thumbs="up"),
    ])
"""


def answer(inference_id: str, version: int, *feedback_ids: str) -> dict:
    return {
        "inference_id": inference_id,
        "adapter_version": version,
        "prompt_version": None,
        "feedback_ids": list(feedback_ids),
    }


def pair(prompt: list[dict], chosen: str, rejected: str, kind: str, chosen_side: dict, rejected_side: dict) -> dict:
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "provenance": {"kind": kind, "model_name": "support-bot", "chosen": chosen_side, "rejected": rejected_side},
    }


SHIPPING = [{"role": "user", "content": "Shipping time?"}]
EXPECTED = [
    pair(
        REFUND,
        "Thirty days, with a receipt.",
        "Ninety days.",
        "correction",
        {"feedback_ids": ["fb-a1-fix"]},
        answer("a1", 1),
    ),
    # Newest liked against newest disliked, four at most; a2 repeats a5's text, a6 was liked and disliked.
    pair(REFUND, "Thirty days.", "Ask support.", "thumbs", answer("a5", 2, "fb-a5-up"), answer("a7", 1, "fb-a7-down")),
    pair(
        REFUND, "Thirty days.", "I do not know.", "thumbs", answer("a5", 2, "fb-a5-up"), answer("a4", 1, "fb-a4-down")
    ),
    pair(REFUND, "Thirty days.", "Ninety days.", "thumbs", answer("a5", 2, "fb-a5-up"), answer("a1", 1, "fb-a1-down")),
    pair(
        REFUND,
        "30 days from delivery.",
        "Ask support.",
        "thumbs",
        answer("a3", 2, "fb-a3-up"),
        answer("a7", 1, "fb-a7-down"),
    ),
    # Means 4.5 against 3 and 4 against 3; 4.5 against 4 is less than a point apart.
    pair(
        SHIPPING,
        "Two days.",
        "Two to five days.",
        "rating",
        {**answer("b1", 1, "fb-b1-4", "fb-b1-5"), "mean_rating": 4.5},
        {**answer("b2", 2, "fb-b2-3"), "mean_rating": 3.0},
    ),
    pair(
        SHIPPING,
        "Tomorrow, maybe.",
        "Two to five days.",
        "rating",
        {**answer("b3", 2, "fb-b3-4"), "mean_rating": 4.0},
        {**answer("b2", 2, "fb-b2-3"), "mean_rating": 3.0},
    ),
]


@pytest.fixture
def client_home(tmp_path: Path, registry_url: str) -> Path:
    """The caller's FLYWHEEL_HOME with the sink's chDB store; the registry is recorded there in the test."""
    home = tmp_path / "client-home"
    subprocess.run([sys.executable, "-c", SEED, str(home)], cwd=REPO, env=ops_env(home), check=True, timeout=180)
    return home


async def test_feedback_becomes_a_preference_dataset_version_with_provenance(
    client_home: Path, registry_url: str
) -> None:
    recorded = record(client_home, ["registry"], registry_url)
    registry = RegistryClient(registry_url, ADMIN)
    chosen = ("preference-dataset", "--model", "support-bot", "--name", "support-prefs")
    try:
        code, out, err = await run_ops(client_home, *chosen, "--dry-run", "--limit", "2")
        assert code == 0, err[-2000:]
        dry = out.splitlines()
        assert "2 pairs from 12 answers with feedback" in out and "dry run: nothing published" in out, out
        assert [json.loads(line) for line in dry[-2:]] == EXPECTED[:2]
        with pytest.raises(RegistryError) as missing:
            await registry.dataset_rows("support-prefs", 1)
        assert missing.value.status == 404, "a dry run publishes nothing"

        code, out, err = await run_ops(client_home, *chosen)
        assert code == 0, err[-2000:]
        assert [line.split() for line in out.splitlines() if line.startswith("│ ")] == [
            ["│", "correction", "│", "1", "│"],
            ["│", "pairwise", "│", "0", "│"],
            ["│", "thumbs", "│", "4", "│"],
            ["│", "rating", "│", "2", "│"],
        ], out
        assert (
            "published support-prefs:v1: 7 pairs from 12 answers with feedback "
            "(skipped 1 of two answers with the same text; dropped 2 contradicted by a pair the other way)"
        ) in " ".join(out.split()), out
        assert await registry.dataset_rows("support-prefs", 1) == EXPECTED
        async with httpx.AsyncClient(base_url=registry_url, headers=bearer_header(ADMIN)) as door:
            [version] = (await door.get("/registry/v1/datasets", params={"name": "support-prefs"})).json()["items"]
            assert {k: version[k] for k in ("split", "record_format", "row_count", "provenance", "model_name")} == {
                "split": "train",
                "record_format": "preference",
                "row_count": 7,
                "provenance": "preferences",
                "model_name": "support-bot",
            }
            records = "".join(json.dumps(row) + "\n" for row in EXPECTED)
            golden = await door.post(
                "/registry/v1/datasets", json={"name": "support-golden", "split": "golden", "jsonl": records}
            )
            assert golden.status_code == 422 and golden.json()["error"]["message"].startswith(
                "preference records are for training: publish them with split train"
            ), golden.text
            malformed = records + json.dumps({"prompt": SHIPPING, "chosen": "Two days."}) + "\n"
            refused = await door.post(
                "/registry/v1/datasets", json={"name": "support-prefs", "split": "train", "jsonl": malformed}
            )
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["message"] == (
                "1 invalid line(s): line 8: a preference record needs prompt, chosen, rejected; missing rejected"
            )

        # other-bot's one liked answer has nothing to be preferred to: refused, nothing published.
        code, out, err = await run_ops(
            client_home, "preference-dataset", "--model", "other-bot", "--name", "other-prefs"
        )
        assert (
            code != 0 and "the feedback on 1 answers of other-bot gives no pair" in err and "nothing published" in err
        ), (out, err)
    finally:
        forget(recorded)
