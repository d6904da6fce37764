"""The review queues' console pages over HTTP, on the feedback service as `flywheel run feedback` builds it (its
sink on the real broker, embedded ClickHouse, the console's real sign-in): a viewer reads the queues and is
refused a claim; reviewers claim, submit and skip through the pages' forms (the session's CSRF token, the
reviewer role), a reload claims nothing, an adjudicator sees the reviews that disagree, answers carrying
markup are shown as text, a correction as long as the contract allows gets through, and every review lands
in ClickHouse as feedback.reviewed."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from contracts.http import Role
from services.feedback.console import REVIEW_FORM_LIMIT
from services.runtime.settings import FlywheelSettings
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.review_support import (
    QUEUE,
    define_queue,
    feedback_process,
    reviews_stored,
    store_calls,
)
from tests.support import api_key, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
ITEM_PAGE = re.compile(rf"^/feedback/console/review/queues/{QUEUE}/items/([0-9a-f]{{32}})(\?last=\w+)?$")
PAGES = "/feedback/console/review"
HOSTILE = "<script>alert('answer')</script> hold the button & wait"
HOSTILE_ESCAPED = "&lt;script&gt;alert(&#39;answer&#39;)&lt;/script&gt; hold the button &amp; wait"
TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLS = [
    {
        "input_messages": [
            {"role": "system", "content": "You are <i>Acme</i> support."},
            {"role": "user", "content": "How do I reset the hub?"},
        ],
        "input_text": "How do I reset the hub?",
        "output_text": HOSTILE,
        "trace_id": TRACE,
        "adapter_version": 2,
        "route": "canary",
    },
    {"input_text": "How long is the warranty?", "output_text": "Two years."},
    {"input_text": "Do you ship to Canada?", "output_text": "Bananas are yellow."},
]
GOOD = {"score.correct": "up", "score.helpful": "4", "score.tone": "friendly"}
BAD = {"score.correct": "down", "score.helpful": "1", "score.tone": "rude"}


class Browser:
    """One person's browser: a signed-in session on the ASGI app and the page it is on."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.html = ""
        self.outcome = ""  # what the last review or skip did, as its redirect said

    async def open(self, path: str, status: int = 200) -> str:
        answer = await self.client.get(path)
        assert answer.status_code == status, f"{path}: {answer.status_code}\n{answer.text}"
        self.html = answer.text
        return self.html

    async def post(self, path: str, fields: dict[str, str], status: int = 303) -> httpx.Response:
        """Post a form of the page it is on (with its CSRF token unless `fields` names one)."""
        answer = await self.client.post(path, data={"csrf_token": csrf_of(self.html), **fields})
        assert answer.status_code == status, f"{path}: {answer.status_code}\n{answer.text}"
        return answer

    async def claim(self) -> str:
        """Start reviewing from the queue's page; the id of the item the claim led to, with its page open."""
        await self.open(f"{PAGES}/queues/{QUEUE}")
        return await self.follow(await self.post(f"{PAGES}/queues/{QUEUE}/claim", {}))

    async def follow(self, answer: httpx.Response) -> str:
        """Open where a form's redirect leads; the item id when it is an item's page, else ''."""
        location = answer.headers["location"]
        said = re.search(r"last=(\w+)", location)
        self.outcome = said.group(1) if said else ""
        await self.open(location)
        found = ITEM_PAGE.match(location)
        return found.group(1) if found else ""

    async def review(self, item_id: str, fields: dict[str, str]) -> str:
        return await self.follow(await self.post(f"{PAGES}/queues/{QUEUE}/items/{item_id}/submit", fields))

    async def skip(self, item_id: str, reason: str) -> str:
        return await self.follow(await self.post(f"{PAGES}/queues/{QUEUE}/items/{item_id}/skip", {"reason": reason}))


