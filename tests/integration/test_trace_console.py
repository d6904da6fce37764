"""The console's traces and sessions pages (services/monitor/trace_pages.py) over real HTTP, on spans and
feedback the real sink stored in embedded ClickHouse: the lists and their filters narrow, pages are bounded,
hostile ids and filters are refused with what to write, and only a viewer (or above) reads them. Then the
trace page in a real headless Chromium: the tree in order and indented by depth, timeline bars as wide as
the spans are long, a span opened to its input, output, attributes and feedback, and a `<script>` an app
sent shown as text, never run."""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI

from contracts.envelope import Envelope, wrap
from contracts.events import FeedbackReceived, SpanKind, SpanLogged, SpanStatus, Thumbs
from contracts.http import Role
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.monitor.api import CONSOLE
from services.monitor.api import create_router as monitor_router
from services.monitor.store import MonitorStore
from services.registry.store import RegistryStore
from services.runtime.auth import Authenticator, KeyStore
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.console import Console, Section
from services.runtime.http import DoorError, error_response
from services.runtime.privacy import Redactor
from tests.support import served as serving
from tests.browser import ARTIFACTS, chromium
from tests.conftest import require
from tests.integration.test_monitor_console import quiet_monitor
from tests.monitor_support import clickhouse, monitor_store  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRACES = f"{CONSOLE}/traces"
SESSIONS = f"{CONSOLE}/sessions"
ANSWER = "4bf92f3577b34da6a3ce929d0e0e4736"
FAILED = "0af7651916cd43dd8448eb211c80319c"
QUIET = "7d3efff798038103d269b633813fc60c"
NIGHTLY = "5b8efff798038103d269b633813fc60c"
CONVERSATION = "conv-9"
# A session id may hold `/` and `:` (contracts/ids.py): its page is reached with them encoded.
TEAM_SESSION = "team/conv:7"
HOSTILE_INPUT = "<script>window.__flywheel_ran = 1</script><b>where</b> is order #42 & why?"
HOSTILE_OUTPUT = 'It ships <today>; </pre><img src=x onerror="window.__flywheel_ran = 2">'
HOSTILE_COMMENT = "wrong <i>order</i>"
# The answer trace's spans: (span id, parent, name, kind, start ms, duration ms); the tree reads
# answer > (retrieve, chat > triton), by start.
ANSWER_SPANS = [
    ("a000000000000001", None, "answer", SpanKind.chain, 0, 1200),
    ("a000000000000002", "a000000000000001", "retrieve", SpanKind.retrieval, 10, 50),
    ("a000000000000003", "a000000000000001", "chat smollm2", SpanKind.llm, 100, 1000),
    ("a000000000000004", "a000000000000003", "triton", SpanKind.unknown, 150, 800),
]
BATCH_TRACES = 51


def _span(trace: str, span_id: str, parent: str | None, name: str, kind: SpanKind, at: datetime, **fields: Any):
    start_ms, duration_ms = fields.pop("start_ms", 0), fields.pop("duration_ms", 10)
    begin = at + timedelta(milliseconds=start_ms)
    return wrap(
        SpanLogged(
            trace_id=trace,
            span_id=span_id,
            parent_span_id=parent,
            name=name,
            kind=kind,
            started_at=begin,
            ended_at=begin + timedelta(milliseconds=duration_ms),
            **fields,
        ),
        producer="otlp-intake",
    )


