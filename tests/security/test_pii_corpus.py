"""Personal data and secrets never reach storage, nor the topic the gateway publishes to.

A generated corpus (fixed seed) of 1,200 prompts plants every kind of personal data and secret the
redactor knows, and user ids and metadata values beside them. Each prompt travels two real paths:
- through the gateway's HTTP door (a real app key; Triton is not running, so every request ends as a
  logged 503, which is enough: the event is built and published exactly as for an answer) into the
  real `inference.logged` topic;
- as an app publishing its own raw events with contracts' EventPublisher (prompt, answer, user id,
  metadata, and a feedback comment).
The real sink stores both into embedded ClickHouse. Every stored row, and every message the gateway
put on the topic, is searched for every value its prompt planted; recall is printed per kind and
must be 1.0 for each. A clean control set travels the app path too: what changes there is a false
positive, printed and counted.

Run: .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/security/test_pii_corpus.py
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import random
import string
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
from stdnum import iban as stdnum_iban
from stdnum.us import ssn as stdnum_ssn

from contracts.events import FeedbackReceived, InferenceLogged
from contracts.http import Role
from contracts.publisher import EventPublisher
from contracts.topics import topic_for
from services.feedback.handlers import BATCH_HANDLERS
from services.feedback.service import Sink
from services.feedback.settings import FeedbackSettings
from services.feedback.store import FeedbackStore
from services.runtime.auth import Authenticator, generate_key
from services.runtime.broker import create_broker
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.consumer import DeadLetters
from services.runtime.http import create_http_app
from services.runtime.privacy import PrivacySettings, Redactor
from services.runtime.service import Runtime, subscribe_batches
from services.runtime.settings import FlywheelSettings
from services.serving.api import create_router
from services.serving.gateway import Gateway
from services.serving.inference_log import InferenceLogBuffer
from services.serving.limits import RateLimiter
from services.serving.routes import Routes
from services.serving.settings import ServingSettings
from infra.processes import free_port
from tests.fixtures.clickhouse import ClickHouseTarget
from tests.integration.test_event_bus import read_all
from tests.serving_support import smollm2_tokenizer
from tests.support import api_key
from tests.support import eventually as shared_eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SEED = 20261205
PROMPTS = 1200
CONTROLS = 200
MARKER = "Thanks, corpus."  # every prompt ends with it: scrubbing must keep the text around what it removes
eventually = partial(shared_eventually, timeout_s=300.0, interval_s=0.5)


# ---------------------------------------------------------------------------------------------- corpus


@dataclass
class Prompt:
    corpus_id: str
    text: str
    user: str
    metadata: dict[str, str]
    planted: list[tuple[str, str]] = field(default_factory=list)  # (kind, value) in text, user or metadata


def _alnum(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    while True:
        value = "".join(rng.choice(alphabet) for _ in range(n))
        if any(c.isdigit() for c in value) and any(c.isalpha() for c in value):
            return value


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _luhn_complete(rng: random.Random, prefix: str, length: int = 16) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        digits = body + check
        total = sum(
            int(d) if i % 2 == 0 else (int(d) * 2 - 9 if int(d) > 4 else int(d) * 2)
            for i, d in enumerate(reversed(digits))
        )
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


def _iban(rng: random.Random) -> str:
    country, bban = rng.choice(
        [
            ("DE", lambda: "".join(rng.choice(string.digits) for _ in range(18))),
            (
                "GB",
                lambda: (
                    "".join(rng.choice(string.ascii_uppercase) for _ in range(4))
                    + "".join(rng.choice(string.digits) for _ in range(14))
                ),
            ),
            (
                "NL",
                lambda: (
                    "".join(rng.choice(string.ascii_uppercase) for _ in range(4))
                    + "".join(rng.choice(string.digits) for _ in range(10))
                ),
            ),
            ("CH", lambda: "".join(rng.choice(string.digits) for _ in range(17))),
        ]
    )
    body = bban()
    number = country + stdnum_iban.calc_check_digits(country + "00" + body) + body
    assert stdnum_iban.is_valid(number), number
    return " ".join(number[i : i + 4] for i in range(0, len(number), 4)) if rng.random() < 0.5 else number


def _ssn(rng: random.Random) -> str:
    while True:
        area, group, serial = rng.randint(1, 899), rng.randint(1, 99), rng.randint(1, 9999)
        value = f"{area:03d}-{group:02d}-{serial:04d}"
        if stdnum_ssn.is_valid(value):
            return value


def _phone(rng: random.Random) -> str:
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    return rng.choice(
        [
            lambda: f"+44 20 {d(4)} {d(4)}",
            lambda: f"({rng.randint(201, 989)}) {rng.randint(200, 999)}-{d(4)}",
            lambda: f"+1-{rng.randint(201, 989)}-{rng.randint(200, 999)}-{d(4)}",
            lambda: f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
            lambda: f"+49 30 {d(7)}",
        ]
    )()


def _jwt(rng: random.Random) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(
        json.dumps({"sub": str(rng.randint(1, 10**9)), "name": "corpus", "iat": rng.randint(1, 2**31)}).encode()
    )
    return f"{header}.{payload}.{_b64url(rng.randbytes(32))}"


def _pem(rng: random.Random) -> str:
    kind = rng.choice(["RSA ", "EC ", "OPENSSH ", ""])
    body = base64.b64encode(rng.randbytes(180)).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{lines}\n-----END {kind}PRIVATE KEY-----"


def _email(rng: random.Random) -> str:
    first, last = (
        rng.choice(["ann", "bob", "chen", "dana", "emil", "farah"]),
        rng.choice(["lee", "smith", "okafor", "novak", "garcia"]),
    )
    return f"{first}.{last}{rng.randint(1, 9999)}@{rng.choice(['example.com', 'mail.example.org', 'acme.co.uk'])}"


def _ipv6(rng: random.Random) -> str:
    return str(ipaddress.IPv6Address(rng.getrandbits(128)))


def _card(r: random.Random) -> str:
    """One generated card number, written in one of the ways people write them."""
    number = _luhn_complete(r, r.choice(["4", "51", "55"]))
    groups = [number[i : i + 4] for i in range(0, 16, 4)]
    return r.choice([number, " ".join(groups), "-".join(groups)])


def _ssn_written(r: random.Random) -> str:
    ssn = _ssn(r)
    return r.choice([ssn, ssn.replace("-", " "), "SSN: " + ssn.replace("-", "")])


# kind -> (value generator, sentences it is planted in)
KINDS: dict[str, tuple[Callable[[random.Random], str], list[str]]] = {
    "email": (_email, ["Please send the invoice to {v}.", "My login is {v} and it stopped working."]),
    "phone": (_phone, ["Call me back on {v} after six.", "The courier has my number {v}."]),
    "card": (_card, ["My card {v} was charged twice.", "Refund to card number {v} please."]),
    "iban": (_iban, ["Wire the refund to IBAN {v} today.", "My account is {v}, can you confirm?"]),
    "ssn": (_ssn_written, ["For the tax form, my SSN is {v}.", "Verify me: {v}."]),
    "ipv4": (
        lambda r: f"{r.randint(1, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}",
        ["My router at {v} drops packets.", "Whitelist {v} for me."],
    ),
    "ipv6": (_ipv6, ["The server {v} refuses connections.", "My address is {v} now."]),
    "openai_key": (
        lambda r: r.choice(
            [
                f"sk-proj-{_alnum(r, 48, string.ascii_letters + string.digits + '_-')}",
                f"sk-{_alnum(r, 20)}T3BlbkFJ{_alnum(r, 20)}",
                f"sk-svcacct-{_alnum(r, 40)}",
            ]
        ),
        ["Why does my key {v} return 401?", "OPENAI_API_KEY={v} is set in my env."],
    ),
    "anthropic_key": (
        lambda r: f"sk-ant-api03-{_alnum(r, 93, string.ascii_letters + string.digits + '_-')}AA",
        ["Claude rejects {v}, help.", "export ANTHROPIC_API_KEY={v}"],
    ),
    "aws_access_key_id": (
        lambda r: (
            r.choice(["AKIA", "ASIA"]) + "".join(r.choice(string.ascii_uppercase + string.digits) for _ in range(16))
        ),
        ["IAM user key {v} is denied.", "aws_access_key_id={v}"],
    ),
    "aws_secret_key": (
        lambda r: _alnum(r, 40, string.ascii_letters + string.digits + "/+"),
        ["aws_secret_access_key = {v}", 'My AWS secret key: "{v}"'],
    ),
    "github_token": (
        lambda r: r.choice([f"ghp_{_alnum(r, 36)}", f"github_pat_{_alnum(r, 22)}_{_alnum(r, 59)}"]),
        ["git push fails with token {v}.", "GH_TOKEN={v}"],
    ),
    "slack_token": (
        lambda r: (
            f"{r.choice(['xoxb', 'xoxp'])}-{r.randint(10**11, 10**12 - 1)}-{r.randint(10**12, 10**13 - 1)}-{_alnum(r, 24)}"
        ),
        ["The bot token {v} was revoked?", "SLACK_TOKEN={v}"],
    ),
    "stripe_key": (
        lambda r: f"sk_live_{_alnum(r, r.choice([24, 99]))}",
        ["Stripe says {v} is invalid.", "Use {v} for payments."],
    ),
    "google_api_key": (
        lambda r: "AIza" + _alnum(r, 35, string.ascii_letters + string.digits + "_-"),
        ["Maps key {v} hits quota.", "key={v}"],
    ),
    "jwt": (_jwt, ["My session token is {v}.", "Authorization: Bearer {v}"]),
    "private_key": (_pem, ["Here is my key:\n{v}\nwhy does ssh refuse it?", "{v}"]),
    "flywheel_key": (lambda r: generate_key()[0], ["My Flywheel key {v} gets 403.", "FLYWHEEL_API_KEY={v}"]),
    "password": (
        lambda r: _alnum(r, r.randint(8, 16), string.ascii_letters + string.digits + "!#%&*"),
        ["login with password={v} fails", "db_password: {v}", "api_key: {v}"],
    ),
}
IDENTITY_KINDS = ("user_id", "metadata")
CLEAN = [
    "How long is the warranty on the Nimbus {n} kettle?",
    "Our Q{q} revenue grew {n}% to 4.5 million; see page {n}.",
    "Order #{code} ships on 2026-{m:02d}-{d:02d} at 09:30 from warehouse {n}.",
    "Set max_tokens={n} and temperature 0.{q} for the summary.",
    "Version {q}.{n}.{m} fixed bug {n}; the build hash is {hexhash}.",
    "Summarise chapter {n} of the manual in {q} bullet points.",
    "The meeting moved to room {n}, floor {q}, at 14:{m:02d}.",
    "Translate 'good morning' into {q} languages, please.",
]


def build_corpus(rng: random.Random) -> list[Prompt]:
    kinds = list(KINDS)
    prompts = []
    for index in range(PROMPTS):
        chosen = [kinds[index % len(kinds)], *rng.sample(kinds, rng.randint(0, 2))]
        pieces, planted = [], []
        for kind in dict.fromkeys(chosen):
            generate, sentences = KINDS[kind]
            value = generate(rng)
            pieces.append(rng.choice(sentences).format(v=value))
            planted.append((kind, value.removeprefix("SSN: ")))
        user = rng.choice([_email(rng), f"customer-{rng.getrandbits(40):010x}"])
        identity, contact = f"cust-{rng.getrandbits(40):010x}", _email(rng)
        metadata = {
            "corpus_id": f"c{index}",
            "customer_id": identity,
            "email": contact,
            "note": f"call {(phone := _phone(rng))}",
        }
        planted += [("user_id", user), ("metadata", identity), ("metadata", contact), ("phone", phone)]
        prompts.append(Prompt(f"c{index}", " ".join(pieces) + " " + MARKER, user, metadata, planted))
    return prompts


def build_controls(rng: random.Random) -> list[str]:
    return [
        rng.choice(CLEAN).format(
            n=rng.randint(1, 999),
            q=rng.randint(1, 4),
            m=rng.randint(1, 12),
            d=rng.randint(1, 28),
            code=_alnum(rng, 8, string.ascii_uppercase + string.digits),
            hexhash=f"{rng.getrandbits(64):016x}",
        )
        for _ in range(CONTROLS)
    ]


# ---------------------------------------------------------------------------------------------- paths


@pytest.fixture
def clickhouse(chdb_target: ClickHouseTarget) -> ClickHouseStore:
    store = chdb_target.open()
    store.migrate()
    return store


@asynccontextmanager
async def running_sink(
    settings: FlywheelSettings, clickhouse: ClickHouseStore, redactor: Redactor
) -> AsyncIterator[None]:
    """The feedback service's sink, as create_app wires it, on the real broker."""
    broker = create_broker(settings, client_id="corpus-sink")
    subscribe_batches(
        broker,
        BATCH_HANDLERS,
        Sink(FeedbackStore(lambda: clickhouse), redactor),
        group="feedback",
        dead_letters=DeadLetters(broker),
        topic_prefix=settings.topic_prefix,
        max_retries=1,
        **FeedbackSettings(batch_max_records=1000, batch_max_wait_ms=200, batch_min_bytes=1).batch_options(),
    )
    async with broker:
        await broker.start()
        yield


