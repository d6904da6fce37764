"""Model references resolve from the event-carried routes table, which the registry's events keep current."""

from __future__ import annotations

import pytest

from contracts.envelope import wrap
from contracts.events import AdapterRegistered, Stage, StageChanged
from services.serving.handlers import (
    HANDLERS,
    Deps,
    when_adapter_registered_remember_it,
    when_stage_changed_route_and_load,
)
from services.serving.prompt_routes import PromptRoutes
from services.serving.routes import Routes, UnknownModelError

pytestmark = pytest.mark.unit


def test_references_resolve_by_stage_and_version() -> None:
    routes = Routes()
    routes.add_model("m")
    assert (routes.resolve("m").adapter_version, routes.resolve("m").route) == (None, "direct")
    for version in (1, 2):
        routes.add_version("m", version, f"file:///v{version}", "0" * 64)
    routes.set_stage("m", 1, Stage.production)
    routes.set_stage("m", 2, Stage.staging)
    assert routes.resolve("m").label == "m:v1" and routes.resolve("m@production").route == "production"
    assert routes.resolve("m@staging").label == "m:v2" and routes.resolve("m:v1").route == "pinned"
    routes.set_stage("m", 2, Stage.production)
    assert routes.resolve("m").label == "m:v2"
    with pytest.raises(UnknownModelError, match="no version in staging"):
        routes.resolve("m@staging")
    for bad in ("nope", "m:v7", "m@archived", "m:x"):
        with pytest.raises(UnknownModelError):
            routes.resolve(bad)
    assert routes.references() == ["m", "m@production", "m:v1", "m:v2"]


def test_canary_share_is_close_to_declared_and_sticky_per_user() -> None:
    routes = Routes()
    for version in (1, 2):
        routes.add_version("m", version, f"file:///v{version}", "0" * 64)
    routes.set_stage("m", 1, Stage.production)
    routes.set_stage("m", 2, Stage.production, canary_percent=20)
    users = [f"user-{index}" for index in range(5000)]
    first = {user: routes.resolve("m", user) for user in users}
    canary = {user for user, route in first.items() if route.route == "canary"}
    assert abs(len(canary) / len(users) - 0.20) < 0.02
    assert all(first[user].adapter_version == 2 for user in canary)
    assert all(routes.resolve("m@production", user) == first[user] for user in users[:500])  # sticky
    assert {routes.resolve("m:v1", user).route for user in users[:10]} == {"pinned"}

    routes.set_stage("m", 2, Stage.production, canary_percent=50)
    widened = {user for user in users if routes.resolve("m", user).route == "canary"}
    assert canary < widened and abs(len(widened) / len(users) - 0.5) < 0.03  # raising the share only adds users

    routes.set_stage("m", 2, Stage.production)  # promoted to full production
    assert {routes.resolve("m", user).label for user in users[:100]} == {"m:v2"}


def test_prompt_ab_split_follows_labels_and_is_sticky() -> None:
    from contracts.events import PromptPublished
    from contracts.http import PromptReference
    from services.serving.prompt_routes import PromptRoutes, UnknownPromptError

    prompts = PromptRoutes()
    prompts.publish(PromptPublished(prompt_name="p", version=1, template="a", labels=["production"]))
    prompts.publish(PromptPublished(prompt_name="p", version=2, template="b", labels=["candidate"]))
    ref = PromptReference(name="p")
    users = [f"u{index}" for index in range(4000)]
    assert {prompts.resolve(ref, user).version for user in users} == {1}, (
        "a label without a declared share took traffic"
    )
    prompts.publish(
        PromptPublished(prompt_name="p", version=2, template="b", labels=["candidate"], label_traffic={"candidate": 25})
    )
    picks = {user: prompts.resolve(ref, user) for user in users}
    share = sum(choice.route == "ab" for choice in picks.values()) / len(picks)
    assert abs(share - 0.25) < 0.025 and {choice.version for choice in picks.values() if choice.route == "ab"} == {2}
    assert all(prompts.resolve(ref, user) == choice for user, choice in list(picks.items())[:300])
    assert prompts.resolve(PromptReference(name="p", version=1), "u1").route == "pinned"
    assert prompts.resolve(PromptReference(name="p", label="candidate"), "u1").version == 2

    prompts.publish(
        PromptPublished(prompt_name="p", version=3, template="c", labels=["beta"], label_traffic={"beta": 10})
    )
    split = [prompts.resolve(ref, user).version for user in users]
    assert abs(split.count(2) / len(users) - 0.25) < 0.025 and abs(split.count(3) / len(users) - 0.10) < 0.02
    assert [prompts.resolve(ref, user).version for user, choice in picks.items() if choice.route == "ab"].count(
        2
    ) == sum(choice.route == "ab" for choice in picks.values()), "adding a split moved users of the first"

    prompts.publish(
        PromptPublished(
            prompt_name="p",
            version=2,
            template="b",
            labels=["candidate", "production"],
            label_traffic={"candidate": 25},
        )
    )  # promoted
    assert {prompts.resolve(ref, user).version for user in users} == {2, 3}
    with pytest.raises(UnknownPromptError, match="no label"):
        prompts.resolve(PromptReference(name="p", label="gamma"))


