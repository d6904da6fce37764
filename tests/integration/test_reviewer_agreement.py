"""Reviewer agreement from what is really stored, on the real broker with the real sink and embedded
ClickHouse: two reviewers, each with a key of their own, judge five answers through the feedback door;
their feedback lands under their keys' principals, the query `flywheel ops agreement` runs (through the
monitor's query guard) reads it back, and alpha and kappa come out as computed by hand in
tests/unit/test_agreement.py. End users' thumbs on the same answers do not count, and a reviewer cannot
give feedback under another reviewer's name."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from contracts.events import InferenceLogged
from contracts.http import Role
from services.monitor.agreement import judgements_query, units_of
from services.runtime.agreement import Scale, agreement
from services.monitor.settings import MonitorSettings
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.clickhouse.query_guard import QueryGuard
from services.runtime.settings import FlywheelSettings
from tests.integration.test_feedback_http import feedback_door
from tests.integration.test_sink_clickhouse import clickhouse, eventually, running_sink  # noqa: F401 - fixture
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# The hand-computed example: rita and sam differ on u2 alone.
THUMBS = {"u1": ("up", "up"), "u2": ("up", "down"), "u3": ("down", "down"), "u4": ("up", "up"), "u5": ("down", "down")}


async def test_two_reviewers_keys_give_the_hand_computed_agreement_and_cannot_speak_for_each_other(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:  # noqa: F811
    since = datetime.now(UTC) - timedelta(minutes=5)
    keys = {name: api_key(settings, Role.reviewer, principal=name) for name in ("rita", "sam")}
    app_key = api_key(settings, Role.app)
    async with running_sink(settings, clickhouse) as bus:
        for unit in THUMBS:
            await bus.publish(
                InferenceLogged(
                    inference_id=f"chatcmpl-{unit}", model_name="smollm2", input_text="Q?", output_text="A."
                )
            )
        await bus.publish(
            InferenceLogged(inference_id="chatcmpl-other", model_name="another", input_text="Q?", output_text="A.")
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=feedback_door(bus, clickhouse, settings)), base_url="http://test"
        ) as client:

            async def give(key: str, body: dict[str, object]) -> httpx.Response:
                return await client.post("/feedback/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"})

            for unit, (rita, sam) in THUMBS.items():
                for name, thumbs in (("rita", rita), ("sam", sam)):
                    answer = await give(
                        keys[name], {"inference_id": f"chatcmpl-{unit}", "thumbs": thumbs, "source": "reviewer"}
                    )
                    assert answer.status_code == 202, answer.text
                # End users disagree with both on every answer: their thumbs are not a reviewer's judgement.
                flipped = "down" if rita == "up" else "up"
                assert (await give(app_key, {"inference_id": f"chatcmpl-{unit}", "thumbs": flipped})).status_code == 202
            # Another model's answer, judged alike by both: outside --model smollm2.
            for name in ("rita", "sam"):
                assert (
                    await give(keys[name], {"inference_id": "chatcmpl-other", "thumbs": "up", "source": "reviewer"})
                ).status_code == 202

            posing = await give(
                keys["rita"], {"inference_id": "chatcmpl-u2", "thumbs": "up", "source": "reviewer", "actor": "sam"}
            )
            assert posing.status_code == 422, posing.text
            error = posing.json()["error"]
            assert error["param"] == "actor" and "'rita'" in error["message"]

        await eventually(
            lambda: clickhouse.query("SELECT count() AS n FROM feedback")[0]["n"] >= 3 * len(THUMBS) + 2,
            what="every reviewer's and end user's thumbs stored",
        )

    sql, parameters = judgements_query(int(since.timestamp() * 1000), "smollm2")
    # As `flywheel ops agreement` reads it: through the guard and caps of the monitor's query door.
    rows = (
        QueryGuard(clickhouse.database).run(clickhouse, sql, parameters, MonitorSettings().query_limits()).to_pylist()
    )
    assert sorted({row["actor"] for row in rows}) == ["rita", "sam"], "the keys' principals, never anyone else"
    assert len(rows) == 2 * len(THUMBS), "the posing reviewer's feedback was refused, not stored"

    measured = agreement("thumbs", units_of(rows, "thumbs"), Scale.nominal)
    assert measured.alpha == pytest.approx(0.64)
    assert measured.kappa == pytest.approx(8 / 13)
    assert [unit for unit, _ in measured.conflicts] == ["inference:chatcmpl-u2"]

    everything = QueryGuard(clickhouse.database).run(
        clickhouse, *judgements_query(int(since.timestamp() * 1000)), MonitorSettings().query_limits()
    )
    assert everything.num_rows == 2 * len(THUMBS) + 2, "without --model, every model's reviewer feedback"
