"""Triton made unavailable under steady gateway traffic: the serving process (`flywheel run serving`, a
tiny random Llama behind PyTriton's real tritonserver) and the feedback sink (`flywheel run feedback`,
embedded ClickHouse) run as their own processes on the proxied broker.

1. SIGSTOP the tritonserver child of the serving process for the outage (10 s CI, 30 s full), then SIGCONT.
2. SIGKILL it: serving must notice, report /readyz 503 meanwhile, and bring a new one up by itself.

Every answer is a 200 or an OpenAI-style 503/504 error object (no 500, no traceback, nothing held past
the gateway's Triton timeout plus a margin); the gateway answers 200 again by itself within a bound;
and every request (tagged through its `metadata`) is in ClickHouse's inference_log exactly once, read
without FINAL, with status 'error' where it was refused.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from contracts.events import InferenceLogged
from contracts.topics import topic_for
from services.runtime.auth import KeyStore, Role, create_database_engine
from tests.faults.conftest import ProxiedKafka
from tests.faults.support import FULL, ServiceProcess, eventually, query_stopped, size, wait_drained
from tests.fixtures.triton import tritonserver_pids
from tests.serving_support import smollm2_tokenizer, tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TRITON_TIMEOUT_S = 3.0
# A request may take the Triton timeout plus queueing on a busy 2-core machine; past this it is hung.
HUNG_AFTER_S = TRITON_TIMEOUT_S + 12.0
OUTAGE_S = size(10, 30)
AFTER_S = size(8, 20)
RECOVERY_LIMIT_S = 120.0
CLIENTS = 4
TAG = "fault_request"
TRACEBACK_MARKS = ("Traceback", 'File "')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    tiny_model(len(smollm2_tokenizer(directory))).save_pretrained(str(directory))
    return directory


def app_key(database_url: str) -> str:
    # As an admin would, in the table the registry's migrations made (the registry must be up).
    engine = create_database_engine(database_url)
    key = KeyStore(engine).create(principal="fault-app", role=Role.app, created_by="test")[0]
    engine.dispose()
    return key


@dataclass
class Answer:
    request: str
    phase: str
    started: float
    ended: float
    status: int | None  # None: no answer within HUNG_AFTER_S, or the connection failed
    inference_id: str | None
    body: str


class Traffic:
    """CLIENTS clients sending chats back to back; each answer is recorded with the phase it started in."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.phase = "before"
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(CLIENTS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def since(self, moment: float) -> list[Answer]:
        return [answer for answer in self.answers if answer.started >= moment]

    async def _client(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=HUNG_AFTER_S) as http:
            while not self._stop.is_set():
                request, phase, started = uuid.uuid4().hex, self.phase, time.monotonic()
                body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4,
                    "metadata": {TAG: request},
                }
                try:
                    response = await http.post("/v1/chat/completions", json=body)
                    status, text = response.status_code, response.text
                except httpx.HTTPError as error:
                    status, text = None, f"{type(error).__name__}: {error}"
                inference_id = response.json().get("id") if status == 200 else None
                self.answers.append(Answer(request, phase, started, time.monotonic(), status, inference_id, text))
                if status != 200:
                    await asyncio.sleep(0.2)  # a failing gateway answers at once: do not spin


