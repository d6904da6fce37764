"""A reviewer works a review queue in a real headless Chromium with the keyboard alone: the feedback service as
`flywheel run feedback` builds it (its sink on real Kafka, embedded ClickHouse) served by uvicorn, the page
without a line of script. The reviewer types their key into the sign-in form, starts reviewing with Alt+1,
scores two answers with the page's access keys (Alt+key in Chromium on Linux), writes a correction and a
comment, submits each with Alt+s, skips the third with a reason and Alt+k, and is told nothing is left. Both
reviews are in ClickHouse as feedback.reviewed with the reviewer as actor. The pages are kept as screenshots
in test-artifacts/console. A trace item's page shows the trace's spans as a tree and is scored the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import uvicorn

from contracts.events import SpanKind, SpanLogged, SpanStatus
from contracts.http import Role
from infra.processes import free_port
from services.runtime.settings import FlywheelSettings
from tests.browser import ARTIFACTS, Browser, chromium
from tests.conftest import require
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.review_support import (
    QUEUE,
    define_queue,
    feedback_process,
    reviews_stored,
    store_calls,
    store_spans,
)
from tests.support import api_key, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PAGES = "/feedback/console/review"
ITEMS = f"{PAGES}/queues/{QUEUE}/items/"
HOSTILE = "<script>alert('answer')</script> <img src=x onerror=alert(2)> hold the button"
CALLS = [
    {"input_text": "How do I reset the hub?", "output_text": HOSTILE},
    {"input_text": "How long is the warranty?", "output_text": "Two years."},
    {"input_text": "Do you ship to Canada?", "output_text": "Bananas are yellow."},
]
SHOTS = ARTIFACTS / "console"
TRACE = "5e" * 16
SPAN_NAMES = ["answer question", "retrieve manuals", "chat support-bot"]


@pytest.fixture
async def served(settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget) -> AsyncIterator[tuple]:
    """The feedback service on a free port, its calls stored and its queue defined; (base url, key, ClickHouse)."""
    async with serving(settings, chdb_target, CALLS, reviewers_per_item=1) as running:
        yield running


@pytest.fixture
async def served_pairs(settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget) -> AsyncIterator[tuple]:
    """As `served`, with two versions' answers to one prompt in a `pairs` queue."""
    calls = [
        {"input_text": "How long is the warranty?", "output_text": "Two years.", "adapter_version": 1},
        {"input_text": "How long is the warranty?", "output_text": HOSTILE, "adapter_version": 2, "route": "canary"},
    ]
    rule = {"select": "pairs", "model_name": "support-bot", "order": "newest"}
    async with serving(settings, chdb_target, calls, reviewers_per_item=1, rule=rule) as running:
        yield running


@pytest.fixture
async def served_trace(settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget) -> AsyncIterator[tuple]:
    """As `served`, with one traced turn of an app (a root, a retrieval and an LLM call under it) in a trace queue."""
    begun = datetime.now(UTC) - timedelta(minutes=5)
    root, *children = (TRACE[:15] + digit for digit in "123")
    spans = [
        SpanLogged(
            trace_id=TRACE,
            span_id=span_id,
            parent_span_id=None if span_id == root else root,
            name=name,
            kind=kind,
            started_at=begun + timedelta(milliseconds=10 * index),
            ended_at=begun + timedelta(milliseconds=900 - 10 * index),
            input_text=f"{name} input",
            output_text=HOSTILE if span_id == root else f"{name} output",
            status=SpanStatus.ok,
        )
        for index, (span_id, name, kind) in enumerate(
            zip([root, *children], SPAN_NAMES, [SpanKind.chain, SpanKind.retrieval, SpanKind.llm], strict=True)
        )
    ]
    rule = {"target": "trace", "select": "traffic"}
    async with serving(settings, chdb_target, [], spans=spans, reviewers_per_item=1, rule=rule) as running:
        yield running