async def through_the_gateway(
    settings: FlywheelSettings, redactor: Redactor, corpus: list[Prompt], tokenizer_dir: Path
) -> None:
    """Every prompt as a chat completion through the gateway's door; Triton is down, so each one is a logged 503."""
    runtime = Runtime(settings, client_id="corpus-serving")
    await runtime.broker.start()
    buffer = InferenceLogBuffer(runtime.bus("serving"), capacity=len(corpus) + 10, redactor=redactor)
    await buffer.start()
    routes = Routes()
    routes.add_model("tiny")
    gateway = Gateway(
        routes=routes,
        tokenizer=smollm2_tokenizer(tokenizer_dir),
        triton_grpc_url=f"127.0.0.1:{free_port()}",
        settings=ServingSettings(triton_timeout_s=10),
        log_buffer=buffer,
        loaded_adapters=set,
    )
    router = create_router(
        lambda: gateway,
        guard=Authenticator.for_settings(settings).require(Role.app),
        limiter=RateLimiter(rate_per_s=10_000, burst=10_000),
    )
    headers = {"Authorization": f"Bearer {api_key(settings, Role.app)}"}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_http_app("corpus-gateway", routers=[router])),
            base_url="http://gateway",
            headers=headers,
        ) as http:
            for prompt in corpus:
                body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": prompt.text}],
                    "max_tokens": 4,
                    "user": prompt.user,
                    "metadata": prompt.metadata,
                }
                answer = await http.post("/v1/chat/completions", json=body)
                assert answer.status_code == 503 and answer.json()["error"]["code"] == "triton_unavailable", answer.text
    finally:
        await gateway.close()
        await buffer.stop(timeout_s=120)
        await runtime.broker.stop()
        runtime.close()


