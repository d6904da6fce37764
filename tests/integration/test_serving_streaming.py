"""Token-by-token streaming through the whole path: the real SmolLM2 on a real Triton, the gateway on
uvicorn, the unchanged `openai` client, and inference.logged on the real Kafka."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta
import uuid
from functools import partial
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from contracts.events import (
    GuardAction,
    GuardPolicyActivated,
    GuardPolicySpec,
    InferenceLogged,
    PromptPublished,
    ServedRoute,
    SpanLogged,
)
from contracts.http import PromptReference
from services.registry.app import create_app as create_registry
from services.registry.service import Registry
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore
from services.runtime.artifacts import ArtifactStore
from services.runtime.auth import ApiKey, Authenticator, KeyStore, Role, create_database_engine, registry_database_url
from services.runtime.http import create_http_app
from services.runtime.inference import Engine, GenerationRequest, SamplingParams
from services.runtime.scoring.injection import rule_hits
from services.runtime.scoring.injection_set import BENIGN as BENIGN_KIND
from services.runtime.scoring.injection_set import load_injection_set
from services.runtime.service import Runtime, build_process
from services.runtime.settings import FlywheelSettings
from services.serving.api import create_router
from services.serving.gateway import DISCONNECTED, Gateway
from services.serving.guard_policies import GuardPolicies
from services.serving.handlers import HANDLERS, AdapterLoader, Deps
from services.serving.inference_log import InferenceLogBuffer
from services.serving.limits import RateLimiter
from services.serving.prompt_routes import PromptRoutes
from services.serving.routes import Routes
from services.serving.settings import ServingSettings
from services.serving.triton import TritonServing
from tests.fixtures.trainer_model import base_model_dir  # noqa: F401 - fixture
from tests.integration.test_event_bus import read_all
from tests.integration.test_serving_gateway import uvicorn_server
from tests.support import eventually

pytestmark = pytest.mark.integration

MODEL = "smollm2"


@pytest.fixture(scope="module")
def engine(base_model_dir: Path) -> Engine:  # noqa: F811 - the fixture imported above
    return Engine.from_pretrained(base_model_dir, model_name=MODEL)


@pytest.fixture(scope="module")
def triton(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServing]:
    serving = TritonServing(engine, workdir=tmp_path_factory.mktemp("triton"), max_batch_size=8)
    try:
        serving.start()
        yield serving
    finally:
        serving.stop()


@pytest.fixture
async def served(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> AsyncIterator[tuple[str, str, Runtime]]:
    """The gateway on uvicorn: its base URL, an app key, and the runtime whose bus it logs to."""
    async with serve_gateway(engine, triton, settings, tmp_path, ServingSettings(max_tokens_limit=256)) as running:
        yield running


@contextlib.asynccontextmanager
async def serve_gateway(
    engine: Engine,
    triton: TritonServing,
    settings: FlywheelSettings,
    tmp_path: Path,
    serving: ServingSettings,
    guard_policies: GuardPolicies | None = None,
    prompts: PromptRoutes | None = None,
) -> AsyncIterator[tuple[str, str, Runtime]]:
    """A gateway with `serving`'s settings on uvicorn: its base URL, an app key, and the runtime whose bus it
    logs to. Given `guard_policies`, it keeps them (and `prompts`) current from the registry's
    guard_policy.activated and prompt.published events on Kafka through serving's own handlers, as the
    serving process does."""
    assert triton.ports is not None
    runtime = Runtime(settings, client_id="serving-stream-test")
    table = Routes()
    table.add_model(MODEL)
    prompts = prompts or PromptRoutes()
    if guard_policies is not None:
        loader = AdapterLoader(table, runtime.artifacts, tmp_path / "adapters", lambda: engine)
        deps = Deps(
            routes=table,
            prompts=prompts,
            loader=loader,
            bus=runtime.bus("serving"),
            guard_policies=guard_policies,
        )
        followed = {event: HANDLERS[event] for event in (GuardPolicyActivated, PromptPublished)}
        runtime.follow_all("serving", followed, deps, from_start=True)
    await runtime.broker.start()
    database = create_database_engine(f"sqlite:///{tmp_path / f'registry-{uuid.uuid4().hex[:8]}.db'}")
    ApiKey.metadata.create_all(database, tables=[ApiKey.__table__])  # type: ignore[attr-defined]
    keys = KeyStore(database)
    key = keys.create(principal="app-1", role=Role.app, created_by="test")[0]
    buffer = InferenceLogBuffer(runtime.bus("serving"), capacity=100)
    await buffer.start()
    gateway = Gateway(
        routes=table,
        tokenizer=engine.tokenizer,
        triton_grpc_url=triton.ports.grpc_url,
        settings=serving,
        log_buffer=buffer,
        loaded_adapters=lambda: set(engine.adapters),
        prompts=prompts,
        guard_policies=guard_policies,
    )
    router = create_router(
        lambda: gateway, guard=Authenticator(keys).require(Role.app), limiter=RateLimiter(rate_per_s=1000, burst=1000)
    )
    try:
        async with uvicorn_server(create_http_app("serving-stream-test", routers=[router])) as base_url:
            yield base_url, key, runtime
    finally:
        await gateway.close()
        await buffer.stop()
        await runtime.broker.stop()
        runtime.close()


async def logged(runtime: Runtime, settings: FlywheelSettings, expected: int) -> dict[str, dict]:
    records = await read_all(
        settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(InferenceLogged), expected=expected
    )
    return {payload["inference_id"]: payload for payload in (json.loads(record.value)["payload"] for record in records)}


async def test_the_openai_client_receives_tokens_as_they_are_decoded(
    served, triton: TritonServing, settings: FlywheelSettings
) -> None:
    base_url, key, runtime = served
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        whole = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        # `no-cache`: decoded afresh, not the response cache's one-piece replay of the answer above.
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_headers={"Cache-Control": "no-cache"},
        )
        chunks, steps_at_chunk = [], []
        async for chunk in stream:
            chunks.append(chunk)
            steps_at_chunk.append(triton.batcher.steps)
        steps_at_end = triton.batcher.steps

    expected = whole.choices[0].message.content
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]
    assert len(pieces) > 1, f"the answer came in {len(pieces)} piece(s)"
    assert "".join(pieces) == expected and whole.usage.completion_tokens > 1
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    first = next(index for index, chunk in enumerate(chunks) if chunk.choices[0].delta.content)
    # Decode steps ran after the first piece reached the client: it was sent while the answer was still being generated.
    assert steps_at_chunk[first] < steps_at_end, (steps_at_chunk, steps_at_end)
    assert len({chunk.id for chunk in chunks}) == 1

    events = await logged(runtime, settings, expected=2)
    event = events[chunks[0].id]
    assert (event["status"], event["output_text"], event["completion_tokens"]) == (
        "ok",
        expected,
        whole.usage.completion_tokens,
    )
    assert event["finish_reason"] == whole.choices[0].finish_reason and event["latency_total_ms"] > 0


async def test_each_logged_answer_carries_how_sure_the_model_was_of_its_tokens(
    served, engine: Engine, settings: FlywheelSettings
) -> None:
    """The mean and lowest token log-probability on inference.logged are the model's own: a forward pass
    over the prompt and the answer's tokens, apart from the engine's decode loop, gives the same values."""
    base_url, key, runtime = served
    questions = ["What is the capital of France?", "Invent a word and define it."]
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        whole = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": questions[0]}], max_tokens=12, temperature=0
        )
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": questions[1]}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        [streamed_id] = {chunk.id async for chunk in stream}

    events = await logged(runtime, settings, expected=2)
    for inference_id in (whole.id, streamed_id):
        event = events[inference_id]
        prompt_ids = engine.encode(event["input_text"])
        [greedy] = engine.generate(
            [GenerationRequest(prompt_ids, params=SamplingParams(max_tokens=12, temperature=0.0))]
        )
        assert greedy.text == event["output_text"] and greedy.token_ids, (greedy.text, event["output_text"])
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids + greedy.token_ids])
            logits = engine.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
            expected = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt_ids) :, None]).squeeze(1)
        assert event["mean_token_logprob"] == pytest.approx(expected.mean().item(), abs=1e-3), inference_id
        assert event["min_token_logprob"] == pytest.approx(expected.min().item(), abs=1e-3), inference_id
        assert event["min_token_logprob"] < event["mean_token_logprob"] < 0


async def test_a_client_leaving_mid_stream_frees_its_slot_and_is_logged(
    served, triton: TritonServing, settings: FlywheelSettings
) -> None:
    base_url, key, runtime = served
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 500, separated by commas."}],
        "max_tokens": 256,
        "temperature": 0,
        "stream": True,
    }
    cancelled_before, steps_before = triton.batcher.cancelled, triton.batcher.steps
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        async with http.stream("POST", "/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            first = json.loads(
                (await anext(line async for line in lines if line.startswith("data: "))).removeprefix("data: ")
            )
        # Leaving the block closed the connection with the answer far from done.

    await eventually(
        lambda: triton.batcher.cancelled == cancelled_before + 1,
        timeout_s=60,
        what="the abandoned request to be cancelled",
    )
    await eventually(lambda: triton.batcher.decoding == 0, timeout_s=30, what="the batch to empty")
    assert triton.batcher.steps - steps_before < 256, "the abandoned request decoded to max_tokens"
    event = (await logged(runtime, settings, expected=1))[first["id"]]
    assert (event["status"], event["error"]) == ("error", DISCONNECTED)
    assert event["output_text"].startswith(first["choices"][0]["delta"]["content"])


# Greedy SmolLM2 continues a repeated line by repeating it: the answer would contain the planted card.
CARD = "4111 1111 1111 1111"
PLANTED = f"Card: {CARD}\nCard: {CARD}\nCard:"
RUDE = "Reply: go to hell\nReply: go to hell\nReply:"
BENIGN = "Delivery: 3 working days\nDelivery: 3 working days\nDelivery:"


async def test_the_output_guard_redacts_or_blocks_a_planted_card_streamed_or_not(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    ask = {"model": MODEL, "max_tokens": 24, "temperature": 0, "extra_headers": {"Cache-Control": "no-store"}}
    guarded = ServingSettings(
        max_tokens_limit=256, guard_output_personal=GuardAction.redact, guard_output_secrets=GuardAction.redact
    )
    blocking = ServingSettings(max_tokens_limit=256, guard_output_personal=GuardAction.block)
    async with serve_gateway(engine, triton, settings, tmp_path, ServingSettings()) as (base_url, key, _):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            unguarded = (await client.completions.create(prompt=PLANTED, **ask)).choices[0].text
    assert CARD in unguarded, f"the model did not repeat the card, so this test shows nothing: {unguarded!r}"

    async with serve_gateway(engine, triton, settings, tmp_path, guarded) as (base_url, key, runtime):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            redacted = await client.completions.create(prompt=PLANTED, **ask)
            stream = await client.completions.create(prompt=PLANTED, stream=True, **ask)
            pieces = [chunk.choices[0].text async for chunk in stream]
            benign = await client.completions.create(prompt=BENIGN, **ask)
    assert redacted.choices[0].text == unguarded.replace(CARD, "[CARD]")
    assert "".join(pieces) == redacted.choices[0].text, "streamed pieces add up to the guarded whole"
    assert all("4111" not in piece for piece in pieces)
    assert benign.choices[0].text.startswith(" 3 working days")
    guard_spans = await guardrail_spans(runtime, settings)
    outcomes = Counter(span.attributes["flywheel.guard.outcome"] for span in guard_spans.values())
    assert outcomes == {"redacted": 2, "passed": 1}, "the whole answer and the stream redacted, the benign one passed"
    assert guard_spans[redacted.id].attributes["flywheel.guard.found"] == "CARD"
    assert guard_spans[benign.id].attributes["flywheel.guard.outcome"] == "passed"
    assert {span.kind.value for span in guard_spans.values()} == {"guardrail"}
    events = await logged(runtime, settings, expected=4)
    assert (events[redacted.id]["guard_output_outcome"], events[redacted.id]["guard_output_found"]) == (
        "redacted",
        ["CARD"],
    )
    assert (events[benign.id]["guard_output_outcome"], events[benign.id]["guard_output_found"]) == ("passed", [])
    assert sorted(str(event["guard_output_outcome"]) for event in events.values()) == [
        "None",
        "passed",
        "redacted",
        "redacted",
    ]

    async with serve_gateway(engine, triton, settings, tmp_path, blocking) as (base_url, key, runtime):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.completions.create(prompt=PLANTED, **ask)
            stream = await client.completions.create(prompt=PLANTED, stream=True, **ask)
            received: list[str] = []
            with pytest.raises(openai.APIError, match="output guard"):
                async for chunk in stream:
                    received.append(chunk.choices[0].text)
    assert refused.value.code == "output_blocked" and "CARD" in refused.value.message
    assert not any("4111" in piece for piece in received), "no piece of a blocked value may leave"
    # The topics are this test's: every call before was ok, the two blocked ones are errors.
    errors = [event for event in (await logged(runtime, settings, expected=6)).values() if event["status"] == "error"]
    assert len(errors) == 2
    assert all("output guard" in event["error"] and "4111" not in event["output_text"] for event in errors)
    assert [(event["guard_output_outcome"], event["guard_output_found"]) for event in errors] == [
        ("blocked", ["CARD"])
    ] * 2
    spans = (await guardrail_spans(runtime, settings)).values()
    blocked = [span for span in spans if span.attributes["flywheel.guard.outcome"] == "blocked"]
    assert len(blocked) == 2 and all(span.status.value == "error" for span in blocked)


async def guardrail_spans(runtime: Runtime, settings: FlywheelSettings, check: str = "output") -> dict[str, SpanLogged]:
    """The `check` guard's spans on the span topic, by inference id."""
    records = await read_all(
        settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(SpanLogged), expected=10**6, timeout_s=5
    )
    spans = [SpanLogged.model_validate(json.loads(record.value)["payload"]) for record in records]
    return {span.inference_id: span for span in spans if span.name == f"guard {check}" and span.inference_id}