def seed(clickhouse: ClickHouseStore) -> None:
    """conv-9: the answer (ten minutes ago, feedback on it, its retrieval span and its LLM answer) and a turn
    whose tool failed (five minutes ago); team/conv:7, one quiet turn liked as a session (two minutes ago); a
    nightly reindex three days ago; 51 one-span batch traces two hours ago, for paging."""
    now = datetime.now(UTC)
    app = {"service_name": "rag-app", "session_id": CONVERSATION}
    first, second = now - timedelta(minutes=10), now - timedelta(minutes=5)
    details: dict[str, dict[str, Any]] = {
        "a000000000000001": {"status": SpanStatus.ok, "input_text": "where is order #42?"},
        "a000000000000002": {"input_text": "order #42", "output_text": "order 42: shipped Tuesday"},
        "a000000000000003": {
            "input_text": HOSTILE_INPUT,
            "output_text": HOSTILE_OUTPUT,
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "model_name": "smollm2",
            "inference_id": "chatcmpl-a",
            "attributes": {"gen_ai.request.temperature": "0.2", "<odd key>": "<odd value>"},
        },
        "a000000000000004": {"service_name": "flywheel-serving", "session_id": None},
    }
    spans: list[Envelope] = [
        _span(
            ANSWER, span_id, parent, name, kind, first, start_ms=start, duration_ms=length, **(app | details[span_id])
        )
        for span_id, parent, name, kind, start, length in ANSWER_SPANS
    ]
    spans += [
        _span(FAILED, "b000000000000001", None, "answer", SpanKind.chain, second, duration_ms=700, **app),
        _span(
            FAILED,
            "b000000000000002",
            "b000000000000001",
            "lookup_order",
            SpanKind.tool,
            second,
            start_ms=5,
            duration_ms=600,
            status=SpanStatus.error,
            error="timeout after 600 ms",
            **app,
        ),
        _span(
            QUIET,
            "d000000000000001",
            None,
            "greet",
            SpanKind.chain,
            now - timedelta(minutes=2),
            duration_ms=300,
            service_name="rag-app",
            session_id=TEAM_SESSION,
        ),
        _span(
            NIGHTLY,
            "c000000000000001",
            None,
            "Reindex docs",
            SpanKind.chain,
            now - timedelta(days=3),
            service_name="indexer",
        ),
    ]
    batch_start = now - timedelta(hours=2)
    spans += [
        _span(f"{index + 1:032x}", "e000000000000001", None, f"batch {index}", SpanKind.chain,
              batch_start + timedelta(seconds=index), service_name="batch")
        for index in range(BATCH_TRACES)
    ]  # fmt: skip
    sink = Sink(FeedbackStore(lambda: clickhouse), Redactor())
    sink.store_spans(spans)
    sink.store_feedback(
        [
            wrap(
                FeedbackReceived(inference_id="chatcmpl-a", thumbs=Thumbs.down, comment=HOSTILE_COMMENT),
                producer="test",
            ),
            wrap(FeedbackReceived(trace_id=ANSWER, thumbs=Thumbs.up, comment="good trace"), producer="test"),
            wrap(
                FeedbackReceived(trace_id=ANSWER, span_id="a000000000000002", thumbs=Thumbs.down, rating=2),
                producer="test",
            ),
            wrap(
                FeedbackReceived(session_id=CONVERSATION, thumbs=Thumbs.up, rating=4, comment="helpful overall"),
                producer="test",
            ),
            wrap(FeedbackReceived(session_id=TEAM_SESSION, thumbs=Thumbs.up), producer="test"),
        ]
    )


def trace_app(tmp_path: Path, monitor_store: MonitorStore) -> tuple[FastAPI, dict[Role, str]]:
    """The monitor's door and the runtime's console on one app, as build_process serves them; a key per role."""
    store = RegistryStore(f"sqlite:///{tmp_path / 'keys.db'}")
    store.migrate()
    auth = Authenticator(KeyStore(store.engine))
    keys = {
        role: auth.keys.create(principal=f"traces-{role.value}", role=role, created_by="test")[0]
        for role in (Role.viewer, Role.app)
    }
    app = FastAPI()

    @app.exception_handler(DoorError)
    async def _door_error(_request, error: DoorError):  # noqa: ANN202
        return error_response(error.status, error.detail)

    console = Console(auth)
    console.add(
        Section("monitor", "Monitor", CONSOLE),
        Section("monitor", "Traces", TRACES),
        Section("monitor", "Sessions", SESSIONS),
    )
    console.install(app)
    monitor = quiet_monitor(monitor_store, tmp_path)
    app.include_router(monitor_router(monitor, auth, console=console, console_hours=1))
    return app, keys