def test_token_bucket_per_principal() -> None:
    from services.serving.limits import RateLimiter

    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # another key has its own bucket
    now[0] += 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0
    assert RateLimiter.retry_after(0.2) == "1" and RateLimiter.retry_after(2.1) == "3"


class _RecordingLoader:
    """Stands in for the engine's adapter loads: which versions are loaded, and a load that can fail once."""

    def __init__(self, fail_once: int | None = None) -> None:
        self.loaded: set[int] = set()
        self._fail_once = fail_once

    async def load(self, model_name: str, version: int) -> None:
        if version == self._fail_once:
            self._fail_once = None
            raise OSError("artifact store unreachable")
        self.loaded.add(version)

    async def unload(self, model_name: str, version: int) -> None:
        self.loaded.discard(version)


def _deps(routes: Routes, loader: _RecordingLoader) -> Deps:
    # No bus: these tests send no deployment.requested, the one handler that publishes.
    return Deps(routes=routes, prompts=PromptRoutes(), loader=loader, bus=None)  # type: ignore[arg-type]


def _routed(routes: Routes) -> set[int]:
    versions = {
        routes.resolve(reference).adapter_version
        for reference in ("m", "m@staging")
        if reference in routes.references()
    }
    return versions - {None}


def _interleavings(first: list, second: list) -> list[list]:
    if not first or not second:
        return [first + second]
    return [[first[0], *rest] for rest in _interleavings(first[1:], second)] + [
        [second[0], *rest] for rest in _interleavings(first, second[1:])
    ]


async def test_replayed_topics_in_any_interleaving_never_route_to_an_adapter_not_loaded() -> None:
    """Serving reads adapter.registered and stage.changed with one consumer each, so a replay may see a
    version's promotion before its registration; whatever the interleaving, a route points only at a
    loaded adapter, and the end state is the registry's."""
    registered = [
        wrap(
            AdapterRegistered(
                model_name="m",
                adapter_version=v,
                artifact_uri=f"file:///v{v}",
                artifact_sha256="0" * 64,
                training_job_id=f"j{v}",
            ),
            producer="registry",
        )
        for v in (1, 2)
    ]
    stages = [
        wrap(
            StageChanged(
                model_name="m",
                adapter_version=1,
                from_stage=Stage.staging,
                to_stage=Stage.production,
                actor="a",
                approver="b",
            ),
            producer="registry",
        ),
        wrap(
            StageChanged(
                model_name="m",
                adapter_version=2,
                from_stage=Stage.staging,
                to_stage=Stage.production,
                actor="a",
                approver="b",
                replaces_version=1,
            ),
            producer="registry",
        ),
        wrap(
            StageChanged(
                model_name="m", adapter_version=1, from_stage=Stage.production, to_stage=Stage.archived, actor="a"
            ),
            producer="registry",
        ),
    ]  # in the registry's order: the promotion, then the archive of the version it replaced
    orders = _interleavings(registered, stages)
    assert len(orders) == 10
    for order in orders:
        routes, loader = Routes(), _RecordingLoader()
        routes.add_model("m")
        deps = _deps(routes, loader)
        answered = []
        for envelope in order:
            await HANDLERS[type(envelope.payload)](envelope, deps)
            assert _routed(routes) <= loader.loaded, [type(e.payload).__name__ for e in order]
            if isinstance(envelope.payload, StageChanged):
                answered.append(routes.resolve("m").label)
        assert routes.resolve("m").label == "m:v2" and loader.loaded == {2}
        if order[:2] == registered:  # live, not a replay: once v1 is in production, production is never empty
            assert answered == ["m:v1", "m:v2", "m:v2"], answered


async def test_a_deferred_promotion_whose_load_fails_is_applied_when_the_registration_is_redelivered() -> None:
    routes, loader = Routes(), _RecordingLoader(fail_once=1)
    routes.add_model("m")
    deps = _deps(routes, loader)
    await when_stage_changed_route_and_load(
        wrap(
            StageChanged(
                model_name="m",
                adapter_version=1,
                from_stage=Stage.staging,
                to_stage=Stage.production,
                actor="a",
                approver="b",
            ),
            producer="registry",
        ),
        deps,
    )
    assert routes.resolve("m").route == "direct"  # nothing routed to a version serving cannot load yet
    registration = wrap(
        AdapterRegistered(
            model_name="m", adapter_version=1, artifact_uri="file:///v1", artifact_sha256="0" * 64, training_job_id="j1"
        ),
        producer="registry",
    )
    with pytest.raises(OSError):
        await when_adapter_registered_remember_it(registration, deps)
    assert routes.resolve("m").route == "direct" and loader.loaded == set()
    await when_adapter_registered_remember_it(registration, deps)  # the consumer's retry
    assert routes.resolve("m").label == "m:v1" and loader.loaded == {1}