async def test_the_input_guard_keeps_personal_data_from_the_model_and_refuses_a_secret(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    email = "jane.doe@example.com"
    repeated = f"Email: {email}\nEmail: {email}\nEmail:"
    ask = {"model": MODEL, "max_tokens": 16, "temperature": 0, "extra_headers": {"Cache-Control": "no-store"}}
    guarded = ServingSettings(guard_input_personal=GuardAction.redact, guard_input_secrets=GuardAction.block)
    async with serve_gateway(engine, triton, settings, tmp_path, guarded) as (base_url, key, runtime):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            answer = await client.completions.create(prompt=repeated, **ask)
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    messages=[{"role": "user", "content": "my key is sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34, keep it"}],
                    **ask,
                )
    # The model continued what it was given: the redacted input, so it could not repeat the address.
    text = answer.choices[0].text
    assert "[EMAIL]" in text and email not in text, text
    assert (refused.value.code, refused.value.param) == ("input_blocked", "messages")
    assert "OPENAI_KEY" in refused.value.message and "sk-proj" not in refused.value.message
    events = list((await logged(runtime, settings, expected=2)).values())
    by_status = {event["status"]: event for event in events}
    assert (by_status["ok"]["guard_input_outcome"], by_status["ok"]["guard_input_found"]) == ("redacted", ["EMAIL"])
    assert by_status["ok"]["guard_output_outcome"] is None
    assert (by_status["error"]["guard_input_outcome"], by_status["error"]["guard_input_found"]) == (
        "blocked",
        ["OPENAI_KEY"],
    )
    spans = await guardrail_spans(runtime, settings, check="input")
    assert {span.attributes["flywheel.guard.outcome"] for span in spans.values()} == {"redacted", "blocked"}