@contextlib.asynccontextmanager
async def served(
    tmp_path: Path, clickhouse: ClickHouseStore, monitor_store: MonitorStore
) -> AsyncIterator[tuple[str, dict[Role, str]]]:
    seed(clickhouse)
    app, keys = trace_app(tmp_path, monitor_store)
    async with serving(app, lifespan="off") as base:
        yield base, keys


def listed(page: httpx.Response, *ids: str) -> list[str]:
    """Which of `ids` the page links to, in the order it lists them."""
    assert page.status_code == 200, page.text
    found = [(page.text.find(f'/traces/{id_}"'), id_) for id_ in ids]
    return [id_ for at, id_ in sorted(found) if at >= 0]


async def test_the_lists_filter_page_and_refuse_what_is_not_an_id_or_a_filter(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    async with served(tmp_path, clickhouse, monitor_store) as (base, keys):
        # Not a latency test: on a loaded 2-core machine chDB's first read of the summary views took over
        # httpx's default 5 s.
        async with httpx.AsyncClient(base_url=base, timeout=60) as anonymous:
            for path in (TRACES, SESSIONS, f"{TRACES}/{ANSWER}", f"{SESSIONS}/{CONVERSATION}"):
                signed_out = await anonymous.get(path)
                assert signed_out.status_code == 303 and signed_out.headers["location"].startswith("/console/login")
                below = await anonymous.get(path, headers={"Authorization": f"Bearer {keys[Role.app]}"})
                assert below.status_code == 303, "an app key reads nothing here: viewer or above"
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {keys[Role.viewer]}"}, timeout=60
        ) as viewer:
            everything = (ANSWER, FAILED, QUIET, NIGHTLY)
            recent = await viewer.get(TRACES, params={"since": "1h"})
            assert listed(recent, *everything) == [QUIET, FAILED, ANSWER], "the last hour, newest first"
            assert 'aria-current="page">Traces' in recent.text, "the page is Traces in the navigation, not Monitor"
            answer_row = recent.text[recent.text.index(f"/traces/{ANSWER}") :].split("</tr>", 1)[0]
            # root name, service, duration, spans, tokens, cost, errors, feedback (on the trace, a span, its LLM answer), session
            cells = [
                re.sub("<[^>]*>", "", cell.split(">", 1)[1].split("</td>")[0]) for cell in answer_row.split("<td")[1:]
            ]
            assert cells == ["rag-app", "1200.0 ms", "4", "120 / 30", "", "0", "3 (2 down)", CONVERSATION], cells

            async def only(**filters: str) -> list[str]:
                return listed(await viewer.get(TRACES, params=filters), *everything)

            assert await only(since="1h", errors="on") == [FAILED]
            assert await only(since="7d", service="indexer") == [NIGHTLY]
            assert await only(since="7d", name="REINDEX") == [NIGHTLY], "root name contains, any case"
            assert await only(since="7d", name="%") == [], "a % is a character to find, not a wildcard"
            assert await only(since="1h", session=CONVERSATION) == [FAILED, ANSWER]
            assert await only(since="1h", min_ms="700") == [FAILED, ANSWER]
            assert await only(since="1h", min_ms="1000.5") == [ANSWER]

            # Paging: 51 batch traces, 50 a page, the newest first; a page past the bound is refused.
            first = await viewer.get(TRACES, params={"since": "3h", "service": "batch"})
            assert first.text.count('href="/monitor/console/traces/0000') == 50
            assert 'rel="next"' in first.text and 'rel="prev"' not in first.text
            older = await viewer.get(TRACES, params={"since": "3h", "service": "batch", "page": "2"})
            assert older.text.count('href="/monitor/console/traces/0000') == 1 and f'/traces/{1:032x}"' in older.text
            assert 'rel="prev"' in older.text and 'rel="next"' not in older.text

            for filters, says in [
                ({"since": "last week"}, "is neither a duration nor a time"),
                ({"min_ms": "fast"}, "min duration is milliseconds"),
                ({"min_ms": "-1"}, "min duration is milliseconds"),
                ({"session": "conv 9"}, "is not a session id"),
                ({"session": "x" * 129}, "session is at most 128 characters"),
                ({"page": "0"}, "page is a whole number from 1 to 20"),
                ({"page": "21"}, "narrow the filters"),
                ({"errors": "<b>"}, "errors is a checkbox"),
            ]:
                refused = await viewer.get(TRACES, params=filters)
                assert refused.status_code == 422 and says in refused.text, (filters, refused.text)
                assert "Traceback" not in refused.text

            sessions = await viewer.get(SESSIONS, params={"since": "1h"})
            assert sessions.status_code == 200
            assert (
                f"/sessions/{quote(TEAM_SESSION, safe='')}" in sessions.text
                and f"/sessions/{CONVERSATION}" in sessions.text
            )
            down = await viewer.get(SESSIONS, params={"since": "1h", "thumbs_down": "on"})
            assert f"/sessions/{CONVERSATION}" in down.text and quote(TEAM_SESSION, safe="") not in down.text
            refused = await viewer.get(SESSIONS, params={"since": "yesterday"})
            assert refused.status_code == 422 and "is neither a duration nor a time" in refused.text

            trace = await viewer.get(f"{TRACES}/{ANSWER}")
            assert trace.status_code == 200 and "good trace" in trace.text
            assert "&lt;script&gt;window.__flywheel_ran = 1&lt;/script&gt;" in trace.text
            assert "<script" not in trace.text and "<img" not in trace.text and "<i>" not in trace.text
            assert "wrong &lt;i&gt;order&lt;/i&gt;" in trace.text and "&lt;odd key&gt;" in trace.text
            assert f'href="/monitor/console/sessions/{CONVERSATION}"' in trace.text

            for hostile, status, says in [
                (ANSWER.upper(), 404, "is not a trace id: a trace id is 32 lowercase hex digits"),
                ("0" * 32, 404, "an all-zero trace id is invalid"),
                (quote("4bf92f35'; DROP TABLE span; --", safe=""), 404, "is not a trace id"),
                (quote("<script>alert(1)</script>", safe=""), 404, "is not a trace id"),
                ("f" * 32, 404, f"no spans stored for trace {'f' * 32}"),
            ]:
                refused = await viewer.get(f"{TRACES}/{hostile}")
                assert refused.status_code == status and says in refused.text, (hostile, refused.text)
                assert "<script>alert" not in refused.text

            conversation = await viewer.get(f"{SESSIONS}/{CONVERSATION}")
            assert conversation.status_code == 200 and "helpful overall" in conversation.text
            assert listed(conversation, ANSWER, FAILED) == [ANSWER, FAILED], "a session's traces in order"
            team = await viewer.get(f"{SESSIONS}/{quote(TEAM_SESSION, safe='')}")
            assert team.status_code == 200 and listed(team, QUIET) == [QUIET], team.text
            for hostile, says in [
                ("conv%209", "is not a session id"),
                (quote("conv'; --", safe=""), "is not a session id"),
                ("conv-none", "no traces stored for session &#39;conv-none&#39;"),
            ]:
                refused = await viewer.get(f"{SESSIONS}/{hostile}")
                assert refused.status_code == 404 and says in refused.text, (hostile, refused.text)
        # Spans and feedback were only read: still there as the sink stored them.
        assert clickhouse.query("SELECT count() AS n FROM span FINAL")[0]["n"] == 8 + BATCH_TRACES


