"""The registry's console pages over HTTP, on a real registry (SQLite, a real artifact store) and a real
console sign-in: every page shows the seeded registry to a viewer, hostile text stays text, unknown ids
are 404 pages, and a label or a stage moves only for an operator posting the session's CSRF token, with
the operator named in the audit log and the domain's refusals shown as pages."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from contracts.events import DatasetRef, EvaluationCompleted, MetricComparison, ModelTarget, Stage
from contracts.http import Role, RubricDimension, RubricScale
from services.registry.console import create_console_router
from services.registry.errors import NotFound
from services.registry.service import Registry
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.auth import Authenticator, KeyStore
from services.runtime.console import Console, Section
from tests.integration.registry_support import jsonl, seed_production_and_approved_candidate, training_completed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
HOSTILE = '<script>alert("x")</script>'
ESCAPED = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"
PROMPT = "support-reply"
RUBRIC = "answer-quality"
TEMPLATES = [
    "Hello {{ customer }},\nLine two\nRegards",
    "Hello {{ customer }},\nLine 2 changed\nRegards",
    f"Hello {{{{ customer }}}},\nLine 2 changed\n{HOSTILE} & more\nRegards",
]


@dataclass
class Site:
    registry: Registry
    app: FastAPI
    viewer_key: str
    operator_key: str


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    store = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    store.migrate()
    registry = Registry(store, ArtifactStore(tmp_path / "artifacts"))
    seed(registry, tmp_path)
    keys = KeyStore(store.engine)
    viewer_key, _ = keys.create(principal="vic-viewer", role=Role.viewer, created_by="test")
    operator_key, _ = keys.create(principal="olga-operator", role=Role.operator, created_by="test")
    console = Console(Authenticator(keys))
    console.add(Section("registry", "Models", "/registry/console/models"))
    app = FastAPI()
    console.install(app)
    app.include_router(create_console_router(registry, console))
    yield Site(registry, app, viewer_key, operator_key)
    store.close()


def seed(registry: Registry, tmp_path: Path) -> None:
    """smol: v1 in production, v2 its 10% canary (evaluated with metrics, a hostile reason), v3 only registered;
    support:v1 (chat) and support:v2 (25 instruction records, hostile and long); a prompt with three versions;
    a rubric with two (the second's instructions and a label hostile)."""
    seed_production_and_approved_candidate(registry, tmp_path, "smol")
    registry.adapters.transition(
        "alice", model_name="smol", version=2, to_stage=Stage.production, canary_percent=10, reason=HOSTILE
    )
    registry.adapters.attach_evaluation(
        EvaluationCompleted(
            evaluation_id=f"eval-{uuid.uuid4().hex[:8]}",
            candidate=ModelTarget(model_name="smol", adapter_version=2),
            golden=DatasetRef(name="support", version=1),
            passed=False,
            gate_policy="strict@v2",
            reasons=[HOSTILE],
            metrics=[
                MetricComparison(
                    metric="exact_match",
                    candidate=0.61,
                    baseline=0.7,
                    difference=-0.09,
                    ci_low=-0.2,
                    ci_high=0.01,
                    examples=40,
                )
            ],
        )
    )
    event = training_completed(registry, tmp_path, job_id="job-2", seed=2)
    registry.adapters.register_trained_adapter(
        event.model_copy(update={"metrics": {HOSTILE: 0.25}}), event_id=str(uuid.uuid4()), correlation_id=None
    )
    records = [{"instruction": HOSTILE, "output": "x" * 1000}] + [
        {"instruction": f"question {index}", "output": "answer"} for index in range(2, 26)
    ]
    registry.datasets.publish_dataset(
        "alice", name="support", split="train", jsonl=jsonl(records), provenance="feedback"
    )
    registry.prompts.publish_prompt("alice", name=PROMPT, template=TEMPLATES[0], labels=["staging"])
    for template in TEMPLATES[1:]:
        registry.prompts.publish_prompt("alice", name=PROMPT, template=template, model_name="smol")
    correct = RubricDimension(name="correct", description="Is the answer right?", scale=RubricScale.thumbs)
    registry.rubrics.publish_rubric("alice", name=RUBRIC, instructions="Judge the answer.", dimensions=[correct])
    tone = RubricDimension(name="tone", description="How it sounds", scale=RubricScale.label, labels=["warm", HOSTILE])
    registry.rubrics.publish_rubric("bob", name=RUBRIC, instructions=HOSTILE, dimensions=[correct, tone])


@pytest.fixture
async def clients(site: Site) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """A viewer's and an operator's browser, each signed in through the console's form."""
    async with client_of(site) as viewer, client_of(site) as operator:
        await sign_in(viewer, site.viewer_key)
        await sign_in(operator, site.operator_key)
        yield viewer, operator


def client_of(site: Site) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(site.app), base_url="http://testserver")