async def test_the_input_guard_blocks_injections_from_the_labelled_set_and_passes_a_benign_request(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    labelled = load_injection_set(settings.cache)
    # One attack the phrase rules name, and one only the classifier catches (a role-play jailbreak).
    by_rule = next(p.text for p in labelled if p.attack and rule_hits(p.text) and len(p.text) < 400)
    by_classifier = next(p.text for p in labelled if p.attack and not rule_hits(p.text) and len(p.text) < 1500)
    benign = next(p.text for p in labelled if p.kind == BENIGN_KIND and p.text.endswith("?"))
    ask = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    guarded = ServingSettings(guard_input_injection=GuardAction.block)
    async with serve_gateway(engine, triton, settings, tmp_path, guarded) as (base_url, key, runtime):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            refusals = []
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(messages=[{"role": "user", "content": by_rule}], **ask)
            refusals.append(refused.value)
            with pytest.raises(openai.BadRequestError) as refused:
                stream = await client.chat.completions.create(
                    messages=[{"role": "user", "content": by_classifier}], stream=True, **ask
                )
                async for _ in stream:
                    pass
            refusals.append(refused.value)
            answers = [
                await client.chat.completions.with_raw_response.create(
                    messages=[{"role": "user", "content": benign}], **ask
                )
                for _ in range(2)
            ]
    for refusal in refusals:
        assert (refusal.code, refusal.param) == ("input_blocked", "messages")
        assert "PROMPT_INJECTION" in refusal.message
    assert [answer.headers["x-flywheel-cache"] for answer in answers] == ["miss", "hit"]
    assert answers[0].parse().choices[0].message.content
    events = list((await logged(runtime, settings, expected=4)).values())
    outcomes = sorted(
        (event["status"], event["guard_input_outcome"], tuple(event["guard_input_found"])) for event in events
    )
    assert outcomes == [
        ("error", "blocked", ("PROMPT_INJECTION",)),
        ("error", "blocked", ("PROMPT_INJECTION",)),
        ("ok", "passed", ()),
        ("ok", "passed", ()),  # the cache hit carries the verdict its input had when it was generated
    ]
    spans = await guardrail_spans(runtime, settings, check="input")
    assert len(spans) == 4
    probabilities = sorted(float(span.attributes["flywheel.guard.injection_p"]) for span in spans.values())
    assert probabilities[0] < 0.5 <= probabilities[-1], probabilities


async def test_a_registry_guard_policy_guards_the_live_gateway_and_each_decision_names_its_version(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    """Published in the registry, relayed by its outbox to Kafka, applied by serving's handler: v1 redacts
    a card and an insult in the answer and blocks a secret in the request, v2 blocks the card, a rollback to
    v1 redacts again, and v3 blocks an injection from the labelled set and passes a benign request. Every
    call's inference.logged names the policy version that decided."""
    ask = {"model": MODEL, "max_tokens": 24, "temperature": 0, "extra_headers": {"Cache-Control": "no-store"}}
    secret = [{"role": "user", "content": "my key is sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34, keep it"}]
    registry_app, _ = build_process(
        settings, [partial(create_registry, settings=RegistrySettings(outbox_interval_s=0.2))], title="registry"
    )
    store = RegistryStore(registry_database_url(settings))
    registry = Registry(store, ArtifactStore(Path(settings.home) / "artifacts"))
    policies = GuardPolicies()
    redacting = GuardPolicySpec(
        output_personal=GuardAction.redact, output_unsafe=GuardAction.redact, input_secrets=GuardAction.block
    )
    screening = GuardPolicySpec(input_injection=GuardAction.block)
    attack = next(p.text for p in load_injection_set(settings.cache) if p.attack and len(p.text) < 400)
    blocking = GuardPolicySpec(output_personal=GuardAction.block, input_secrets=GuardAction.block)

    async def active(version: int) -> None:
        await eventually(
            lambda: (event := policies.active_for(MODEL)) is not None and event.version == version,
            30,
            f"serving to apply support-guard v{version}",
        )

    try:
        async with (
            registry_app.router.lifespan_context(registry_app),
            serve_gateway(engine, triton, settings, tmp_path, ServingSettings(max_tokens_limit=256), policies) as (
                base_url,
                key,
                runtime,
            ),
            openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client,
        ):
            unguarded = await client.completions.create(prompt=PLANTED, **ask)
            rude = await client.completions.create(prompt=RUDE, **ask)

            registry.guard_policies.publish_policy("alice", name="support-guard", model_name=MODEL, spec=redacting)
            await active(1)
            redacted = await client.completions.create(prompt=PLANTED, **ask)
            rude_redacted = await client.completions.create(prompt=RUDE, **ask)
            stream = await client.completions.create(prompt=PLANTED, stream=True, **ask)
            pieces = [chunk.choices[0].text async for chunk in stream]
            with pytest.raises(openai.BadRequestError) as input_refused:
                await client.chat.completions.create(messages=secret, **ask)

            registry.guard_policies.publish_policy("alice", name="support-guard", model_name=MODEL, spec=blocking)
            await active(2)
            with pytest.raises(openai.BadRequestError) as output_refused:
                await client.completions.create(prompt=PLANTED, **ask)
            blocked_stream = await client.completions.create(prompt=PLANTED, stream=True, **ask)
            received: list[str] = []
            with pytest.raises(openai.APIError, match="support-guard:v2"):
                async for chunk in blocked_stream:
                    received.append(chunk.choices[0].text)

            registry.guard_policies.activate_policy("bob", name="support-guard", version=1)
            await active(1)
            rolled_back = await client.completions.create(prompt=PLANTED, **ask)

            registry.guard_policies.publish_policy("alice", name="support-guard", model_name=MODEL, spec=screening)
            await active(3)
            with pytest.raises(openai.BadRequestError) as injection_refused:
                await client.chat.completions.create(messages=[{"role": "user", "content": attack}], **ask)
            benign = await client.chat.completions.create(
                messages=[{"role": "user", "content": "How long does delivery take?"}], **ask
            )
    finally:
        store.close()

    assert CARD in unguarded.choices[0].text, "the model did not repeat the card, so this test shows nothing"
    assert "go to hell" in rude.choices[0].text, "the model did not repeat the insult, so this test shows nothing"
    assert rude_redacted.choices[0].text == rude.choices[0].text.replace("go to hell", "[UNSAFE_HARASSMENT]")
    assert redacted.choices[0].text == unguarded.choices[0].text.replace(CARD, "[CARD]")
    assert "".join(pieces) == redacted.choices[0].text and not any("4111" in piece for piece in pieces)
    assert rolled_back.choices[0].text == redacted.choices[0].text
    assert input_refused.value.code == "input_blocked"
    assert "support-guard:v1" in input_refused.value.message and "sk-proj" not in input_refused.value.message
    assert injection_refused.value.code == "input_blocked"
    assert "guard policy support-guard:v3: it contained PROMPT_INJECTION" in injection_refused.value.message
    assert benign.choices[0].message.content
    assert output_refused.value.code == "output_blocked"
    assert "guard policy support-guard:v2" in output_refused.value.message and "CARD" in output_refused.value.message
    assert not any("4111" in piece for piece in received)

    events = await logged(runtime, settings, expected=11)
    decided = Counter(
        (event["guard_policy"], event["status"], event["guard_output_outcome"]) for event in events.values()
    )
    assert decided == {
        (None, "ok", None): 2,  # no policy, no guard settings: nothing checked, nothing named
        ("support-guard:v1", "ok", "redacted"): 4,  # card and insult, streamed, and after the rollback
        ("support-guard:v1", "error", None): 1,  # the secret in the request: refused before the model
        ("support-guard:v2", "error", "blocked"): 2,  # whole and streamed
        ("support-guard:v3", "error", None): 1,  # the injection from the labelled set
        ("support-guard:v3", "ok", None): 1,  # a benign request passes the screen (v3 checks no answer)
    }, decided
    assert events[benign.id]["guard_input_outcome"] == "passed"
    assert events[unguarded.id]["guard_policy"] is None
    assert events[rolled_back.id]["guard_policy"] == "support-guard:v1"
    spans = await guardrail_spans(runtime, settings)
    assert spans[rolled_back.id].attributes["flywheel.guard.policy"] == "support-guard:v1"


async def test_a_policy_attached_to_a_prompt_or_a_route_decides_before_the_models_own(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    """Three policies of one model, each published in the registry and relayed through Kafka: the whole
    model's redacts a secret in the request, the direct route's blocks it, the prompt greet's only flags it.
    A call gets the most specific policy that is attached where it goes (prompt, then route, then model),
    and its inference.logged names that policy."""
    ask = {"model": MODEL, "max_tokens": 4, "temperature": 0, "extra_headers": {"Cache-Control": "no-store"}}
    secret = [{"role": "user", "content": "my key is sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34, keep it"}]
    with_prompt = {**ask, "extra_body": {"prompt_ref": {"name": "greet"}}}
    registry_app, _ = build_process(
        settings, [partial(create_registry, settings=RegistrySettings(outbox_interval_s=0.2))], title="registry"
    )
    store = RegistryStore(registry_database_url(settings))
    registry = Registry(store, ArtifactStore(Path(settings.home) / "artifacts"))
    policies, prompts = GuardPolicies(), PromptRoutes()

    async def applied(route: str | None, prompt: str | None, name: str) -> None:
        def serving_has_it() -> bool:
            event = policies.active_for(MODEL, route, prompt)
            return event is not None and event.policy_name == name

        await eventually(serving_has_it, 30, f"serving to apply {name}")

    def greet_known() -> bool:
        try:
            prompts.resolve(PromptReference(name="greet"))
        except LookupError:
            return False
        return True

    try:
        async with (
            registry_app.router.lifespan_context(registry_app),
            serve_gateway(
                engine, triton, settings, tmp_path, ServingSettings(max_tokens_limit=256), policies, prompts
            ) as (base_url, key, runtime),
            openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client,
        ):
            registry.guard_policies.publish_policy(
                "alice", name="model-guard", model_name=MODEL, spec=GuardPolicySpec(input_secrets=GuardAction.redact)
            )
            await applied(None, None, "model-guard")
            redacted = await client.chat.completions.create(messages=secret, **ask)

            registry.guard_policies.publish_policy(
                "alice",
                name="direct-guard",
                model_name=MODEL,
                route=ServedRoute.direct,
                spec=GuardPolicySpec(input_secrets=GuardAction.block),
            )
            await applied("direct", None, "direct-guard")
            with pytest.raises(openai.BadRequestError) as route_refused:
                await client.chat.completions.create(messages=secret, **ask)

            registry.prompts.publish_prompt("alice", name="greet", template="You are a polite assistant.")
            registry.guard_policies.publish_policy(
                "alice",
                name="greet-guard",
                model_name=MODEL,
                prompt_name="greet",
                spec=GuardPolicySpec(input_secrets=GuardAction.flag),
            )
            await applied("direct", "greet", "greet-guard")
            await eventually(greet_known, 30, "serving to know the prompt greet")
            flagged = await client.chat.completions.create(messages=secret, **with_prompt)
            with pytest.raises(openai.BadRequestError) as still_refused:
                await client.chat.completions.create(messages=secret, **ask)
    finally:
        store.close()

    assert route_refused.value.code == still_refused.value.code == "input_blocked"
    assert "direct-guard:v1" in route_refused.value.message and "sk-proj" not in route_refused.value.message
    assert "direct-guard:v1" in still_refused.value.message
    events = await logged(runtime, settings, expected=4)
    decided = [
        (event["guard_policy"], event["prompt_name"], event["status"], event["guard_input_outcome"])
        for event in sorted(events.values(), key=lambda event: event["started_at"])
    ]
    assert decided == [
        ("model-guard:v1", None, "ok", "redacted"),
        ("direct-guard:v1", None, "error", "blocked"),
        ("greet-guard:v1", "greet", "ok", "flagged"),
        ("direct-guard:v1", None, "error", "blocked"),
    ], decided
    assert (events[redacted.id]["guard_policy"], events[flagged.id]["guard_policy"]) == (
        "model-guard:v1",
        "greet-guard:v1",
    )


ORDER_SCHEMA = {
    "type": "object",
    "properties": {"order": {"type": "integer"}, "status": {"enum": ["open", "shipped"]}},
    "required": ["order", "status"],
}
# Greedy SmolLM2 copies the object when asked to; asked a question, it answers in prose.
COPY_JSON = 'Copy this JSON exactly and nothing else: {"order": 7, "status": "open"}'
IN_PROSE = "What is the status of order 7?"


async def test_a_structured_answer_is_checked_against_its_schema_and_a_stream_is_held_until_it_is_whole(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    structured = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA}}
    ask = {"model": MODEL, "max_tokens": 40, "temperature": 0, "response_format": structured}
    checking = ServingSettings(max_tokens_limit=256, guard_output_json_schema=GuardAction.block)

    def chat(content: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": content}]

    async with serve_gateway(engine, triton, settings, tmp_path, checking) as (base_url, key, runtime):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            valid = await client.chat.completions.create(messages=chat(COPY_JSON), **ask)
            stream = await client.chat.completions.create(
                messages=chat(COPY_JSON), stream=True, extra_headers={"Cache-Control": "no-cache"}, **ask
            )
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
            with pytest.raises(openai.BadRequestError) as prose:
                await client.chat.completions.create(messages=chat(IN_PROSE), **ask)
            prose_stream = await client.chat.completions.create(messages=chat(IN_PROSE), stream=True, **ask)
            received: list[str] = []
            with pytest.raises(openai.APIError, match="INVALID_JSON"):
                async for chunk in prose_stream:
                    received.append(chunk.choices[0].delta.content or "")
            hostile = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"pattern": "^(a+)+$"}}}
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(messages=chat(COPY_JSON), **{**ask, "response_format": hostile})
            plain = await client.chat.completions.create(
                messages=chat(IN_PROSE), **{key: value for key, value in ask.items() if key != "response_format"}
            )

    assert json.loads(valid.choices[0].message.content) == {"order": 7, "status": "open"}
    assert "".join(pieces) == valid.choices[0].message.content
    assert [piece for piece in pieces if piece] == [valid.choices[0].message.content], "held, then sent whole"
    assert prose.value.code == "output_blocked" and "INVALID_JSON (" in prose.value.message
    assert "".join(received) == "", "nothing of a blocked answer leaves"
    assert (refused.value.code, refused.value.param) == ("invalid_value", "response_format")
    assert "pattern" in refused.value.message
    assert plain.choices[0].message.content, "without a response_format nothing is checked"
    events = await logged(runtime, settings, expected=6)
    found = sorted(
        (event["status"], event["guard_output_outcome"] or "", tuple(event["guard_output_found"]))
        for event in events.values()
    )
    assert found == [
        ("error", "", ()),  # the refused schema: no answer to check
        ("error", "blocked", ("INVALID_JSON",)),
        ("error", "blocked", ("INVALID_JSON",)),
        ("ok", "passed", ()),
        ("ok", "passed", ()),
        ("ok", "passed", ()),
    ], found