async def as_an_app(settings: FlywheelSettings, corpus: list[Prompt], controls: list[str]) -> None:
    """An app that publishes its own raw events, as examples/app_publishes_events.py does."""
    async with EventPublisher(
        settings.resolved_kafka_bootstrap(), producer="corpus-app", topic_prefix=settings.topic_prefix
    ) as publisher:
        events: list[InferenceLogged | FeedbackReceived] = []
        for prompt in corpus:
            events.append(
                InferenceLogged(
                    inference_id=f"app-{prompt.corpus_id}",
                    model_name="tiny",
                    endpoint="app",
                    user_id=prompt.user,
                    metadata=prompt.metadata,
                    input_messages=[{"role": "user", "content": prompt.text}],
                    input_text=prompt.text,
                    output_text=f"You wrote: {prompt.text}",
                )
            )
            events.append(
                FeedbackReceived(
                    inference_id=f"app-{prompt.corpus_id}",
                    thumbs="down",
                    comment=f"It ignored {prompt.text}"[:8000],
                    actor=prompt.user,
                )
            )
        for index, text in enumerate(controls):
            events.append(
                InferenceLogged(
                    inference_id=f"control-{index}",
                    model_name="tiny",
                    endpoint="app",
                    input_text=text,
                    output_text=text,
                    metadata={"corpus_id": f"control-{index}"},
                )
            )
        for start in range(0, len(events), 200):
            await asyncio.gather(*(publisher.publish(event) for event in events[start : start + 200]))