async def test_a_trace_in_chromium_is_a_tree_with_a_timeline_and_its_texts_stay_text(
    clickhouse: ClickHouseStore, monitor_store: MonitorStore, tmp_path: Path
) -> None:
    require(shutil.which("chromium") is not None, "Debian's chromium is not installed (apt-get install chromium)")
    # Beside test_console_in_chromium.py's folder, not in it: that test counts the pictures it keeps there.
    shot = ARTIFACTS / "trace-console.png"
    shot.unlink(missing_ok=True)
    async with served(tmp_path, clickhouse, monitor_store) as (base, keys), chromium(tmp_path / "profile") as browser:
        await browser.open(f"{base}{TRACES}/{ANSWER}", "/console/login")
        await browser.submit_key(keys[Role.viewer])
        await browser.settled_at(f"{TRACES}/{ANSWER}")

        rows = await browser.evaluate(
            """[...document.querySelectorAll('details.span')].map(d => {
                const name = d.querySelector('summary .name'), bar = d.querySelector('.bar');
                const line = d.querySelector('.timeline').getBoundingClientRect(), box = bar.getBoundingClientRect();
                return {id: d.dataset.spanId, depth: +d.dataset.depth, name: name.innerText.replace(/^▸ /, ''),
                        indent: parseFloat(getComputedStyle(name).paddingLeft),
                        left: (box.left - line.left) / line.width, width: box.width / line.width};
            })"""
        )
        assert [(row["id"], row["depth"]) for row in rows] == [
            ("a000000000000001", 0),
            ("a000000000000002", 1),
            ("a000000000000003", 1),
            ("a000000000000004", 2),
        ], rows
        assert rows[0]["indent"] == 0 and rows[1]["indent"] == rows[2]["indent"] > 0
        assert rows[3]["indent"] == pytest.approx(2 * rows[1]["indent"]), "indented by depth"
        # Bars scaled to the trace's 1200 ms: as wide as each span ran, starting where it started.
        for row, (_, _, _, _, start_ms, duration_ms) in zip(rows, ANSWER_SPANS, strict=True):
            assert row["width"] == pytest.approx(duration_ms / 1200, abs=0.01), row
            assert row["left"] == pytest.approx(start_ms / 1200, abs=0.01), row

        chat = "document.getElementById('span-a000000000000003')"
        assert await browser.evaluate(f"{chat}.open") is False
        assert await browser.evaluate(f"{chat}.querySelector('pre.input').checkVisibility()") is False, "closed"
        await browser.evaluate(f"{chat}.querySelector('summary').click(); true")
        assert await browser.evaluate(f"{chat}.open && {chat}.querySelector('pre.input').checkVisibility()") is True
        shown = await browser.evaluate(
            f"""({{input: {chat}.querySelector('pre.input').innerText, output: {chat}.querySelector('pre.output').innerText,
                 detail: {chat}.querySelector('.span-detail').innerText}})"""
        )
        assert shown["input"] == HOSTILE_INPUT and shown["output"] == HOSTILE_OUTPUT, shown
        for expected in (
            "llm",
            "smollm2",
            "120 / 30",
            "chatcmpl-a",
            "gen_ai.request.temperature",
            "<odd key>",
            "thumbs down",
            HOSTILE_COMMENT,
        ):
            assert expected in shown["detail"], (expected, shown["detail"])
        retrieve = "document.getElementById('span-a000000000000002')"
        await browser.evaluate(f"{retrieve}.querySelector('summary').click(); true")
        assert "rating 2/5" in await browser.evaluate(f"{retrieve}.querySelector('.span-feedback').innerText")

        # What the app sent is text: no element came of it, and nothing of it ran.
        assert await browser.evaluate("document.querySelectorAll('script, img, [onerror], i').length") == 0
        assert await browser.evaluate("window.__flywheel_ran === undefined") is True
        assert "good trace" in await browser.evaluate("document.querySelector('.trace-feedback').innerText")
        screenshot = await browser.screenshot(shot)
        assert screenshot.stat().st_size > 10_000

        # The trace's session, linked at the top, lists its turns in order with the session's feedback.
        await browser.evaluate("document.querySelector('a.session').click(); true")
        await browser.settled_at(f"{SESSIONS}/{CONVERSATION}")
        turns = await browser.evaluate(
            "[...document.querySelectorAll('table.session-traces tbody tr')].map(r => r.cells[2].innerText + ' ' + r.cells[7].innerText)"
        )
        assert turns == ["answer 3 (2 down)", "answer "], turns
        assert "helpful overall" in await browser.evaluate("document.querySelector('.session-feedback').innerText")