@contextlib.asynccontextmanager
async def serving(
    settings: FlywheelSettings,
    chdb_target: ClickHouseTarget,
    calls: list[dict],
    *,
    spans: list[SpanLogged] | None = None,
    **definition: object,
) -> AsyncIterator[tuple]:
    require(shutil.which("chromium") is not None, "Debian's chromium is not installed (apt-get install chromium)")
    clickhouse = chdb_target.open()
    app, runtime = feedback_process(settings, clickhouse)
    key = api_key(settings, Role.reviewer, "rita")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or serving.done(), timeout_s=120, what="the process listening")
        assert not serving.done(), f"uvicorn did not start: {serving.exception()}"
        await store_calls(runtime, clickhouse, calls)
        if spans:
            await store_spans(runtime, clickhouse, spans)
        await define_queue(settings, clickhouse, **definition)
        yield f"http://127.0.0.1:{port}", key, clickhouse
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=60)


async def keys_then_page(browser: Browser, keys: list[str], under: str) -> str:
    """Press Alt+each key, the last of which posts a form, and wait for the page it leads to, whose path starts
    with `under` (the page left is marked, so it is not mistaken for the new one); the new page's path."""
    await browser.evaluate("document.documentElement.dataset.left = 'yes'; true")
    for key in keys:
        await browser.press(key, alt=True)

    async def arrived() -> bool:
        with contextlib.suppress(AssertionError):  # a page being replaced refuses evaluation for a moment
            return await browser.evaluate(
                "document.documentElement.dataset.left === undefined && document.readyState === 'complete'"
                f" && location.pathname.startsWith({json.dumps(under)})"
            )
        return False

    await eventually(arrived, interval_s=0.1, what=f"the page under {under} after Alt+{', Alt+'.join(keys)}")
    return await browser.evaluate("location.pathname")


async def key_of(browser: Browser, field: str, value: str) -> str:
    """The access key the page gives one score choice (the page's legend shows the same)."""
    selector = json.dumps(f'input[name="{field}"][value="{value}"]')
    return await browser.evaluate(f"document.querySelector({selector}).accessKey")


async def checked(browser: Browser) -> dict[str, str]:
    return await browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('input[type=radio]:checked')].map(r => [r.name, r.value]))"
    )


async def answer_as_text(browser: Browser) -> str:
    """The answer the item page shows, once it is known that no markup of it became an element."""
    assert await browser.evaluate("document.querySelectorAll('script, img, [onerror]').length") == 0
    answer = await browser.evaluate("document.querySelector('pre.answer').innerText")
    if answer == HOSTILE:
        await browser.screenshot(SHOTS / "review-02-hostile-answer-as-text.png")
    return answer


