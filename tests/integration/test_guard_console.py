"""The console's guards page (services/monitor/guard_pages.py) over real HTTP, on inference.logged events the
real sink stored in embedded ClickHouse: calls per outcome and per label on each side, the latest calls a
guard acted on linked to their traces, a window that leaves older calls out, a label an app logged shown as
text, a bad `since` refused with what to write, and only a viewer (or above) reads it."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.envelope import wrap
from contracts.events import GuardOutcome, InferenceLogged, InferenceStatus
from contracts.http import Role
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.monitor.api import CONSOLE
from services.monitor.store import MonitorStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.privacy import Redactor
from tests.integration.test_trace_console import trace_app
from tests.monitor_support import clickhouse, monitor_store  # noqa: F401 - fixtures
from tests.support import served as serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

GUARDS = f"{CONSOLE}/guards"
BLOCKED_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
HOSTILE_LABEL = "<script>window.__flywheel_ran=1</script>"


def _call(number: int, at: datetime, **guards: Any) -> Any:
    blocked = GuardOutcome.blocked in (guards.get("guard_input_outcome"), guards.get("guard_output_outcome"))
    return wrap(
        InferenceLogged(
            inference_id=f"call-{number}",
            model_name="smollm2",
            adapter_version=3,
            route="smollm2:v3",
            status=InferenceStatus.error if blocked else InferenceStatus.ok,
            **guards,
        ),
        producer="gateway",
    ).model_copy(update={"occurred_at": at})


def seed(clickhouse: ClickHouseStore) -> None:
    """Six guarded calls in the last hour (3 passed, an email redacted, an injection blocked, a card flagged
    in an answer and a label an app wrote), one unguarded, and a blocked call two days ago."""
    now = datetime.now(UTC)
    recent = now - timedelta(minutes=10)
    passed = {"guard_input_outcome": GuardOutcome.passed, "guard_output_outcome": GuardOutcome.passed}
    calls = [
        *(_call(n, recent, **passed) for n in range(3)),
        _call(
            3,
            recent + timedelta(seconds=1),
            guard_input_outcome=GuardOutcome.redacted,
            guard_input_found=["EMAIL"],
            guard_output_outcome=GuardOutcome.passed,
        ),
        _call(
            4,
            recent + timedelta(seconds=2),
            guard_input_outcome=GuardOutcome.blocked,
            guard_input_found=["PROMPT_INJECTION"],
            guard_policy="support-guard:v3",
            trace_id=BLOCKED_TRACE,
            span_id="a000000000000001",
        ),
        _call(
            5,
            recent + timedelta(seconds=3),
            guard_output_outcome=GuardOutcome.flagged,
            guard_output_found=["CARD", HOSTILE_LABEL],
        ),
        _call(6, recent),
        _call(
            7,
            now - timedelta(days=2),
            guard_input_outcome=GuardOutcome.blocked,
            guard_input_found=["OPENAI_KEY"],
        ),
    ]
    Sink(FeedbackStore(lambda: clickhouse), Redactor()).store_inferences(calls)


def cells(page: str, table: str) -> list[list[str]]:
    body = page[page.index(f'class="{table}"') :].split("</table>", 1)[0]
    rows = body.split("<tbody>", 1)[1].split("</tr>")[:-1]
    return [[re.sub("<[^>]*>", "", cell.split(">", 1)[1]).strip() for cell in row.split("<td")[1:]] for row in rows]


async def test_the_guards_page_counts_each_sides_outcomes_and_labels_and_lists_what_they_acted_on(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    seed(clickhouse)
    app, keys = trace_app(tmp_path, monitor_store)
    async with serving(app, lifespan="off") as base:
        async with httpx.AsyncClient(base_url=base, timeout=60) as anonymous:
            signed_out = await anonymous.get(GUARDS)
            assert signed_out.status_code == 303 and signed_out.headers["location"].startswith("/console/login")
            below = await anonymous.get(GUARDS, headers={"Authorization": f"Bearer {keys[Role.app]}"})
            assert below.status_code == 303, "an app key reads nothing here: viewer or above"
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {keys[Role.viewer]}"}, timeout=60
        ) as viewer:
            page = await viewer.get(GUARDS, params={"since": "1h"})
            week = await viewer.get(GUARDS, params={"since": "7d"})
            refused = await viewer.get(GUARDS, params={"since": "yesterday-ish"})
    assert page.status_code == 200, page.text
    assert "6 guarded calls" in page.text
    # guard, checked, passed, flagged, redacted, blocked
    assert cells(page.text, "guard-outcomes") == [
        ["input", "5", "3", "0", "1", "1"],
        ["output", "5", "4", "1", "0", "0"],
    ]
    escaped = HOSTILE_LABEL.replace("<", "&lt;").replace(">", "&gt;")
    assert cells(page.text, "guard-labels") == [
        ["input", "EMAIL", "1"],
        ["input", "PROMPT_INJECTION", "1"],
        ["output", escaped, "1"],  # "<" sorts before "C"
        ["output", "CARD", "1"],
    ]
    assert HOSTILE_LABEL not in page.text, "a label an app logged is text, never markup"
    acted = cells(page.text, "guard-acted")
    assert [row[-1] for row in acted] == ["call-5", "call-4", "call-3"], "newest first, passed calls left out"
    # status, the policy version that decided (or the serving settings), input guard, output guard
    assert acted[1][3:7] == ["error", "support-guard:v3", "blocked: PROMPT_INJECTION", ""]
    assert acted[0][4] == "settings"
    assert f'href="/monitor/console/traces/{BLOCKED_TRACE}"' in page.text
    assert week.status_code == 200 and "7 guarded calls" in week.text
    assert "call-7" in week.text and "OPENAI_KEY" in week.text
    assert refused.status_code == 422 and "30m, 24h, 7d" in refused.text