def exited(process: psutil.Process) -> bool:
    """Gone, or a zombie: dead either way, whether or not its adopter has reaped it yet."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tritonserver(serving: ServiceProcess) -> psutil.Process:
    assert serving.process is not None
    found = [
        child
        for child in psutil.Process(serving.process.pid).children(recursive=True)
        if child.name() == "tritonserver"
    ]
    assert len(found) == 1, f"expected one tritonserver child of serving, found {found}"
    return found[0]


async def answers_again(traffic: Traffic, since: float) -> float:
    """Seconds from `since` until a request started after it was answered 200."""
    await eventually(
        lambda: any(a.status == 200 for a in traffic.since(since)), RECOVERY_LIMIT_S, "the gateway to answer 200 again"
    )
    return min(a.ended for a in traffic.since(since) if a.status == 200) - since


def steady(traffic: Traffic, since: float) -> tuple[float | None, int]:
    """Seconds from `since` until the first 200 after the last error (None: no such 200), and how many
    answers followed, all 200: the gateway recovered for good, not for one lucky request."""
    after = traffic.since(since)
    last_error = max((a.started for a in after if a.status != 200), default=since)
    ok = [a for a in after if a.started > last_error]
    return (min(a.ended for a in ok) - since if ok else None), len(ok)


def error_code(answer: Answer) -> str:
    """The OpenAI-style error code of a refused answer, or its status when it has none."""
    try:
        return str(httpx.Response(answer.status or 0, content=answer.body).json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return str(answer.status)


def clean_error(answer: Answer) -> str | None:
    """Why `answer` is not a 200 or a clean OpenAI-style 503/504 error object; None when it is."""
    if answer.status == 200:
        return None
    if answer.status not in (503, 504):
        return f"status {answer.status}: {answer.body[:300]}"
    if any(mark in answer.body for mark in TRACEBACK_MARKS):
        return f"traceback in the body: {answer.body[:300]}"
    try:
        error = httpx.Response(answer.status, content=answer.body).json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an OpenAI error object: {answer.body[:300]}"
    if not (isinstance(error.get("message"), str) and error["message"] and error.get("type")):
        return f"error object without message/type: {answer.body[:300]}"
    if answer.ended - answer.started > HUNG_AFTER_S:
        return f"answered after {answer.ended - answer.started:.1f}s"
    return None


async def test_triton_stopped_then_killed_under_traffic_errors_cleanly_recovers_and_logs_every_request_once(
    tmp_path: Path,
    proxied: ProxiedKafka,
    proxied_topics: str,
    model_dir: Path,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'registry.db'}"
    serving = ServiceProcess(
        tmp_path,
        proxied.bootstrap,
        proxied_topics,
        ["serving"],
        FLYWHEEL_DATABASE_URL=database_url,
        FLYWHEEL_SERVING_MODEL_DIR=str(model_dir),
        FLYWHEEL_SERVING_BASE_MODEL="tiny",
        FLYWHEEL_SERVING_TRITON_TIMEOUT_S=str(TRITON_TIMEOUT_S),
        # Steady traffic from one key: the per-key limit is not what this test is about.
        FLYWHEEL_SERVING_RATE_LIMIT_RPS="10000",
        FLYWHEEL_SERVING_RATE_LIMIT_BURST="10000",
    )
    registry = serving.registry_beside()  # serving checks the app key through it
    sink = ServiceProcess(tmp_path, proxied.bootstrap, proxied_topics, ["feedback"])
    traffic = Traffic(serving.url, key="")  # the key once the registry has migrated its database
    figures: dict[str, object] = {}
    ready_while_killed: list[int | None] = []
    frozen: psutil.Process | None = None
    stubs: list[psutil.Process] = []
    try:
        sink.start()
        registry.start()
        serving.start()
        await sink.wait_ready()
        await registry.wait_ready()
        traffic.key = app_key(database_url)
        await serving.wait_ready(300)
        traffic.start()
        await eventually(
            lambda: sum(a.status == 200 for a in traffic.answers) >= 10,
            120,
            "10 answers before the fault",
            alive=serving,
        )

        # 1. Triton frozen: the gateway must give up on it after its timeout and answer 503.
        frozen = tritonserver(serving)
        traffic.phase = "stopped"
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        await asyncio.sleep(OUTAGE_S)
        traffic.phase = "after_stop"
        frozen.send_signal(signal.SIGCONT)
        frozen = None
        resumed_at = time.monotonic()
        figures["sigstop_s"] = resumed_at - stopped_at
        figures["sigstop_first_200_s"] = await answers_again(traffic, resumed_at)
        await asyncio.sleep(AFTER_S)
        figures["sigstop_recovery_s"], figures["sigstop_200s_after_recovery"] = steady(traffic, resumed_at)
        assert serving.running(), serving.log_tail()

        # 2. Triton killed: serving must see it gone and start another by itself.
        triton = tritonserver(serving)
        # A freeze may outlast the Python-backend handlers' heartbeat, and then one restart is right too.
        figures["restarts_after_sigstop"] = serving.log_count("tritonserver exited")
        stubs = triton.children(recursive=True)  # the Python-backend stubs must not outlive their server
        traffic.phase = "killed"
        triton.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        while (
            not any(a.status == 200 for a in traffic.since(killed_at + 1.0))
            and time.monotonic() - killed_at < RECOVERY_LIMIT_S
        ):
            ready_while_killed.append(await asyncio.to_thread(serving.ready))
            await asyncio.sleep(1.0)
        traffic.phase = "after_kill"
        figures["sigkill_first_200_s"] = await answers_again(traffic, killed_at)
        await asyncio.sleep(AFTER_S)
        await traffic.stop()
        figures["sigkill_recovery_s"], figures["sigkill_200s_after_recovery"] = steady(traffic, killed_at)
        assert tritonserver(serving).pid != triton.pid
        figures["tritonserver_restarts_logged"] = serving.log_count("tritonserver exited")
    finally:
        await traffic.stop()
        if frozen is not None:
            # A stopped tritonserver would not act on the SIGTERM that stopping serving sends it.
            frozen.send_signal(signal.SIGCONT)
        serving.stop()
        registry.stop()
        _, remaining = psutil.wait_procs(stubs, timeout=30)
        # A zombie has exited: it waits only for whoever adopted it (init, once tritonserver died) to reap it.
        orphans = [stub for stub in remaining if not exited(stub)]
        for orphan in orphans:
            orphan.kill()
    leftover = tritonserver_pids(serving.home)
    try:
        # Serving flushed its inference.logged buffer on SIGTERM; the sink then takes all of it.
        await wait_drained(sink, proxied.bootstrap, "feedback", [topic_for(InferenceLogged, proxied_topics)], 300)
    finally:
        sink.stop()

    rows = query_stopped(
        sink.home,
        f"SELECT metadata['{TAG}'] AS request, toString(event_id) AS event_id, inference_id, status FROM inference_log",
    )
    by_request: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        by_request.setdefault(str(row["request"]), []).append(row)
    answers = {answer.request: answer for answer in traffic.answers}
    phases = ["before", "stopped", "after_stop", "killed", "after_kill"]
    counts = {
        phase: Counter("ok" if a.status == 200 else str(a.status) for a in traffic.answers if a.phase == phase)
        for phase in phases
    }
    lost = [request for request in answers if request not in by_request]
    logged_twice = {request: len(found) for request, found in by_request.items() if len(found) > 1}
    unexpected = [request for request in by_request if request not in answers]
    duplicated = len(rows) - len({str(row["event_id"]) for row in rows})

    print(
        f"\n== Triton unavailable under gateway traffic ({'full' if FULL else 'ci'} size): SIGSTOP {OUTAGE_S} s, then SIGKILL"
    )
    print("  phase        requests  ok  errored (by status)")
    for phase in phases:
        total = sum(counts[phase].values())
        errored = {status: n for status, n in counts[phase].items() if status != "ok"}
        print(f"  {phase:<11}  {total:>8}  {counts[phase]['ok']:>2}  {errored or '-'}")
    for name, value in figures.items():
        print(f"  {name}: {value:.1f}" if isinstance(value, float) else f"  {name}: {value}")
    print(f"  /readyz while killed: {Counter(ready_while_killed)}")
    print(
        f"  error codes before the faults: {Counter(error_code(a) for a in traffic.answers if a.phase == 'before' and a.status != 200) or '-'}"
    )
    print(
        f"  inference_log rows: {len(rows)}, lost: {len(lost)}, duplicated (no FINAL): {duplicated}, logged twice: {len(logged_twice)}, unexpected: {len(unexpected)}"
    )

    assert leftover == [], f"tritonserver outlived the serving process: {leftover}"
    assert not orphans, f"Python-backend stubs outlived their killed tritonserver: {orphans}"
    unclean = [f"{a.phase}: {why}" for a in traffic.answers if (why := clean_error(a))]
    assert not unclean, f"{len(unclean)} unclean answers, e.g. {unclean[:5]}"
    assert counts["stopped"].get("503", 0) + counts["stopped"].get("504", 0) > 0, (
        f"SIGSTOP of tritonserver refused no request: {counts['stopped']}"
    )
    assert counts["killed"].get("503", 0) > 0, f"SIGKILL of tritonserver refused no request: {counts['killed']}"
    assert 503 in ready_while_killed and None not in ready_while_killed, (
        f"/readyz while Triton was dead (None: no answer in 2 s): {ready_while_killed}"
    )
    assert figures["restarts_after_sigstop"] <= 1, serving.log_tail()
    assert figures["tritonserver_restarts_logged"] - figures["restarts_after_sigstop"] == 1, serving.log_tail()
    for fault in ("sigstop", "sigkill"):
        # Recovered for good: a run of 200s (several per client) that lasted to the end of the phase.
        recovery, oks = figures[f"{fault}_recovery_s"], figures[f"{fault}_200s_after_recovery"]
        assert recovery is not None and recovery < RECOVERY_LIMIT_S and oks >= 2 * CLIENTS, (
            fault,
            recovery,
            oks,
            [line for line in serving.log_tail(400).splitlines() if "triton" in line],
        )
    assert (lost, duplicated, logged_twice, unexpected) == ([], 0, {}, []), (
        lost[:5],
        duplicated,
        logged_twice,
        unexpected[:5],
    )
    for request, answer in answers.items():
        [row] = by_request[request]
        if answer.status == 200:
            assert (row["inference_id"], row["status"]) == (answer.inference_id, "ok"), (answer, row)
        else:
            assert row["status"] == "error", (answer, row)