# ---------------------------------------------------------------------------------------------- test


def leaks(planted: list[tuple[str, str]], texts: list[str]) -> list[tuple[str, str]]:
    """The planted values still present in any of `texts` (compared also without separators, so a
    value cut into pieces by partial redaction is still found)."""
    compact = [text.replace(" ", "").replace("-", "") for text in texts]
    found = []
    for kind, value in planted:
        bare = value.replace(" ", "").replace("-", "")
        if any(value in text for text in texts) or (len(bare) >= 8 and any(bare in text for text in compact)):
            found.append((kind, value))
    return found


def report(title: str, planted: Counter[str], leaked: Counter[str]) -> None:
    print(f"\n{title}\n  {'kind':<20}{'planted':>9}{'leaked':>8}{'recall':>9}")
    for kind in sorted(planted):
        print(f"  {kind:<20}{planted[kind]:>9}{leaked[kind]:>8}{(planted[kind] - leaked[kind]) / planted[kind]:>9.3f}")


async def test_no_planted_personal_data_or_secret_is_stored_or_published_by_the_gateway(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rng = random.Random(SEED)
    corpus, controls = build_corpus(rng), build_controls(rng)
    planted_kinds = Counter(kind for prompt in corpus for kind, _ in prompt.planted)
    assert set(planted_kinds) == set(KINDS) | set(IDENTITY_KINDS) and len(corpus) >= 1000
    # The search below finds every planted value in the raw prompt: a leak could not hide from it.
    assert all(
        leaks(prompt.planted, [prompt.text, prompt.user, json.dumps(prompt.metadata)]) == prompt.planted
        for prompt in corpus
    )

    redactor = PrivacySettings(salt="corpus-salt").redactor()
    async with running_sink(settings, clickhouse, redactor):
        await through_the_gateway(settings, redactor, corpus, tmp_path_factory.mktemp("tokenizer"))
        await as_an_app(settings, corpus, controls)
        expected = 2 * len(corpus) + len(controls)
        await eventually(
            lambda: (
                clickhouse.query("SELECT count() AS n FROM inference_log")[0]["n"] >= expected
                and clickhouse.query("SELECT count() AS n FROM feedback")[0]["n"] >= len(corpus)
            ),
            what=f"{expected} inferences and {len(corpus)} feedbacks stored",
        )

    by_id = {prompt.corpus_id: prompt for prompt in corpus}
    rows = clickhouse.query(
        "SELECT inference_id, endpoint, user_id, input_messages, input_text, output_text, error, toJSONString(metadata) AS metadata FROM inference_log"
    )
    feedback = {
        row["inference_id"]: row
        for row in clickhouse.query("SELECT inference_id, comment, correction, actor, tags FROM feedback")
    }
    topic = await read_all(
        settings.resolved_kafka_bootstrap(),
        topic_for(InferenceLogged, settings.topic_prefix),
        expected=expected,
        timeout_s=60,
    )
    published_by_gateway = [
        json.loads(record.value) for record in topic if json.loads(record.value)["producer"] == "serving"
    ]
    assert len(published_by_gateway) == len(corpus), "one inference.logged per gateway request"

    stored, on_topic = {"gateway": Counter[str](), "app": Counter[str]()}, Counter[str]()
    seen: Counter[str] = Counter()
    false_positives = []
    for row in rows:
        corpus_id = json.loads(row["metadata"])["corpus_id"]
        texts = [
            str(row[column])
            for column in ("user_id", "input_messages", "input_text", "output_text", "error", "metadata")
        ]
        if corpus_id.startswith("control-"):
            index = int(corpus_id.removeprefix("control-"))
            if (row["input_text"], row["output_text"]) != (controls[index], controls[index]):
                false_positives.append((controls[index], row["input_text"]))
            continue
        prompt = by_id[corpus_id]
        path = "gateway" if row["endpoint"] == "chat.completions" else "app"
        if path == "app":
            texts += [
                str(feedback[row["inference_id"]][column]) for column in ("comment", "correction", "actor", "tags")
            ]
        seen[path] += 1
        stored[path].update(kind for kind, _ in leaks(prompt.planted, texts))
        assert MARKER in row["input_text"], "the text around what was removed is kept"
        if any(kind == "ssn" for kind, _ in prompt.planted):
            assert "[SSN]" in row["input_text"], f"an SSN is labelled SSN: {row['input_text']}"
    for message in published_by_gateway:
        payload = message["payload"]
        on_topic.update(
            kind for kind, _ in leaks(by_id[payload["metadata"]["corpus_id"]].planted, [json.dumps(payload)])
        )
    assert seen == {"gateway": len(corpus), "app": len(corpus)}

    report(f"stored by the sink, gateway path ({len(corpus)} prompts)", planted_kinds, stored["gateway"])
    report(
        f"stored by the sink, app publishing raw events ({len(corpus)} prompts, with feedback)",
        planted_kinds,
        stored["app"],
    )
    report(f"published on inference.logged by the gateway ({len(corpus)} messages)", planted_kinds, on_topic)
    print(f"\nclean control set: {len(false_positives)} of {len(controls)} prompts changed (false positives)")
    for original, scrubbed in false_positives[:10]:
        print(f"  {original!r} -> {scrubbed!r}")

    assert stored["gateway"] == Counter() and stored["app"] == Counter() and on_topic == Counter(), (stored, on_topic)
    assert false_positives == [], false_positives


async def test_a_poison_message_is_dead_lettered_without_its_personal_data(
    settings: FlywheelSettings, topics: str, clickhouse: ClickHouseStore
) -> None:
    from aiokafka import AIOKafkaProducer

    from contracts.topics import dlq_for

    email, key, user = "zoe.quinn@example.com", "sk-proj-Zq9xW8vU7tS6rR5qP4oN3mL2kJ1iH0gF", "customer-0042"
    # Valid JSON that is not a valid event (no model_name): the sink dead-letters it.
    poison = json.dumps(
        {
            "event_id": "9b2f5a1e-1111-4aaa-8bbb-0123456789ab",
            "event_type": "inference.logged",
            "payload": {"user_id": user, "input_text": f"I am {email}, key {key}"},
        }
    ).encode()
    binary = b"\xff\xfe" + email.encode()
    producer = AIOKafkaProducer(bootstrap_servers=settings.resolved_kafka_bootstrap(), acks="all")
    await producer.start()
    try:
        for value in (poison, binary):
            await producer.send_and_wait(
                topic_for(InferenceLogged, settings.topic_prefix),
                value,
                key=b"poison",
                headers=[("trace", f"from {email}".encode())],
            )
    finally:
        await producer.stop()
    async with running_sink(settings, clickhouse, PrivacySettings().redactor()):
        dead = await read_all(
            settings.resolved_kafka_bootstrap(),
            dlq_for(topic_for(InferenceLogged, settings.topic_prefix)),
            expected=2,
            timeout_s=90,
        )
    assert len(dead) == 2 and all(record.key == b"poison" for record in dead)
    for record, original in zip(dead, (poison, binary), strict=True):
        headers = {name: value.decode() for name, value in record.headers}
        everything = record.value + json.dumps(headers).encode()
        assert email.encode() not in everything and key.encode() not in everything and user.encode() not in everything
        assert (
            headers["x-flywheel-value-bytes"] == str(len(original))
            and headers["x-flywheel-original-header-trace"] == "from [EMAIL]"
        )
        assert (
            headers["x-flywheel-error"].startswith("invalid event:")
            and headers["x-flywheel-consumer-group"] == "feedback"
        )
    text_letter, binary_letter = dead
    assert {name: value.decode() for name, value in text_letter.headers}["x-flywheel-value"] == "scrubbed"
    assert json.loads(text_letter.value)["payload"] == {
        "user_id": "[USER]",
        "input_text": "I am [EMAIL], key [OPENAI_KEY]",
    }
    assert (
        binary_letter.value == b""
        and {name: value.decode() for name, value in binary_letter.headers}["x-flywheel-value"] == "withheld"
    )