# A completion with the passages its answer must rest on.
GROUNDED_ASK = {
    "model": MODEL,
    "max_tokens": 24,
    "temperature": 0,
    "extra_body": {"grounding_context": "Delivery: 3 working days. Returns are free within 30 days."},
}


async def test_an_answer_ungrounded_in_the_supplied_context_is_blocked_streamed_or_not(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    ask = GROUNDED_ASK
    grounding = ServingSettings(max_tokens_limit=256, guard_output_groundedness=GuardAction.block)
    async with serve_gateway(engine, triton, settings, tmp_path, grounding) as (base_url, key, runtime):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            # Five tokens: " 3 working days"; longer, greedy SmolLM2 goes on to invent a date, rightly ungrounded.
            grounded = await client.completions.create(prompt=BENIGN, **{**ask, "max_tokens": 5})
            with pytest.raises(openai.BadRequestError) as refused:
                await client.completions.create(prompt=PLANTED, **ask)
            stream = await client.completions.create(prompt=PLANTED, stream=True, **ask)
            received: list[str] = []
            with pytest.raises(openai.APIError, match="UNGROUNDED"):
                async for chunk in stream:
                    received.append(chunk.choices[0].text)
    assert grounded.choices[0].text.startswith(" 3 working days")
    assert refused.value.code == "output_blocked"
    assert "UNGROUNDED (groundedness 0." in refused.value.message and "under the floor 0.50" in refused.value.message
    assert "4111" not in refused.value.message
    assert "".join(received) == "", "a held answer that fails leaves nothing behind"
    events = await logged(runtime, settings, expected=3)
    assert sorted(
        (event["status"], event["guard_output_outcome"], tuple(event["guard_output_found"]))
        for event in events.values()
    ) == [
        ("error", "blocked", ("UNGROUNDED",)),
        ("error", "blocked", ("UNGROUNDED",)),
        ("ok", "passed", ()),
    ]
    spans = await guardrail_spans(runtime, settings)
    assert float(spans[grounded.id].attributes["flywheel.guard.groundedness"]) >= 0.5


async def test_a_flag_only_groundedness_check_lets_the_answer_go_and_logs_its_score_once_scored(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    ask = GROUNDED_ASK
    flagging = ServingSettings(max_tokens_limit=256, guard_output_groundedness=GuardAction.flag)
    async with serve_gateway(engine, triton, settings, tmp_path, flagging) as (base_url, key, runtime):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            whole = await client.completions.create(prompt=PLANTED, **ask)
            stream = await client.completions.create(
                prompt=PLANTED, stream=True, extra_headers={"Cache-Control": "no-cache"}, **ask
            )
            pieces = [chunk.choices[0].text async for chunk in stream]
    assert whole.choices[0].text and "".join(pieces) == whole.choices[0].text, "flagged, not held or changed"
    events = await logged(runtime, settings, expected=2)
    assert sorted(
        (event["status"], event["guard_output_outcome"], tuple(event["guard_output_found"]))
        for event in events.values()
    ) == [
        ("ok", "flagged", ("UNGROUNDED",)),
        ("ok", "flagged", ("UNGROUNDED",)),
    ]
    spans = await guardrail_spans(runtime, settings)
    for inference_id, event in events.items():
        guard = spans[inference_id]
        assert float(guard.attributes["flywheel.guard.groundedness"]) < 0.5
        # The call ended when its answer went out; MiniLM scored it after that, and the log waited for the score.
        ended = event["started_at"], event["latency_total_ms"]
        answered_at = datetime.fromisoformat(ended[0]) + timedelta(milliseconds=ended[1])
        assert guard.ended_at > answered_at, (guard.ended_at, answered_at)


async def test_a_request_on_a_denied_topic_is_refused_and_one_on_another_subject_is_answered(
    engine: Engine, triton: TritonServing, settings: FlywheelSettings, topics: str, tmp_path: Path
) -> None:
    denied = {"medical": ["What medicine should I take for my headache?", "How much ibuprofen can I take?"]}
    guarded = ServingSettings(guard_input_denied_topics=GuardAction.block, guard_denied_topics=denied)
    ask = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    async with serve_gateway(engine, triton, settings, tmp_path, guarded) as (base_url, key, runtime):
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    messages=[{"role": "user", "content": "Which painkiller works best for a migraine?"}], **ask
                )
            answered = await client.chat.completions.create(
                messages=[{"role": "user", "content": "How long does delivery take?"}], **ask
            )
    assert (refused.value.code, refused.value.param) == ("input_blocked", "messages")
    assert "TOPIC_medical" in refused.value.message
    assert answered.choices[0].message.content
    events = list((await logged(runtime, settings, expected=2)).values())
    assert sorted(
        (event["status"], event["guard_input_outcome"], tuple(event["guard_input_found"])) for event in events
    ) == [
        ("error", "blocked", ("TOPIC_medical",)),
        ("ok", "passed", ()),
    ]
    spans = await guardrail_spans(runtime, settings, check="input")
    similarity = {
        span.attributes["flywheel.guard.outcome"]: float(span.attributes["flywheel.guard.topic_similarity"])
        for span in spans.values()
    }
    assert similarity["blocked"] >= 0.5 > similarity["passed"], similarity