async def sign_in(client: httpx.AsyncClient, key: str) -> None:
    form = await client.get("/console/login")
    token = csrf_of(form.text)
    answer = await client.post(
        "/console/login", data={"csrf_token": token, "api_key": key, "next": "/registry/console/models"}
    )
    assert answer.status_code == 303, answer.text


def csrf_of(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found is not None, "no form with a CSRF token on the page"
    return found.group(1)


async def page(client: httpx.AsyncClient, path: str, status: int = 200) -> str:
    answer = await client.get(path)
    assert answer.status_code == status, (path, answer.status_code, answer.text[:2000])
    assert answer.headers["content-type"].startswith("text/html")
    assert "script-src" not in answer.headers["content-security-policy"]  # default-src 'none': no script runs
    assert answer.headers["cache-control"] == "no-store"
    assert "<script" not in answer.text.lower()
    return answer.text


def flat(html: str) -> str:
    """The page's text with tags and runs of whitespace collapsed, for assertions about what it says."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def audit(registry: Registry, object_id: str) -> list:
    return registry.changes.entries(object_id=object_id, limit=500).items


async def test_every_page_shows_the_seeded_registry_to_a_viewer(site: Site, clients: tuple) -> None:
    viewer, _ = clients
    models = flat(await page(viewer, "/registry/console/models"))
    assert "smol" in models and "LlamaForCausalLM" in models
    assert "v1 production" in models and "v2 production canary 10.0%" in models and "v3 none" in models

    model = await page(viewer, "/registry/console/models/smol")
    text = flat(model)
    assert "v1 production 90.0%" in text and "v2 canary 10.0%" in text  # the traffic split
    assert 'href="/registry/console/datasets/support/versions/1"' in model
    assert "job-0" in text and "job-1" in text and "job-2" in text
    assert "failed strict@v2" in text and "passed default@v1" in text and "not evaluated" in text
    assert 'href="/registry/console/models/smol/versions/3"' in model

    lineage = await page(viewer, "/registry/console/models/smol/versions/2")
    text = flat(lineage)
    assert "smol from test" in text and "support:v1 (2 rows, uploaded)" in text and "job-1" in text
    assert "rank=4" in text and "final_loss=0.5" in text
    assert "gate policy default@v1" in text and "gate policy strict@v2" in text and "beats baseline" in text
    assert "exact_match 0.61 0.7 -0.09 [-0.2, 0.01] 40" in text
    assert "bob (approver) production" in text and "alice" in text  # the approval, used by alice's promotion
    assert "adapter.stage.staging" in text and "adapter.stage.production" in text
    assert "v1 production 90.0%" in text
    assert 'name="to_stage"' not in lineage and 'name="csrf_token"' in lineage  # only the sign-out form

    prompts = flat(await page(viewer, "/registry/console/prompts"))
    assert PROMPT in prompts and "staging → v1" in prompts and "v3," in prompts

    prompt = await page(viewer, f"/registry/console/prompts/{PROMPT}")
    assert "Line two" in prompt and "Line 2 changed" in prompt and "Hello {{ customer }}" in prompt
    assert 'name="label"' not in prompt
    # By default the latest version against the one before.
    assert f'<span class="hunk">--- {PROMPT}:v2</span>' in prompt
    assert f'<span class="added">+{ESCAPED} &amp; more</span>' in prompt
    assert '<span class="removed">' not in prompt

    chosen = await page(viewer, f"/registry/console/prompts/{PROMPT}?from=1&to=3")
    assert (
        f'<span class="hunk">--- {PROMPT}:v1</span>' in chosen
        and f'<span class="hunk">+++ {PROMPT}:v3</span>' in chosen
    )
    assert '<span class="removed">-Line two</span>' in chosen and '<span class="added">+Line 2 changed</span>' in chosen
    assert '<span class="context"> Regards</span>' in chosen

    rubrics = flat(await page(viewer, "/registry/console/rubrics"))
    assert f"{RUBRIC} v2," in rubrics and "by bob correct (thumbs), tone (label)" in rubrics
    rubric = flat(await page(viewer, f"/registry/console/rubrics/{RUBRIC}"))
    assert rubric.index(" v2 ") < rubric.index(" v1 ")  # newest first
    assert "correct thumbs, up or down Is the answer right?" in rubric and "Judge the answer." in rubric
    assert f"tone one of warm, {ESCAPED} How it sounds" in rubric

    datasets = flat(await page(viewer, "/registry/console/datasets"))
    assert "v1 train chat 2 uploaded" in datasets and "v2 train instruction 25 feedback" in datasets

    chat = await page(viewer, "/registry/console/datasets/support/versions/1")
    assert "user How do I reset my password?" in flat(chat)
    assert "assistant Use Settings &gt; Security &gt; Reset." in flat(chat)
    for version in (1, 2):  # the adapters trained on it
        assert f'href="/registry/console/models/smol/versions/{version}">smol:v{version}</a>' in chat

    preview = flat(await page(viewer, "/registry/console/datasets/support/versions/2"))
    assert "question 20" in preview and "question 21" not in preview  # twenty records
    assert "x" * 300 + "… (1000 characters)" in preview and "x" * 301 not in preview

    # A bearer header reads the same pages (no session, so no forms).
    bearer = httpx.AsyncClient(
        transport=httpx.ASGITransport(site.app),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {site.operator_key}"},
    )
    async with bearer:
        assert 'name="to_stage"' not in await page(bearer, "/registry/console/models/smol/versions/3")
    # Without a session the browser is sent to sign in, and back here afterwards.
    async with client_of(site) as stranger:
        answer = await stranger.get("/registry/console/models/smol")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/login?next=%2Fregistry%2Fconsole%2Fmodels%2Fsmol"


async def test_hostile_text_is_shown_as_text(clients: tuple) -> None:
    viewer, _ = clients
    for path, where in [
        (f"/registry/console/prompts/{PROMPT}", "a prompt template"),
        (f"/registry/console/rubrics/{RUBRIC}", "a rubric's instructions and labels"),
        ("/registry/console/datasets/support/versions/2", "a dataset record"),
        ("/registry/console/models/smol/versions/2", "an evaluation's reason and a stage change's reason"),
        ("/registry/console/models/smol/versions/3", "a training metric's name"),
    ]:
        html = await page(viewer, path)  # which asserts no <script appears
        assert ESCAPED in html, where


async def test_unknown_or_impossible_ids_are_404_pages(clients: tuple) -> None:
    viewer, _ = clients
    for path in [
        "/registry/console/models/nope",
        "/registry/console/models/%3Cscript%3Ealert(1)%3C%5Cscript%3E",
        "/registry/console/models/%22quoted%22",
        "/registry/console/models/smol/versions/4",
        "/registry/console/models/smol/versions/0",
        "/registry/console/models/smol/versions/abc",
        f"/registry/console/models/smol/versions/{2**63}",
        "/registry/console/models/nope/versions/1",
        "/registry/console/prompts/nope",
        "/registry/console/prompts/%3Cscript%3E",
        "/registry/console/rubrics/nope",
        "/registry/console/rubrics/%3Cscript%3E",
        f"/registry/console/prompts/{PROMPT}?from=9",
        f"/registry/console/prompts/{PROMPT}?to=-1",
        "/registry/console/datasets/support/versions/3",
        "/registry/console/datasets/%3Cscript%3E/versions/1",
    ]:
        html = await page(viewer, path, status=404)
        assert "<h1>Refused</h1>" in html and "Traceback" not in html, path
        assert "signed in as vic-viewer" in html, path


async def test_a_label_moves_only_for_an_operator_with_the_session_token(site: Site, clients: tuple) -> None:
    viewer, operator = clients
    action = f"/registry/console/prompts/{PROMPT}/labels"
    move = {"label": "staging", "version": "3"}
    viewer_token = csrf_of(await page(viewer, f"/registry/console/prompts/{PROMPT}"))
    operator_page = await page(operator, f"/registry/console/prompts/{PROMPT}")
    assert f'action="{action}"' in operator_page
    operator_token = csrf_of(operator_page)

    refused = [
        (viewer, move | {"csrf_token": viewer_token}, "vic-viewer has role viewer; this needs operator"),
        (operator, move, "CSRF check"),
        (operator, move | {"csrf_token": viewer_token}, "CSRF check"),
        (operator, move | {"csrf_token": "x" * 43}, "CSRF check"),
    ]
    for client, form, why in refused:
        answer = await client.post(action, data=form)
        assert answer.status_code == 403 and why in answer.text, answer.text
    assert site.registry.prompts.get_prompt(PROMPT, label="staging").version == 1
    assert all(
        entry.action != "prompt.label" or entry.actor == "alice" for entry in audit(site.registry, f"{PROMPT}@staging")
    )

    answer = await operator.post(action, data=move | {"csrf_token": operator_token, "traffic_percent": "20"})
    assert answer.status_code == 303 and answer.headers["location"] == f"/registry/console/prompts/{PROMPT}"
    moved = site.registry.prompts.get_prompt(PROMPT, label="staging")
    assert moved.version == 3 and moved.label_traffic == {"staging": 20.0}
    last = audit(site.registry, f"{PROMPT}@staging")[-1]
    assert (last.actor, last.outcome, last.after["version"]) == ("olga-operator", "ok", 3)
    assert "staging v3 20.0%" in flat(await page(operator, f"/registry/console/prompts/{PROMPT}"))

    # The domain's own refusal: production needs an approval by another principal.
    answer = await operator.post(action, data={"label": "production", "version": "3", "csrf_token": operator_token})
    assert answer.status_code == 403 and "needs an approval by another principal" in answer.text
    with pytest.raises(NotFound, match="has no label 'production'"):
        site.registry.prompts.get_prompt(PROMPT, label="production")
    # A form the door's types refuse changes nothing either.
    for form in ({"label": "bad label", "version": "3"}, {"label": "staging", "version": "0"}):
        answer = await operator.post(action, data=form | {"csrf_token": operator_token})
        assert answer.status_code == 422 and "nothing was changed" in answer.text
    assert site.registry.prompts.get_prompt(PROMPT, label="staging").version == 3


async def test_the_stage_form_moves_a_version_or_shows_the_domains_refusal(site: Site, clients: tuple) -> None:
    viewer, operator = clients
    action = "/registry/console/models/smol/versions/3/stage"
    operator_page = await page(operator, "/registry/console/models/smol/versions/3")
    assert f'action="{action}"' in operator_page
    token = csrf_of(operator_page)

    answer = await viewer.post(
        action, data={"to_stage": "staging", "csrf_token": csrf_of(await page(viewer, "/registry/console/models"))}
    )
    assert answer.status_code == 403
    answer = await operator.post(action, data={"to_stage": "staging"})
    assert answer.status_code == 403
    assert site.registry.adapters.get_adapter("smol", 3).stage == Stage.none

    answer = await operator.post(action, data={"to_stage": "staging", "reason": "try it", "csrf_token": token})
    assert answer.status_code == 303 and answer.headers["location"] == "/registry/console/models/smol/versions/3"
    assert site.registry.adapters.get_adapter("smol", 3).stage == Stage.staging
    last = audit(site.registry, "smol:v3")[-1]
    assert (last.actor, last.action, last.detail) == ("olga-operator", "adapter.stage.staging", "try it")
    assert "olga-operator adapter.stage.staging ok" in flat(
        await page(operator, "/registry/console/models/smol/versions/3")
    )

    # Production needs a passing evaluation: the domain refuses, the page says why, nothing moves.
    answer = await operator.post(action, data={"to_stage": "production", "replaces": "1", "csrf_token": token})
    assert answer.status_code == 409 and "smol:v3 has no passing evaluation" in answer.text
    assert site.registry.adapters.get_adapter("smol", 3).stage == Stage.staging
    last = audit(site.registry, "smol:v3")[-1]
    assert (last.actor, last.outcome) == ("olga-operator", "refused")

    answer = await operator.post(action, data={"to_stage": "sideways", "csrf_token": token})
    assert answer.status_code == 422 and "to_stage" in answer.text
    answer = await operator.post(
        "/registry/console/models/smol/versions/9/stage", data={"to_stage": "staging", "csrf_token": token}
    )
    assert answer.status_code == 404 and "no adapter version smol:v9" in answer.text
    assert site.registry.adapters.get_adapter("smol", 3).stage == Stage.staging
