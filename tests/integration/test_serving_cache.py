"""The gateway's exact response cache, through the unmodified openai client against a live gateway
over a real Triton, its inferences and spans read back from the real Kafka."""

from __future__ import annotations

import json

import openai
import pytest

from contracts.events import GuardPolicyActivated, GuardPolicySpec, InferenceLogged, PromptPublished, SpanLogged, Stage
from services.runtime.auth import Role
from services.runtime.inference import Engine
from services.runtime.service import Runtime
from services.runtime.settings import FlywheelSettings
from services.serving.settings import ServingSettings
from services.serving.triton import TritonServing
from tests.integration.test_event_bus import read_all
from tests.integration.test_serving_gateway import (  # noqa: F401 - fixtures shared with the gateway's tests
    engine,
    gateway_app,
    keys,
    routes,
    runtime,
    triton,
    uvicorn_server,
)

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Hi"}]


async def chat(client: openai.AsyncOpenAI, **options) -> tuple[str, openai.types.chat.ChatCompletion]:
    """What the cache did (x-flywheel-cache) and the completion."""
    raw = await client.chat.completions.with_raw_response.create(
        **{"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **options}
    )
    return raw.headers["x-flywheel-cache"], raw.parse()


async def test_repeats_are_answered_from_the_cache_per_caller_and_version(
    engine: Engine, triton: TritonServing, runtime: Runtime, settings: FlywheelSettings, keys: dict
) -> None:
    assert triton.ports is not None
    table = routes()
    app, gateway, buffer = await gateway_app(engine, triton.ports.grpc_url, runtime, keys, table=table)
    other_key = keys["store"].create(principal="app-2", role=Role.app, created_by="test")[0]
    try:
        async with uvicorn_server(app) as base_url:
            client = openai.AsyncOpenAI(base_url=base_url, api_key=keys["app"], max_retries=0)
            other = openai.AsyncOpenAI(base_url=base_url, api_key=other_key, max_retries=0)
            first = await chat(client, temperature=0)
            again = await chat(client, temperature=0)
            stream = await client.chat.completions.with_raw_response.create(
                model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, stream=True
            )
            chunks = [chunk async for chunk in stream.parse()]
            by_other = await chat(other, temperature=0)
            seeded = [await chat(client, temperature=1, seed=7) for _ in range(2)]
            sampled = [await chat(client, temperature=1) for _ in range(2)]
            fresh = await chat(client, temperature=0, extra_headers={"Cache-Control": "no-cache"})
            unstored = await chat(client, temperature=0, max_tokens=3, extra_headers={"Cache-Control": "no-store"})
            unstored_again = await chat(client, temperature=0, max_tokens=3)

            table.set_stage("tiny", 2, Stage.production)  # a promotion: tiny now means v2
            promoted = [await chat(client, temperature=0) for _ in range(2)]
            pinned_old = await chat(client, model="tiny:v1", temperature=0)

            prompt = {"prompt_ref": {"name": "support", "variables": {"product": "kettles"}}}
            with_prompt = [await chat(client, temperature=0, extra_body=prompt) for _ in range(2)]
            gateway.prompts.publish(
                PromptPublished(
                    prompt_name="support",
                    version=2,
                    template="You answer questions about {{ product }} only.",
                    variables=["product"],
                    labels=["production"],
                )
            )
            new_prompt = await chat(client, temperature=0, extra_body=prompt)
            await client.close()
            await other.close()
    finally:
        await gateway.close()
        await buffer.stop()

    answer = first[1].choices[0].message.content
    assert (first[0], again[0]) == ("miss", "hit")
    assert again[1].choices[0].message.content == answer and again[1].id != first[1].id
    assert again[1].model == "tiny:v1" and again[1].usage.completion_tokens == first[1].usage.completion_tokens
    assert again[1].choices[0].finish_reason == first[1].choices[0].finish_reason == "length"
    assert stream.headers["x-flywheel-cache"] == "hit"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == answer
    assert chunks[-1].choices[0].finish_reason == "length"
    assert by_other[0] == "miss", "one API key's cached answers must not be served to another"
    assert [header for header, _ in seeded] == ["miss", "hit"]
    assert [header for header, _ in sampled] == ["uncacheable", "uncacheable"]
    assert fresh[0] == "bypass" and unstored[0] == "bypass" and unstored_again[0] == "miss"
    assert [header for header, _ in promoted] == ["miss", "hit"] and promoted[0][1].model == "tiny:v2"
    assert pinned_old[0] == "hit" and pinned_old[1].choices[0].message.content == answer
    assert [header for header, _ in with_prompt] == ["miss", "hit"]
    assert new_prompt[0] == "miss", "a new prompt version must not be answered with the old one's answer"

    bootstrap = settings.resolved_kafka_bootstrap()
    records = await read_all(bootstrap, runtime.bus("serving").topic(InferenceLogged), expected=17)
    events = {event["inference_id"]: event for event in (json.loads(r.value)["payload"] for r in records)}
    generated, hit = events[first[1].id], events[again[1].id]
    assert generated["route"] == "production" and generated["latency_compute_ms"] > 0
    # A hit is an inference of its own, counted against the version whose answer it replays.
    assert (hit["route"], hit["adapter_version"], hit["status"], hit["principal"]) == ("cache", 1, "ok", "app-1")
    assert hit["output_text"] == generated["output_text"] and hit["latency_compute_ms"] == 0
    assert events[promoted[1][1].id]["adapter_version"] == 2 and events[promoted[1][1].id]["route"] == "cache"
    assert (events[with_prompt[1][1].id]["prompt_name"], events[with_prompt[1][1].id]["prompt_version"]) == (
        "support",
        1,
    )
    assert events[chunks[0].id]["route"] == "cache"
    assert {events[sample[1].id]["route"] for sample in sampled} == {"production"}

    span_records = await read_all(bootstrap, runtime.bus("serving").topic(SpanLogged), expected=10**6, timeout_s=5)
    spans = [SpanLogged.model_validate(json.loads(record.value)["payload"]) for record in span_records]
    hit_spans = [span for span in spans if span.inference_id == again[1].id]
    # Triton was not called: the hit's trace has the server span alone, naming the answer's source.
    assert len(hit_spans) == 1
    assert hit_spans[0].attributes["flywheel.route"] == "cache"
    assert hit_spans[0].attributes["flywheel.cache.source_inference_id"] == first[1].id
    assert len([span for span in spans if span.inference_id == first[1].id]) > 1


async def test_a_guard_policy_may_share_cached_answers_between_keys_and_its_next_version_starts_afresh(
    engine: Engine, triton: TritonServing, runtime: Runtime, settings: FlywheelSettings, keys: dict
) -> None:
    assert triton.ports is not None
    app, gateway, buffer = await gateway_app(engine, triton.ports.grpc_url, runtime, keys)
    other_key = keys["store"].create(principal="app-3", role=Role.app, created_by="test")[0]

    def activate(version: int, spec: GuardPolicySpec) -> None:
        # What serving's handler does with the registry's guard_policy.activated (the Kafka path:
        # test_serving_streaming.py's registry policy test).
        gateway.guard_policies.activate(
            GuardPolicyActivated(policy_name="tiny-guard", version=version, model_name="tiny", spec=spec, actor="alice")
        )

    try:
        async with uvicorn_server(app) as base_url:
            client = openai.AsyncOpenAI(base_url=base_url, api_key=keys["app"], max_retries=0)
            other = openai.AsyncOpenAI(base_url=base_url, api_key=other_key, max_retries=0)
            activate(1, GuardPolicySpec(cache_shared=True))
            first = await chat(client, temperature=0)
            shared = await chat(other, temperature=0)
            activate(2, GuardPolicySpec())
            next_version = await chat(client, temperature=0)
            unshared = await chat(other, temperature=0)
            await client.close()
            await other.close()
    finally:
        await gateway.close()
        await buffer.stop()

    assert (first[0], shared[0]) == ("miss", "hit"), "the policy shares answers between keys"
    assert shared[1].choices[0].message.content == first[1].choices[0].message.content
    assert next_version[0] == "miss", "a new policy version must not serve the answers cached under the old one"
    assert unshared[0] == "miss", "by default one key's cached answers are not served to another"
    records = await read_all(
        settings.resolved_kafka_bootstrap(), runtime.bus("serving").topic(InferenceLogged), expected=10**6, timeout_s=5
    )
    events = {event["inference_id"]: event for event in (json.loads(r.value)["payload"] for r in records)}
    hit = events[shared[1].id]
    assert (hit["route"], hit["principal"], hit["guard_policy"]) == ("cache", "app-3", "tiny-guard:v1")
    assert events[unshared[1].id]["guard_policy"] == "tiny-guard:v2"


async def test_a_canary_arm_is_always_generated(
    engine: Engine, triton: TritonServing, runtime: Runtime, keys: dict
) -> None:
    assert triton.ports is not None
    app, gateway, buffer = await gateway_app(
        engine, triton.ports.grpc_url, runtime, keys, table=routes(canary_percent=50)
    )
    try:
        async with uvicorn_server(app) as base_url:
            client = openai.AsyncOpenAI(base_url=base_url, api_key=keys["app"], max_retries=0)
            answers = {
                user: [await chat(client, temperature=0, user=f"user-{user}") for _ in range(2)] for user in range(8)
            }
            await client.close()
    finally:
        await gateway.close()
        await buffer.stop()
    on_canary = [calls for calls in answers.values() if calls[0][1].model == "tiny:v2"]
    on_stable = [calls for calls in answers.values() if calls[0][1].model == "tiny:v1"]
    assert on_canary and on_stable, "the 50% split should put some of 8 users on each arm"
    # The experiment compares the arms' real answers and latencies: the canary's calls are never cached.
    assert all(header == "uncacheable" for calls in on_canary for header, _ in calls)
    # The stable version's calls are answered from the cache (one entry per principal and request).
    headers = [header for calls in on_stable for header, _ in calls]
    assert headers[0] == "miss" and set(headers[1:]) == {"hit"}


def asking(question: str) -> dict:
    return {"messages": [{"role": "user", "content": question}], "temperature": 0}


async def test_a_question_in_other_words_is_answered_from_the_semantic_cache_where_the_policy_opts_in(
    engine: Engine, triton: TritonServing, runtime: Runtime, settings: FlywheelSettings, keys: dict
) -> None:
    assert triton.ports is not None
    table = routes()
    semantic = ServingSettings(
        max_prompt_tokens=200, max_tokens_limit=16, default_max_tokens=4, response_cache_semantic_threshold=0.9
    )
    app, gateway, buffer = await gateway_app(
        engine, triton.ports.grpc_url, runtime, keys, table=table, serving=semantic
    )
    other_key = keys["store"].create(principal="app-3", role=Role.app, created_by="test")[0]
    try:
        async with uvicorn_server(app) as base_url:
            client = openai.AsyncOpenAI(base_url=base_url, api_key=keys["app"], max_retries=0)
            other = openai.AsyncOpenAI(base_url=base_url, api_key=other_key, max_retries=0)
            first = await chat(client, **asking("What is the capital of France?"))
            reworded = await chat(client, **asking("what's the capital city of France?"))
            unrelated = await chat(client, **asking("How do I bake sourdough bread at home?"))
            by_other = await chat(other, **asking("what's the capital city of France?"))
            in_a_conversation = await chat(
                client,
                messages=[
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "what's the capital city of France?"},
                ],
                temperature=0,
            )
            table.set_stage("tiny", 2, Stage.production)
            promoted = await chat(client, **asking("what's the capital city of France?"))
            await client.close()
            await other.close()
    finally:
        await gateway.close()
        await buffer.stop()

    assert (first[0], reworded[0]) == ("miss", "semantic")
    assert reworded[1].choices[0].message.content == first[1].choices[0].message.content
    assert unrelated[0] == "miss", "another question is generated"
    assert by_other[0] == "miss", "another API key never meets this key's answers"
    assert in_a_conversation[0] == "miss", "the rest of the conversation must be the same"
    assert promoted[0] == "miss", "a promotion changes the version, and the stored answers are the old one's"

    bootstrap = settings.resolved_kafka_bootstrap()
    records = await read_all(bootstrap, runtime.bus("serving").topic(InferenceLogged), expected=6)
    events = {event["inference_id"]: event for event in (json.loads(r.value)["payload"] for r in records)}
    hit = events[reworded[1].id]
    assert (hit["route"], hit["adapter_version"]) == ("cache", 1)
    assert "what's the capital city of France?" in hit["input_text"], "the hit logs its own question"
    span_records = await read_all(bootstrap, runtime.bus("serving").topic(SpanLogged), expected=10**6, timeout_s=5)
    spans = [SpanLogged.model_validate(json.loads(record.value)["payload"]) for record in span_records]
    [server] = [span for span in spans if span.inference_id == reworded[1].id]
    assert server.attributes["flywheel.cache.source_inference_id"] == first[1].id
    assert 0.9 <= float(server.attributes["flywheel.cache.similarity"]) < 1.0