def csrf_of(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found is not None, "no form with a CSRF token on the page"
    return found.group(1)


@asynccontextmanager
async def signed_in(app: object, key: str) -> AsyncIterator[Browser]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:
        form = await client.get("/console/login")
        answer = await client.post(
            "/console/login", data={"csrf_token": csrf_of(form.text), "api_key": key, "next": PAGES}
        )
        assert answer.status_code == 303 and answer.headers["location"] == PAGES, answer.text
        yield Browser(client)


async def test_reviewers_work_a_queue_through_the_console_and_a_viewer_only_reads_it(
    settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget
) -> None:
    clickhouse = chdb_target.open()
    app, runtime = feedback_process(settings, clickhouse)
    keys = {
        name: api_key(settings, role, name)
        for name, role in (
            ("alice", Role.reviewer),
            ("bob", Role.reviewer),
            ("carol", Role.reviewer),
            ("ops", Role.operator),
            ("watcher", Role.viewer),
        )
    }
    async with app.router.lifespan_context(app):
        await store_calls(runtime, clickhouse, CALLS)
        await define_queue(settings, clickhouse, reviewers_per_item=2, lease_seconds=300)

        async with (
            signed_in(app, keys["watcher"]) as watcher,
            signed_in(app, keys["ops"]) as ops,
            signed_in(app, keys["alice"]) as alice,
            signed_in(app, keys["bob"]) as bob,
            signed_in(app, keys["carol"]) as carol,
        ):
            # 1. Anyone signed in reads the queues, from the navigation's Review section; a viewer gets no claim form.
            html = await watcher.open(PAGES)
            assert f'<a href="{PAGES}" class="current" aria-current="page">Review</a>' in html
            for shown in (QUEUE, "v1", "answer-quality:v3", "every one of the answers of support-bot", "newest first"):
                assert shown in html, shown
            assert "0 open · 0 claimed · 0 in adjudication · 0 done · 0 skips" in html
            assert "/claim" not in html and "Start reviewing" not in html
            # ... and posting the claim anyway (with the session's own token, from the sign-out form) is refused.
            for outsider in (watcher, ops):
                await outsider.open(PAGES)
                refused = await outsider.post(f"{PAGES}/queues/{QUEUE}/claim", {}, status=403)
                assert "this needs reviewer" in refused.text and "nothing was changed" in refused.text
            await watcher.open(f"{PAGES}/queues/{QUEUE}")
            assert "0 claimed" in watcher.html and "Start reviewing" not in watcher.html
            assert "A &lt;b&gt;bold&lt;/b&gt; claim needs a source." in watcher.html

            # 2. alice starts reviewing: the claim fills the empty queue and leads to an item's page.
            html = await alice.open(PAGES)
            assert 'accesskey="1"' in html and "Start reviewing support-review" in html
            first = await alice.claim()
            assert first, alice.html
            assert f"/items/{first}/submit" in await alice.open(f"{PAGES}/queues/{QUEUE}/items/{first}")
            await alice.open(f"{PAGES}/queues/{QUEUE}")
            assert "3 open · 1 claimed" in alice.html, "a reload of the item's page claims nothing more"
            await alice.open(f"{PAGES}/queues/{QUEUE}/items/{first}")
            for control in (
                'type="radio" name="score.correct" value="up" required accesskey="u" autofocus',
                'name="score.correct" value="down" required accesskey="j"',
                *(f'name="score.helpful" value="{n}" required accesskey="{n}"' for n in range(1, 6)),
                'name="score.tone" value="friendly" required accesskey="i"',
                'accesskey="s">Submit</button>',
                'accesskey="k">Skip</button>',
                'name="correction" maxlength="32000" accesskey="c"',
            ):
                assert control in alice.html, control
            assert len(set(re.findall(r'accesskey="([^"]+)"', alice.html))) == len(
                re.findall(r'accesskey="([^"]+)"', alice.html)
            ), "two controls share a key"

            # Others cannot see or act on alice's item: a viewer is refused, bob holds no claim on it.
            refused = await watcher.client.get(f"{PAGES}/queues/{QUEUE}/items/{first}")
            assert refused.status_code == 403 and "reviewing needs reviewer" in refused.text
            await bob.open(f"{PAGES}/queues/{QUEUE}/items/{first}", status=409)

            # A form without the session's token, a score off its scale, a missing score: refused, nothing recorded.
            forged = await alice.client.post(
                f"{PAGES}/queues/{QUEUE}/items/{first}/submit", data={"csrf_token": "x" * 43, **GOOD}
            )
            assert forged.status_code == 403 and "CSRF" in forged.text
            off_scale = await alice.post(
                f"{PAGES}/queues/{QUEUE}/items/{first}/submit", {**GOOD, "score.helpful": "6"}, status=422
            )
            assert "scores.helpful" in off_scale.text
            missing = await alice.post(
                f"{PAGES}/queues/{QUEUE}/items/{first}/submit", {"score.correct": "up"}, status=422
            )
            assert "score every dimension" in missing.text

            # 3. alice reviews the three items: the hostile answer is text wherever it comes in the order.
            alices: dict[str, dict[str, str]] = {}
            item = first
            long_correction = "é" * 32_000  # 192,000 bytes as a form posts it: far over other console forms
            for k in range(3):
                await alice.open(f"{PAGES}/queues/{QUEUE}/items/{item}")
                if HOSTILE_ESCAPED in alice.html:
                    assert HOSTILE not in alice.html and "<i>Acme</i>" not in alice.html
                    assert "You are &lt;i&gt;Acme&lt;/i&gt; support." in alice.html
                    assert f'<a href="/monitor/console/traces/{TRACE}">{TRACE}</a>' in alice.html
                    assert "support-bot:v2, route canary" in alice.html
                if k < 2:
                    fields = {**(GOOD if k == 0 else BAD), "comment": f"note {k}"}
                    if k == 0:
                        fields["correction"] = long_correction
                    alices[item] = fields
                    following = await alice.review(item, fields)
                    assert "Your review was recorded; the item waits for its other reviewers." in alice.html
                else:
                    # A skip's reason is a note: its form keeps the console's own limit; a review's has its own.
                    too_long = await alice.post(
                        f"{PAGES}/queues/{QUEUE}/items/{item}/skip", {"reason": "x" * 20_000}, status=413
                    )
                    assert "larger than 16384 bytes" in too_long.text
                    await alice.open(f"{PAGES}/queues/{QUEUE}/items/{item}")
                    await alice.post(
                        f"{PAGES}/queues/{QUEUE}/items/{item}/submit",
                        {**GOOD, "comment": "x" * REVIEW_FORM_LIMIT},
                        status=413,
                    )
                    await alice.open(f"{PAGES}/queues/{QUEUE}/items/{item}")
                    following = await alice.skip(item, "outside my expertise")
                if k < 2:
                    assert following and following not in alices, following
                item = following
            assert item == "" and "Nothing left for you in this queue." in alice.html
            assert "Skipped; the item will not be offered to you again." in alice.html
            assert 'accesskey="n"' in alice.html and ">Next</button>" in alice.html

            # 4. bob agrees with alice on one item, disagrees on the other, and reviews the one alice skipped.
            [agreed, disputed] = list(alices)
            skipped = await bob.claim()
            stages: dict[str, str] = {}
            item = skipped
            while item:
                judged = (
                    {key: value for key, value in alices[item].items() if key.startswith("score.")}
                    if item == agreed
                    else GOOD
                )
                following = await bob.review(item, judged)
                stages[item] = bob.outcome
                item = following
            assert stages == {
                agreed: "done",
                disputed: "adjudication",
                **{k: "waiting" for k in stages if k not in alices},
            }
            assert len(stages) == 3 and "Nothing left for you in this queue." in bob.html

            # 5. carol adjudicates first, seeing the two reviews that disagree, then gives the last item its second review.
            item = await carol.claim()
            assert item == disputed
            assert "Adjudicate an answer" in carol.html and "Earlier reviews (they disagree)" in carol.html
            earlier = re.findall(r"<tr><td>(alice|bob)</td><td>(\w+)</td><td>(\w+)</td><td>(\w+)</td>", carol.html)
            assert sorted(earlier) == [("alice", "down", "1", "rude"), ("bob", "up", "4", "friendly")], earlier
            last = await carol.review(item, {**BAD, "correction": "Two years.\r\nAsk for the receipt.\r\n"})
            assert carol.outcome == "done" and last not in (agreed, disputed)
            assert await carol.review(last, GOOD) == "" and carol.outcome == "done"

            # 6. Every review is feedback.reviewed in ClickHouse, with the reviewer's principal as its actor.
            await eventually(lambda: len(reviews_stored(clickhouse)) == 7, what="the seven reviews stored as feedback")
            rows = reviews_stored(clickhouse)
            assert [row["actor"] for row in rows].count("alice") == 2
            assert {row["source"] for row in rows} == {"reviewer"} and {row["rubric"] for row in rows} == {
                "answer-quality:v3"
            }
            [long] = [row for row in rows if row["actor"] == "alice" and row["item_id"] == first]
            assert long["correction"] == long_correction and long["comment"] == "note 0"
            assert dict(long["scores"]) == {"correct": "up", "helpful": "4", "tone": "friendly"}
            [settled] = [row for row in rows if "adjudication" in row["tags"]]
            assert (settled["actor"], settled["correction"]) == ("carol", "Two years.\nAsk for the receipt.")

            # 7. The viewer's list shows the counts and each dimension's agreement as the JSON door measures it.
            html = await watcher.open(PAGES)
            assert "0 open · 0 claimed · 0 in adjudication · 3 done · 1 skips" in html
            door = await watcher.client.get(
                f"/feedback/v1/review/queues/{QUEUE}", headers={"Authorization": f"Bearer {keys['watcher']}"}
            )
            for measured in door.json()["agreement"]:
                alpha = "undefined" if measured["alpha"] is None else f"{measured['alpha']:.3f}"
                kappa = "" if measured["kappa"] is None else f"{measured['kappa']:.3f}"
                row = f"<tr><td>{measured['dimension']}</td><td>{measured['level']}</td><td>{alpha}</td><td>{kappa}</td><td>{measured['items']}</td>"
                assert row in html, (row, html[html.find("<table") : html.find("</table>")])


async def test_a_pairwise_item_shows_two_answers_side_by_side_blind_and_keys_pick_one(
    settings: FlywheelSettings, topics: str, chdb_target: ClickHouseTarget
) -> None:
    clickhouse = chdb_target.open()
    app, runtime = feedback_process(settings, clickhouse)
    keys = {name: api_key(settings, Role.reviewer, name) for name in ("alice", "bob", "carol")}
    async with app.router.lifespan_context(app):
        await store_calls(
            runtime,
            clickhouse,
            [
                {"input_text": "How long is the warranty?", "output_text": "Two years.", "adapter_version": 1},
                {
                    "input_text": "How long is the warranty?",
                    "output_text": HOSTILE,
                    "adapter_version": 2,
                    "route": "canary",
                },
            ],
        )
        await define_queue(
            settings,
            clickhouse,
            rule={"select": "pairs", "model_name": "support-bot", "order": "newest"},
            reviewers_per_item=2,
        )
        async with (
            signed_in(app, keys["alice"]) as alice,
            signed_in(app, keys["bob"]) as bob,
            signed_in(app, keys["carol"]) as carol,
        ):
            await alice.open(f"{PAGES}/queues/{QUEUE}")
            assert "prompts to support-bot with two different answers" in alice.html
            item_id = await alice.claim()
            html = alice.html
            assert "Review two answers of support-bot" in html and 'class="pair"' in html
            # Both answers, as text, left and right; which version gave which is not shown.
            assert html.index("Answer 1") < html.index("Answer 2")
            assert "Two years." in html and HOSTILE_ESCAPED in html and HOSTILE not in html
            assert ":v1" not in html and ":v2" not in html and "canary" not in html
            for value, key in (("first", "1"), ("second", "2"), ("tie", "t")):
                assert f'name="choice" value="{value}" required accesskey="{key}"' in html, value
            assert 'name="correction"' not in html and "score." not in html
            # A form without a choice is refused, naming it, and nothing is recorded.
            refused = await alice.post(f"{PAGES}/queues/{QUEUE}/items/{item_id}/submit", {}, status=422)
            assert "choice" in refused.text
            await alice.open(f"{PAGES}/queues/{QUEUE}/items/{item_id}")
            await alice.review(item_id, {"choice": "first"})
            assert alice.outcome == "waiting"
            assert await bob.claim() == item_id
            await bob.review(item_id, {"choice": "second"})
            assert bob.outcome == "adjudication"

            # carol adjudicates: she sees both choices, then calls it a tie.
            assert await carol.claim() == item_id
            assert "Adjudicate two answers" in carol.html
            earlier = carol.html[carol.html.index('<table class="earlier">') :]
            assert "<td>alice</td><td>first</td>" in earlier and "<td>bob</td><td>second</td>" in earlier
            await carol.review(item_id, {"choice": "tie"})
            assert carol.outcome == "done"

        def stored() -> list[dict]:
            return clickhouse.query(
                "SELECT actor, inference_id, preferred_over, tied_with FROM feedback FINAL "
                "WHERE queue = {queue:String} ORDER BY actor",
                {"queue": QUEUE},
            )

        await eventually(lambda: len(stored()) == 3, what="the three choices stored")
        rows = stored()
        first, second = rows[0]["inference_id"], rows[0]["preferred_over"]
        assert {first, second} == {"call-0", "call-1"}
        assert [(row["actor"], row["inference_id"], row["preferred_over"], row["tied_with"]) for row in rows] == [
            ("alice", first, second, None),
            ("bob", second, first, None),
            ("carol", first, None, second),
        ]