async def focused(browser: Browser, expected: str | None = None, timeout_s: float = 5.0) -> str:
    """The focused element's name (or id, or tag); with `expected`, waited for up to `timeout_s`: a page
    applies `autofocus` once it has rendered, which a busy machine can put off past the load event."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        name = await browser.evaluate("(e => e.name || e.id || e.tagName)(document.activeElement)")
        if expected is None or name == expected or asyncio.get_running_loop().time() > deadline:
            return name
        await asyncio.sleep(0.1)


async def test_a_reviewer_reviews_two_answers_and_skips_a_third_with_the_keyboard_alone(
    served: tuple, tmp_path: Path
) -> None:
    base, key, clickhouse = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with chromium(tmp_path / "chromium-profile") as browser:
        await browser.open(f"{base}{PAGES}", "/console/login")
        assert await focused(browser, "api_key") == "api_key", "the sign-in form takes the focus"
        await browser.type(key)
        await browser.press("Enter")
        await browser.settled_at(PAGES)
        assert "Start reviewing support-review" in await browser.evaluate("document.body.innerText")
        await browser.screenshot(SHOTS / "review-01-queues.png")

        first = await keys_then_page(browser, ["1"], ITEMS)
        assert await focused(browser, "score.correct") == "score.correct", "the first score takes the focus"
        reviewed: dict[str, dict[str, str]] = {}
        answers: list[str] = []
        plans = [
            ({"score.correct": "up", "score.helpful": "4", "score.tone": "friendly"}, "c", "Two years from purchase."),
            ({"score.correct": "down", "score.helpful": "2", "score.tone": "rude"}, "m", "off topic"),
        ]
        page = first
        for number, (scores, text_key, text) in enumerate(plans, start=1):
            item_id = page.removeprefix(ITEMS)
            answers.append(await answer_as_text(browser))
            for field, value in scores.items():
                await browser.press(await key_of(browser, field, value), alt=True)
            assert await checked(browser) == scores
            await browser.press(text_key, alt=True)
            box = "correction" if text_key == "c" else "comment"
            assert await focused(browser, box) == box
            await browser.type(text)
            await browser.screenshot(SHOTS / f"review-0{2 + number}-item-{number}-scored.png")
            reviewed[item_id] = {**{f.removeprefix("score."): v for f, v in scores.items()}, "text": text}
            page = await keys_then_page(browser, ["s"], ITEMS)
            assert page.removeprefix(ITEMS) not in reviewed, "the next item is another one"
            assert "Your review was recorded; the item is done." in await browser.evaluate("document.body.innerText")

        # The third is skipped: Alt+r to the reason, typed, Alt+k; nothing is left for this reviewer.
        answers.append(await answer_as_text(browser))
        assert HOSTILE in answers, f"the answer with markup was not shown as text: {answers}"
        await browser.press("r", alt=True)
        assert await focused(browser, "reason") == "reason"
        await browser.type("outside my expertise")
        page = await keys_then_page(browser, ["k"], f"{PAGES}/queues/{QUEUE}")
        assert page == f"{PAGES}/queues/{QUEUE}"
        text = await browser.evaluate("document.body.innerText")
        assert "Nothing left for you in this queue." in text
        # The skipped item stays open for another reviewer.
        assert "1 open · 0 claimed · 0 in adjudication · 2 done · 1 skips" in text, text
        await browser.screenshot(SHOTS / "review-05-nothing-left.png")

    def both_stored() -> bool:
        return len(reviews_stored(clickhouse)) == 2

    await eventually(both_stored, what="the two reviews stored as feedback")
    rows = reviews_stored(clickhouse)
    assert {row["actor"] for row in rows} == {"rita"} and {row["source"] for row in rows} == {"reviewer"}
    stored = {row["item_id"]: {**dict(row["scores"]), "text": row["correction"] or row["comment"]} for row in rows}
    assert stored == reviewed, (stored, reviewed)


async def test_a_reviewer_picks_the_better_of_two_answers_side_by_side_with_the_keyboard_alone(
    served_pairs: tuple, tmp_path: Path
) -> None:
    base, key, clickhouse = served_pairs
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with chromium(tmp_path / "chromium-profile") as browser:
        await browser.open(f"{base}{PAGES}", "/console/login")
        assert await focused(browser, "api_key") == "api_key"
        await browser.type(key)
        await browser.press("Enter")
        await browser.settled_at(PAGES)
        page = await keys_then_page(browser, ["1"], ITEMS)
        assert await focused(browser, "choice") == "choice", "the choice takes the focus"
        # Side by side: the two answers' boxes share a row, the first on the left; markup stays text.
        assert await browser.evaluate("document.querySelectorAll('script, img, [onerror]').length") == 0
        boxes = await browser.evaluate(
            "[...document.querySelectorAll('.pair pre.answer')].map(e => [e.getBoundingClientRect().left, "
            "e.getBoundingClientRect().top, e.innerText])"
        )
        assert len(boxes) == 2 and boxes[0][0] < boxes[1][0] and boxes[0][1] == boxes[1][1], boxes
        assert {boxes[0][2], boxes[1][2]} == {"Two years.", HOSTILE}
        await browser.press("2", alt=True)
        assert await checked(browser) == {"choice": "second"}
        await browser.screenshot(SHOTS / "review-06-pair-picked.png")
        item_id = page.removeprefix(ITEMS)
        page = await keys_then_page(browser, ["s"], f"{PAGES}/queues/{QUEUE}")
        assert "Nothing left for you in this queue." in await browser.evaluate("document.body.innerText")

    def stored() -> list[dict]:
        return clickhouse.query(
            "SELECT item_id, inference_id, preferred_over FROM feedback FINAL WHERE queue = {queue:String}",
            {"queue": QUEUE},
        )

    await eventually(lambda: len(stored()) == 1, what="the choice stored as feedback")
    [row] = stored()
    chosen = {"Two years.": "call-0", HOSTILE: "call-1"}[boxes[1][2]]
    assert (row["item_id"], row["inference_id"], row["preferred_over"]) == (
        item_id,
        chosen,
        ({"call-0", "call-1"} - {chosen}).pop(),
    )


async def test_a_reviewer_reads_a_trace_as_a_tree_and_scores_it_with_the_keyboard_alone(
    served_trace: tuple, tmp_path: Path
) -> None:
    base, key, clickhouse = served_trace
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with chromium(tmp_path / "chromium-profile") as browser:
        await browser.open(f"{base}{PAGES}", "/console/login")
        assert await focused(browser, "api_key") == "api_key"
        await browser.type(key)
        await browser.press("Enter")
        await browser.settled_at(PAGES)
        page = await keys_then_page(browser, ["1"], ITEMS)
        assert await focused(browser, "score.correct") == "score.correct", "the first score takes the focus"
        # The spans in tree order, the children indented under the root; the root's output stays text.
        assert await browser.evaluate("document.querySelectorAll('script, img, [onerror]').length") == 0
        tree = await browser.evaluate(
            "[...document.querySelectorAll('.spans details.span')].map(e => "
            "[e.querySelector('summary .name').innerText, Number(e.dataset.depth), e.getBoundingClientRect().left])"
        )
        assert [(name, depth) for name, depth, _ in tree] == list(zip(SPAN_NAMES, [0, 1, 1], strict=True)), tree
        assert tree[0][2] < tree[1][2] == tree[2][2], f"children are indented under the root: {tree}"
        text = await browser.evaluate("document.body.innerText")
        assert all(name in text for name in SPAN_NAMES), text
        assert await browser.evaluate("document.querySelector('pre.answer').innerText") == HOSTILE
        assert await browser.evaluate("document.querySelector('#correction') === null"), "a trace has no one answer"
        scores = {"score.correct": "down", "score.helpful": "2", "score.tone": "curt"}
        for field, value in scores.items():
            await browser.press(await key_of(browser, field, value), alt=True)
        assert await checked(browser) == scores
        await browser.press("m", alt=True)
        assert await focused(browser, "comment") == "comment"
        await browser.type("retrieval found the wrong manual")
        await browser.screenshot(SHOTS / "review-07-trace-scored.png")
        item_id = page.removeprefix(ITEMS)
        await keys_then_page(browser, ["s"], f"{PAGES}/queues/{QUEUE}")
        assert "Nothing left for you in this queue." in await browser.evaluate("document.body.innerText")

    def stored() -> list[dict]:
        return clickhouse.query(
            "SELECT item_id, inference_id, trace_id, span_id, actor, scores, comment FROM feedback FINAL "
            "WHERE queue = {queue:String}",
            {"queue": QUEUE},
        )

    await eventually(lambda: len(stored()) == 1, what="the trace's review stored as feedback")
    [row] = stored()
    assert (row["item_id"], row["inference_id"], row["trace_id"], row["span_id"], row["actor"]) == (
        item_id,
        "",
        TRACE,
        None,
        "rita",
    )
    assert dict(row["scores"]) == {"correct": "down", "helpful": "2", "tone": "curt"}
    assert row["comment"] == "retrieval found the wrong manual"
