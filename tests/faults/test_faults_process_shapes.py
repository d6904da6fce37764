"""The two process shapes give the same outcome for a slice of the loop: inference.logged events (slow,
some failed) and feedback through the feedback door -> ClickHouse -> the monitor's alerts, with malformed
messages put on every topic of the contract at the same time.

- one process: registry, feedback (the sink) and monitor built together, as `flywheel up` builds them;
- separate processes: `flywheel run registry`, and feedback + monitor in a second process against the
  same Kafka. With embedded chDB only one process may open the data directory, so the sink and the
  monitor share that process (with a ClickHouse server they would run apart); the second process checks
  API keys in the registry's database (FLYWHEEL_DATABASE_URL) and calls the registry's door over HTTP.

Poison on every topic: each topic consumed by a running service gets its poison in `<topic>.dlq` and
nothing else is affected (the counts and alerts match the clean expectation). Topics consumed only by
trainer, evaluator and serving (not started here: they need the model) keep their poison unread.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from contracts.envelope import wrap
from contracts.events import (
    EVENTS,
    EvaluationCompleted,
    FeedbackReceived,
    FeedbackReviewed,
    InferenceLogged,
    InferenceStatus,
    SpanLogged,
    StageChanged,
    TrainingCompleted,
)
from contracts.publisher import encode
from contracts.topics import dlq_for, topic_for
from services.runtime.broker import ensure_topics
from tests.faults.conftest import ProxiedKafka
from tests.faults.support import (
    EXPECTED_POISON,
    GROUPS,
    POISON,
    ServiceProcess,
    group_lag,
    poison_dead_lettered,
    read_dead_letters,
    send_poison,
    stop_all,
    topic_size,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ADMIN_KEY = "faults-admin-key-0123456789abcdef"
INFERENCES = 40
# Consumed by the services these shapes run: registry (training.completed, evaluation.completed),
# feedback (inference.logged, feedback.received, feedback.reviewed, span.logged), monitor (stage.changed).
CONSUMED = {
    TrainingCompleted,
    EvaluationCompleted,
    InferenceLogged,
    FeedbackReceived,
    FeedbackReviewed,
    SpanLogged,
    StageChanged,
}


def shape_env(home: Path) -> dict[str, str]:
    return {
        "FLYWHEEL_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
        "FLYWHEEL_DATABASE_URL": f"sqlite:///{home / 'registry.db'}",
        "FLYWHEEL_MONITOR_TICK_S": "2",
        "FLYWHEEL_MONITOR_API_KEY": ADMIN_KEY,
    }


async def drive_slice(bootstrap: str, prefix: str, feedback_door: str, monitor_door: str) -> dict[str, object]:
    """Publish the slice's events and poison, send feedback through the door, and read the outcome."""
    run = uuid.uuid4().hex[:6]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await send_poison(producer, prefix)
        for i in range(INFERENCES):
            failed = i % 5 == 0
            envelope = wrap(
                InferenceLogged(
                    inference_id=f"{run}-{i}",
                    model_name="smollm2",
                    prompt_tokens=12,
                    completion_tokens=8,
                    latency_total_ms=3000.0 + i,
                    status=InferenceStatus.error if failed else InferenceStatus.ok,
                    error="triton unavailable" if failed else None,
                ),
                producer="shape-test",
            )
            key, value, headers = encode(envelope)
            await producer.send_and_wait(topic_for(InferenceLogged, prefix), value=value, key=key, headers=headers)
    finally:
        await producer.stop()
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(0, INFERENCES, 2):
            answer = await client.post(
                f"{feedback_door}/feedback/v1/feedback",
                json={"inference_id": f"{run}-{i}", "thumbs": "down", "rating": 1},
                headers=auth,
            )
            assert answer.status_code == 202, answer.text

        async def sql(query: str) -> list[list]:
            answer = await client.post(f"{monitor_door}/monitor/v1/query", json={"sql": query}, headers=auth)
            assert answer.status_code == 200, answer.text
            return answer.json()["rows"]

        async def stored() -> tuple[int, int]:
            rows = await sql("SELECT (SELECT count() FROM inference_log), (SELECT count() FROM feedback)")
            return int(rows[0][0]), int(rows[0][1])

        async def alerts() -> list[str]:
            answer = await client.get(f"{monitor_door}/monitor/v1/alerts", headers=auth)
            assert answer.status_code == 200, answer.text
            return sorted({alert["rule_name"] for alert in answer.json()})

        deadline = asyncio.get_running_loop().time() + 180
        while (await stored() != (INFERENCES, INFERENCES // 2)) or not {"error-rate", "latency-p95-slo"} <= set(
            await alerts()
        ):
            assert asyncio.get_running_loop().time() < deadline, f"stored {await stored()}, alerts {await alerts()}"
            await asyncio.sleep(1.0)
        await asyncio.sleep(4.0)  # two more monitor ticks: an alert must open once, not once per tick
        rows = await sql("SELECT count() - uniqExact(event_id) FROM inference_log")
        duplicated = int(rows[0][0]) + int((await sql("SELECT count() - uniqExact(event_id) FROM feedback"))[0][0])
        final_counts = await stored()
        answer = await client.get(f"{monitor_door}/monitor/v1/alerts", headers=auth)
        alert_list = answer.json()
    # The stored counts say the sink is past its poison; the registry and the monitor read other topics,
    # so their dead letters are waited for too (check_dead_letters then asks for the exact count).
    while True:
        dlq = {event.event_type: await topic_size(bootstrap, dlq_for(topic_for(event, prefix))) for event in EVENTS}
        if all(dlq[event.event_type] >= len(POISON) for event in CONSUMED):
            break
        assert asyncio.get_running_loop().time() < deadline, f"dead letters so far: {dlq}"
        await asyncio.sleep(1.0)
    return {
        "stored (inference_log, feedback)": final_counts,
        "duplicated": duplicated,
        "alerts": sorted(alert["rule_name"] for alert in alert_list),
        "dead_lettered": dlq,
    }


def check_dead_letters(outcome: dict[str, object]) -> None:
    dlq = outcome["dead_lettered"]
    assert isinstance(dlq, dict)
    for event in EVENTS:
        expected = len(POISON) if event in CONSUMED else 0
        assert dlq[event.event_type] == expected, (
            f"{event.event_type}: {dlq[event.event_type]} dead-lettered, expected {expected}"
        )


async def test_separate_processes_give_the_same_outcome_as_one_process_under_poison(
    tmp_path: Path, proxied: ProxiedKafka
) -> None:
    outcomes: dict[str, dict[str, object]] = {}

    # One process.
    prefix = f"t{uuid.uuid4().hex[:10]}."
    await ensure_topics(proxied.bootstrap, prefix)
    home = tmp_path / "one"
    one = ServiceProcess(
        tmp_path, proxied.bootstrap, prefix, ["registry", "feedback", "monitor"], home=home, **shape_env(home)
    )
    try:
        one.start()
        await one.wait_ready()
        outcomes["one process"] = await drive_slice(proxied.bootstrap, prefix, one.url, one.url)
        assert one.running(), one.log_tail()
    finally:
        one.stop()

    # Separate processes: the registry alone; the sink and the monitor together (one chDB directory).
    prefix = f"t{uuid.uuid4().hex[:10]}."
    await ensure_topics(proxied.bootstrap, prefix)
    home = tmp_path / "apart"
    registry = ServiceProcess(
        tmp_path, proxied.bootstrap, prefix, ["registry"], home=home / "registry", **shape_env(home)
    )
    sink_monitor = ServiceProcess(
        tmp_path, proxied.bootstrap, prefix, ["feedback", "monitor"], home=home / "sink", **shape_env(home)
    )
    try:
        registry.start()
        await registry.wait_ready()
        sink_monitor.env["FLYWHEEL_MONITOR_REGISTRY_URL"] = sink_monitor.env["FLYWHEEL_REGISTRY_URL"] = registry.url
        sink_monitor.start()
        await sink_monitor.wait_ready()
        outcomes["separate processes"] = await drive_slice(
            proxied.bootstrap, prefix, sink_monitor.url, sink_monitor.url
        )
        assert registry.running() and sink_monitor.running(), registry.log_tail() + sink_monitor.log_tail()
    finally:
        sink_monitor.stop()
        registry.stop()

    print("\n== process shapes: registry + feedback + monitor, poison on every topic")
    for shape, outcome in outcomes.items():
        print(f"  {shape}: {outcome}")
    for outcome in outcomes.values():
        assert outcome["stored (inference_log, feedback)"] == (INFERENCES, INFERENCES // 2)
        assert outcome["duplicated"] == 0
        assert {"error-rate", "latency-p95-slo"} <= set(outcome["alerts"])  # type: ignore[arg-type]
        check_dead_letters(outcome)
    assert outcomes["one process"] == outcomes["separate processes"]


async def test_poison_on_every_topic_goes_to_each_consuming_groups_dlq_and_blocks_nothing(
    tmp_path: Path, proxied: ProxiedKafka
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    await ensure_topics(proxied.bootstrap, prefix)
    home = tmp_path / "poison"
    env = shape_env(home)
    processes = [
        ServiceProcess(tmp_path, proxied.bootstrap, prefix, services, home=home / "-".join(services), **env)
        for services in (["registry"], ["trainer"], ["evaluator"], ["feedback", "monitor"])
    ]
    try:
        processes[0].start()
        await processes[0].wait_ready()
        for process in processes[1:]:
            process.env["FLYWHEEL_MONITOR_REGISTRY_URL"] = process.env["FLYWHEEL_REGISTRY_URL"] = processes[0].url
            process.start()
        for process in processes[1:]:
            await process.wait_ready()
        producer = AIOKafkaProducer(bootstrap_servers=proxied.bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            await send_poison(producer, prefix)
            # A good event behind the poison: it must still be stored.
            key, value, headers = encode(
                wrap(InferenceLogged(inference_id="after-poison", model_name="smollm2"), producer="poison-test")
            )
            await producer.send_and_wait(topic_for(InferenceLogged, prefix), value=value, key=key, headers=headers)
        finally:
            await producer.stop()
        # A group's lag can read 0 a moment before its dead letters are listed (a loaded broker answered
        # so once, in CI): the outcome is read again until every group has dead-lettered its poison and
        # the good event is stored, or the deadline says which group is stuck.
        deadline = asyncio.get_running_loop().time() + 180
        sink_monitor = processes[-1]
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                lags = {
                    group: await group_lag(proxied.bootstrap, group, [topic_for(event, prefix) for event in events])
                    for group, events in GROUPS.items()
                }
                answer = await client.post(
                    f"{sink_monitor.url}/monitor/v1/query",
                    json={"sql": "SELECT inference_id FROM inference_log"},
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                )
                assert answer.status_code == 200, answer.text
                stored = answer.json()["rows"]
                dead = poison_dead_lettered(await read_dead_letters(proxied.bootstrap, prefix, EVENTS))
                if not any(lags.values()) and stored and dead >= EXPECTED_POISON:
                    break
                assert asyncio.get_running_loop().time() < deadline, (
                    f"stuck behind the poison: lag per group {lags}, stored {stored}, "
                    f"dead letters missing {dict(EXPECTED_POISON - dead)}"
                )
                await asyncio.sleep(1.0)
        assert all(process.running() for process in processes), "a service died on poison"
    finally:
        stop_all(processes)
    print("\n== poison on every topic: dead letters per (consumer group, topic)")
    for (group, event_type), count in sorted(dead.items()):
        print(f"  {group:<10} {event_type:<22} {count}")
    unread = sorted(event.event_type for event in EVENTS if not any(event in events for events in GROUPS.values()))
    print(f"  not consumed by these services (poison left unread): {', '.join(unread)}")
    assert dead == EXPECTED_POISON
    assert stored == [["after-poison"]]
