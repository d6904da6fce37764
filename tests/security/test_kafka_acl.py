"""Kafka has identities and permissions: against a real broker started by `LocalKafka(secure=True)`
(SASL/SCRAM-SHA-512, StandardAuthorizer, the ACLs of infra/kafka_acls.py), one for this module.

A forged control event from the app principal is refused by Kafka itself and leaves the topic empty;
a wrong password is refused at authentication; each principal produces exactly what the table lets it;
the registry, built with its factory, consumes, dead-letters and publishes as its own principal; and the
apps' EventPublisher publishes with SASL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import GroupAuthorizationFailedError, KafkaConnectionError, TopicAuthorizationFailedError

from contracts.envelope import wrap
from contracts.events import InferenceLogged, StageChanged
from contracts.examples import example_events
from contracts.publisher import EventPublisher, KafkaSecurity, encode
from contracts.topics import EVENT_TYPES, all_topics, dlq_for, topic_for
from infra.kafka_acls import (
    APP,
    ADMIN_PRINCIPAL,
    PRINCIPAL_NAMES,
    PROCESS,
    SERVICE_PRINCIPALS,
    Principal,
    may_produce,
    service_principal,
    table_markdown,
)
from infra.local_kafka import LocalKafka
from infra.processes import free_port
from services.runtime.broker import check_reachable, ensure_topics
from services.runtime.errors import ConfigurationError
from services.runtime.service import Runtime, build_process
from services.runtime.settings import PROCESS_PRINCIPAL, FlywheelSettings
from tests.fixtures import running
from tests.integration.test_event_bus import read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]

ADMIN_KEY = "fw_boot_test-admin-secret-0123456789"
EXAMPLES = example_events()


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A broker of this module's own, stopped by pid even when a test fails (atexit: when the session dies)."""
    kafka = LocalKafka(
        tmp_path_factory.mktemp("secure-kafka-home"), FlywheelSettings().cache, port=free_port(), secure=True
    )
    with running(kafka, timeout=180, failure="the secure local broker did not start"):
        yield kafka


@pytest.fixture(scope="module")
def bootstrap(secure_kafka: LocalKafka) -> str:
    status = secure_kafka.status()
    assert status.running and status.address
    return status.address


async def end_offset(bootstrap: str, admin: KafkaSecurity, topic: str) -> int:
    """How many records `topic` has ever received (all its partitions), read as the admin."""
    # Subscribed, so that start() fetches the topic's metadata; nothing is read.
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **admin.client_options()
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert partitions, f"no partitions for {topic}"
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


async def read_records(
    bootstrap: str, security: KafkaSecurity, topic: str, expected: int, timeout_s: float = 30.0
) -> list:
    return await read_all(bootstrap, topic, expected, timeout_s, security=security)


def record_of(event_type: str, producer: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return encode(wrap(EXAMPLES[EVENT_TYPES[event_type]], producer=producer))


async def try_produce(producer: AIOKafkaProducer, event_type: str, name: str) -> bool:
    """Whether the broker accepted one record on `event_type`'s topic; only an authorisation refusal is False."""
    key, value, headers = record_of(event_type, name)
    try:
        await producer.send_and_wait(topic_for(event_type), value=value, key=key, headers=headers)
    except TopicAuthorizationFailedError:
        return False
    return True


def producer_for(bootstrap: str, security: KafkaSecurity) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        request_timeout_ms=15_000,
        **security.client_options(),
    )


async def test_the_app_cannot_forge_a_stage_change_but_can_log_an_inference(
    secure_kafka: LocalKafka, bootstrap: str
) -> None:
    admin = secure_kafka.admin_security()
    stage_topic = topic_for(StageChanged)
    before = await end_offset(bootstrap, admin, stage_topic)
    forged = wrap(
        StageChanged(
            model_name="smol",
            adapter_version=1,
            from_stage="staging",
            to_stage="production",
            actor="mallory",
            reason="forged",
        ),
        producer="support-bot",
    )
    key, value, headers = encode(forged)

    producer = producer_for(bootstrap, secure_kafka.credentials("app"))
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(stage_topic, value=value, key=key, headers=headers)
        logged = wrap(EXAMPLES[InferenceLogged], producer="support-bot")
        key, value, headers = encode(logged)
        await producer.send_and_wait(topic_for(InferenceLogged), value=value, key=key, headers=headers)
    finally:
        await producer.stop()

    assert await end_offset(bootstrap, admin, stage_topic) == before, "the refused stage.changed reached the topic"
    stored = await read_records(bootstrap, admin, topic_for(InferenceLogged), expected=10_000, timeout_s=3)
    assert str(logged.event_id) in {json.loads(r.value)["event_id"] for r in stored}


async def test_a_wrong_password_is_refused_at_authentication(
    secure_kafka: LocalKafka, bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = KafkaSecurity(
        protocol="SASL_PLAINTEXT", username="app", password="not-" + secure_kafka.credentials("app").password
    )
    producer = producer_for(bootstrap, wrong)
    # aiokafka logs the broker's answer and raises only "Unable to bootstrap".
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError):
        await producer.start()
    await producer.stop()
    assert any(
        "SaslAuthenticationFailed" in record.getMessage() and "invalid credentials" in record.getMessage()
        for record in caplog.records
    ), caplog.text

    # What a service reports at start: the principal and the settings to fix, no password.
    with pytest.raises(ConfigurationError) as error:
        await check_reachable(bootstrap, timeout_s=15, security=wrong)
    assert "refused principal 'app'" in str(error.value) and "FLYWHEEL_KAFKA_SASL_PASSWORD" in str(error.value)
    assert wrong.password not in str(error.value) and wrong.password not in repr(wrong)

    # Without credentials at all, neither the SASL listener nor the controller's talks to a client.
    controller = f"127.0.0.1:{json.loads(secure_kafka.state_file.read_text())['controller_port']}"
    for address in (bootstrap, controller):
        with pytest.raises(ConfigurationError):
            await check_reachable(address, timeout_s=5)
    assert "ANONYMOUS" not in secure_kafka.config_file.read_text()


@pytest.mark.parametrize("principal", [*SERVICE_PRINCIPALS, APP, PROCESS[0]], ids=lambda p: p.name)
async def test_each_principal_produces_exactly_the_topics_the_table_grants(
    secure_kafka: LocalKafka, bootstrap: str, principal: Principal
) -> None:
    expected = {event_type: may_produce(principal.name, topic_for(event_type)) for event_type in sorted(EVENT_TYPES)}
    assert any(expected.values()) and not all(expected.values()), (
        f"{principal.name}: a table row that grants all or nothing tests nothing"
    )
    producer = producer_for(bootstrap, secure_kafka.credentials(principal.name))
    await producer.start()
    try:
        actual = {event_type: await try_produce(producer, event_type, principal.name) for event_type in expected}
    finally:
        await producer.stop()
    assert actual == expected


def test_the_table_matches_the_architecture_on_who_changes_state() -> None:
    # Only the registry may publish the state every replica replays; nobody but the admin sends commands to serving.
    for event_type in (
        "stage.changed",
        "prompt.published",
        "adapter.registered",
        "model.registered",
        "dataset.published",
    ):
        assert [p.name for p in (*SERVICE_PRINCIPALS, APP) if may_produce(p.name, event_type)] == ["registry"], (
            event_type
        )
    assert [p.name for p in (*SERVICE_PRINCIPALS, APP) if may_produce(p.name, "deployment.requested")] == []
    assert [p.name for p in (*SERVICE_PRINCIPALS, APP) if may_produce(p.name, "evaluation.completed")] == ["evaluator"]
    assert (
        set(APP.produces) <= {"inference.logged", "feedback.received", "span.logged"}
        and not APP.consumes
        and not APP.follows
    )
    # The joint principal of `flywheel up` can do what the six can, and nothing more.
    assert {(p.group, p.produces, p.consumes, p.follows) for p in PROCESS} == {
        (p.group, p.produces, p.consumes, p.follows) for p in SERVICE_PRINCIPALS
    }


async def test_a_consumer_reads_only_in_its_own_group_and_only_what_it_consumes(
    secure_kafka: LocalKafka, bootstrap: str
) -> None:
    registry = secure_kafka.credentials("registry").client_options()
    own = AIOKafkaConsumer(
        topic_for("training.completed"),
        bootstrap_servers=bootstrap,
        group_id="registry",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **registry,
    )
    await own.start()
    try:
        await own.getmany(timeout_ms=2000)  # joins its group: refused would raise here
    finally:
        await own.stop()

    for topic, group, refusal in (
        (topic_for("training.completed"), "trainer", GroupAuthorizationFailedError),  # another service's group
        (
            topic_for("training.requested"),
            "registry",
            TopicAuthorizationFailedError,
        ),  # a topic the registry does not consume
    ):
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **registry,
        )
        try:
            with pytest.raises(refusal):  # at the group join in start(), or at the first fetch
                await consumer.start()
                for _ in range(20):
                    await consumer.getmany(timeout_ms=500)
        finally:
            await consumer.stop()


@pytest.mark.parametrize("principal", [*SERVICE_PRINCIPALS, APP], ids=lambda p: p.name)
async def test_each_principal_reads_what_its_row_says_and_nothing_outside_it(
    secure_kafka: LocalKafka, bootstrap: str, principal: Principal
) -> None:
    options = secure_kafka.credentials(principal.name).client_options()
    # Everything it consumes, in its group, at once (one join); what it follows, outside any group.
    for topics, group in ((principal.consumes, principal.group), (principal.follows, None)):
        if not topics:
            continue
        consumer = AIOKafkaConsumer(
            *(topic_for(t) for t in topics),
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **options,
        )
        await consumer.start()
        try:
            for _ in range(40):  # a refused group or topic raises here; an allowed one is assigned its partitions
                await consumer.getmany(timeout_ms=500)
                if {tp.topic for tp in consumer.assignment()} == {topic_for(t) for t in topics}:
                    break
            assert {tp.topic for tp in consumer.assignment()} == {topic_for(t) for t in topics}, (
                f"{principal.name}: {consumer.assignment()}"
            )
        finally:
            await consumer.stop()
    readable = set(principal.consumes) | set(principal.follows)
    outside = sorted(set(EVENT_TYPES) - readable)[0]
    consumer = AIOKafkaConsumer(
        topic_for(outside),
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **options,
    )
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await consumer.start()
            for _ in range(20):
                await consumer.getmany(timeout_ms=500)
    finally:
        await consumer.stop()


def test_credentials_are_owner_only_and_each_principal_has_its_own(secure_kafka: LocalKafka) -> None:
    mode = stat.S_IMODE(secure_kafka.credentials_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert stat.S_IMODE(secure_kafka.config_file.stat().st_mode) == 0o600  # holds the admin's password
    passwords = json.loads(secure_kafka.credentials_file.read_text())["principals"]
    assert set(passwords) == set(PRINCIPAL_NAMES) and len(set(passwords.values())) == len(passwords)


def test_a_process_picks_its_principal_from_the_local_credentials(secure_kafka: LocalKafka, tmp_path: Path) -> None:
    # `flywheel run registry` connects as the registry, a process of several services as the joint principal;
    # both from the file `flywheel infra up --secure` wrote, with no FLYWHEEL_KAFKA_SASL_* set.
    home = secure_kafka.dir.parents[1]
    settings = FlywheelSettings(
        home=home,
        kafka_bootstrap=None,
        kafka_sasl_username=None,
        kafka_sasl_password=None,
        kafka_security_protocol=None,
    )
    assert Runtime(settings, client_id="flywheel-registry").kafka_security.username == "registry"
    assert Runtime(settings, client_id="flywheel").kafka_security.username == PROCESS_PRINCIPAL
    assert Runtime(settings, client_id="flywheel-feedback-monitor").kafka_security.username == PROCESS_PRINCIPAL
    assert settings.resolved_kafka_security(ADMIN_PRINCIPAL).username == ADMIN_PRINCIPAL


@pytest.fixture
async def registry_door(secure_kafka: LocalKafka, bootstrap: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The registry built by its factory, connecting as its principal through explicit settings (the docker-compose way)."""
    from services.registry.app import create_app

    credentials = secure_kafka.credentials("registry")
    settings = FlywheelSettings(
        home=tmp_path / "home",
        kafka_bootstrap=bootstrap,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username=credentials.username,
        kafka_sasl_password=credentials.password,
        bootstrap_admin_key=ADMIN_KEY,
        consumer_max_retries=0,
        shutdown_grace_s=1.0,
    )
    app, runtime = build_process(settings, [create_app], title="flywheel-registry")
    assert runtime.kafka_security.username == "registry"
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://registry", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as client:
            yield client


async def test_the_registry_consumes_dead_letters_and_publishes_as_its_own_principal(
    secure_kafka: LocalKafka, bootstrap: str, registry_door: httpx.AsyncClient
) -> None:
    admin = secure_kafka.admin_security()
    prompt = f"acl-{uuid.uuid4().hex[:8]}"
    created = await registry_door.post("/registry/v1/prompts", json={"name": prompt, "template": "Answer: {question}"})
    assert created.status_code == 201, created.text

    # A poison training.completed from the trainer's principal: the registry reads it in its group and
    # can write only the dead letter of what it consumes.
    poison_topic = topic_for("training.completed")
    trainer = producer_for(bootstrap, secure_kafka.credentials("trainer"))
    await trainer.start()
    try:
        await trainer.send_and_wait(poison_topic, value=b'{"not": "an envelope"}', key=prompt.encode())
    finally:
        await trainer.stop()

    # Waited for by its key, not by the dead-letter topic's end offset: the registry's new group also reads
    # the training.completed records earlier tests left (their adapters are nowhere) and dead-letters those
    # in its own time, so the topic can grow by one of them first.
    def ours(record: ConsumerRecord) -> bool:
        return record.key == prompt.encode() and dict(record.headers).get("x-flywheel-consumer-group") == b"registry"

    deadline = asyncio.get_running_loop().time() + 60
    while not any(map(ours, await read_records(bootstrap, admin, dlq_for(poison_topic), expected=10_000, timeout_s=2))):
        assert asyncio.get_running_loop().time() < deadline, "the registry never dead-lettered the poison record"

    published = await read_records(bootstrap, admin, topic_for("prompt.published"), expected=10_000, timeout_s=5)
    mine = [json.loads(r.value) for r in published if json.loads(r.value)["payload"]["prompt_name"] == prompt]
    assert len(mine) == 1 and mine[0]["producer"] == "registry"


async def test_the_apps_event_publisher_publishes_with_sasl_and_is_refused_elsewhere(
    secure_kafka: LocalKafka, bootstrap: str
) -> None:
    app = secure_kafka.credentials("app")
    event = EXAMPLES[InferenceLogged].model_copy(update={"inference_id": f"inf-{uuid.uuid4().hex[:12]}"})
    async with EventPublisher(
        bootstrap, producer="support-bot", sasl_username=app.username, sasl_password=app.password
    ) as publisher:
        envelope = await publisher.publish(event)
        with pytest.raises(TopicAuthorizationFailedError):
            await publisher.publish(EXAMPLES[StageChanged])
    stored = await read_records(
        bootstrap, secure_kafka.admin_security(), topic_for(InferenceLogged), expected=10_000, timeout_s=3
    )
    assert str(envelope.event_id) in {json.loads(r.value)["event_id"] for r in stored}


def test_the_service_principal_lookup_names_the_services() -> None:
    assert service_principal("serving").follows and not service_principal("serving").consumes
    with pytest.raises(KeyError):
        service_principal("app")


async def test_only_the_admin_creates_topics_and_a_refusal_is_not_reported_as_created(
    secure_kafka: LocalKafka, bootstrap: str
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    with pytest.raises(ConfigurationError, match="refused to create .* as 'registry' \\(TopicAuthorizationFailedError"):
        await ensure_topics(bootstrap, prefix, security=secure_kafka.credentials("registry"))
    created = await ensure_topics(bootstrap, prefix, security=secure_kafka.admin_security())
    assert len(created) == len(all_topics(prefix))


def test_docker_compose_gives_each_service_its_own_principal_and_the_broker_every_credential() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    for principal in SERVICE_PRINCIPALS:
        env = services[principal.name]["environment"]
        assert (
            env["FLYWHEEL_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
            and env["FLYWHEEL_KAFKA_SASL_USERNAME"] == principal.name
        ), principal.name
        assert f"KAFKA_{principal.name.upper()}_PASSWORD" in env["FLYWHEEL_KAFKA_SASL_PASSWORD"]
    for init_step in ("topics", "kafka-acls"):
        assert services[init_step]["environment"]["FLYWHEEL_KAFKA_SASL_USERNAME"] == ADMIN_PRINCIPAL
    script = (REPO / "infra" / "kafka" / "compose-kafka.sh").read_text()
    broker_env = services["kafka"]["environment"]
    for name in PRINCIPAL_NAMES:
        assert f'$(scram {name} "$KAFKA_{name.upper()}_PASSWORD")' in script, name
        assert f"KAFKA_{name.upper()}_PASSWORD" in broker_env, name
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer" in script
    assert "allow.everyone.if.no.acl.found=false" in script
    assert "super.users=User:admin;User:controller" in script and "ANONYMOUS" not in script


def test_infra_up_secure_from_the_cli_never_prints_a_password_and_a_secure_home_stays_secure(tmp_path: Path) -> None:
    flywheel = Path(sys.executable).with_name("flywheel")
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLYWHEEL_KAFKA_")}
    env["FLYWHEEL_HOME"] = str(tmp_path)

    def infra(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(flywheel), "infra", *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )

    try:
        started = infra("up", "--secure", "--port", str(free_port()))
        assert started.returncode == 0, started.stderr
        kafka = LocalKafka(tmp_path, tmp_path)
        passwords = json.loads(kafka.credentials_file.read_text())["principals"]
        assert (
            "SASL_PLAINTEXT (SCRAM-SHA-512) with ACLs" in started.stdout
            and str(kafka.credentials_file) in started.stdout
        )
        assert "SASL/SCRAM with ACLs" in infra("status").stdout
        again = infra("up")  # no flag: the running broker is reused as it is
        assert again.returncode == 0 and "already running" in again.stdout, again.stderr
        # The admin's credentials come from the home's file: topics exist already, ACLs are granted again.
        topics = infra("topics")
        assert topics.returncode == 0 and " 0 created" in topics.stdout, topics.stderr
        granted = infra("acls")
        assert granted.returncode == 0 and "granted" in granted.stdout, granted.stderr
        assert infra("down").returncode == 0
        # Started again without --secure, a home made secure once is secure again.
        restarted = infra("up")
        assert (
            restarted.returncode == 0
            and json.loads((tmp_path / "infra" / "kafka" / "state.json").read_text())["security_protocol"]
            == "SASL_PLAINTEXT"
        )
        printed = started.stdout + started.stderr + again.stdout + topics.stdout + granted.stdout + restarted.stdout
        assert not [name for name, password in passwords.items() if password in printed]
    finally:
        LocalKafka(tmp_path, tmp_path).stop()


async def test_one_process_of_several_services_runs_as_the_joint_principal(
    secure_kafka: LocalKafka, chdb_home: Path, tmp_path: Path
) -> None:
    """`flywheel up` against `flywheel infra up --secure`: no FLYWHEEL_KAFKA_SASL_*, one connection as `flywheel`;
    the registry publishes, the feedback door publishes and its sink consumes in group `feedback`."""
    from services.feedback.app import create_app as feedback_app
    from services.registry.app import create_app as registry_app

    # chDB opens one data directory per process (the session's): that home gets the secure broker's
    # infra state, as `flywheel infra up --secure` would have left it there, for this test only.
    recorded = chdb_home / "infra" / "kafka"
    recorded.parent.mkdir(parents=True, exist_ok=True)
    recorded.symlink_to(secure_kafka.dir, target_is_directory=True)
    try:
        settings = FlywheelSettings(
            home=chdb_home,
            database_url=f"sqlite:///{tmp_path / 'registry.db'}",
            kafka_bootstrap=None,
            kafka_security_protocol=None,
            kafka_sasl_username=None,
            kafka_sasl_password=None,
            bootstrap_admin_key=ADMIN_KEY,
            consumer_max_retries=0,
            shutdown_grace_s=1.0,
        )
        app, runtime = build_process(settings, [registry_app, feedback_app], title="flywheel")
        assert runtime.kafka_security.username == PROCESS_PRINCIPAL
        inference_id = f"chatcmpl-{uuid.uuid4().hex[:10]}"
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://flywheel", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            ) as client:
                prompt = f"joint-{uuid.uuid4().hex[:8]}"
                assert (
                    await client.post("/registry/v1/prompts", json={"name": prompt, "template": "Q: {question}"})
                ).status_code == 201
                accepted = await client.post(
                    "/feedback/v1/feedback", json={"inference_id": inference_id, "thumbs": "down", "rating": 2}
                )
                assert accepted.status_code == 202, accepted.text
                deadline = asyncio.get_running_loop().time() + 60
                while not (await client.get("/feedback/v1/feedback", params={"inference_id": inference_id})).json()[
                    "items"
                ]:
                    assert asyncio.get_running_loop().time() < deadline, "the sink never stored the feedback"
                    await asyncio.sleep(0.5)
    finally:
        recorded.unlink()
    published = await read_records(
        secure_kafka.status().address or "",
        secure_kafka.admin_security(),
        topic_for("prompt.published"),
        expected=10_000,
        timeout_s=5,
    )
    assert [
        json.loads(r.value)["producer"] for r in published if json.loads(r.value)["payload"]["prompt_name"] == prompt
    ] == ["registry"]


def test_the_operations_guide_prints_the_table_the_broker_enforces() -> None:
    guide = (REPO / "docs" / "operations.md").read_text()
    printed = guide.split("<!-- kafka-acl-table:begin -->\n", 1)[1].split("\n<!-- kafka-acl-table:end -->", 1)[0]
    assert printed == table_markdown(), (
        "docs/operations.md's Kafka identities table is out of date: paste infra.kafka_acls.table_markdown()"
    )


@pytest.fixture(scope="module")
def tls_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """`flywheel infra up --secure --tls`: SASL_SSL with a CA made for its home; stopped by pid."""
    kafka = LocalKafka(
        tmp_path_factory.mktemp("tls-kafka-home"), FlywheelSettings().cache, port=free_port(), secure=True, tls=True
    )
    with running(kafka, timeout=180, failure="the TLS broker did not start"):
        yield kafka


async def test_over_tls_the_apps_publisher_and_a_service_connect_and_nothing_else_does(
    tls_kafka: LocalKafka, tmp_path: Path
) -> None:
    from services.registry.app import create_app

    bootstrap = tls_kafka.status().address or ""
    assert json.loads(tls_kafka.state_file.read_text())["security_protocol"] == "SASL_SSL"
    app = tls_kafka.credentials("app")
    event = EXAMPLES[InferenceLogged].model_copy(update={"inference_id": f"inf-{uuid.uuid4().hex[:12]}"})
    async with EventPublisher(
        bootstrap,
        producer="support-bot",
        sasl_username=app.username,
        sasl_password=app.password,
        ssl_cafile=tls_kafka.cafile,
    ) as publisher:
        envelope = await publisher.publish(event)
        with pytest.raises(TopicAuthorizationFailedError):
            await publisher.publish(EXAMPLES[StageChanged])
    stored = await read_records(bootstrap, tls_kafka.admin_security(), topic_for(InferenceLogged), expected=1)
    assert [json.loads(r.value)["event_id"] for r in stored] == [str(envelope.event_id)]

    # The same credentials without TLS, or over TLS without trusting the home's CA, get nowhere.
    for refused in (
        KafkaSecurity(protocol="SASL_PLAINTEXT", username=app.username, password=app.password),
        KafkaSecurity.of(
            protocol="SASL_SSL", sasl_username=app.username, sasl_password=app.password
        ),  # system trust store only
    ):
        with pytest.raises(ConfigurationError):
            await check_reachable(bootstrap, timeout_s=5, security=refused)

    # A service configured the production way: SASL_SSL, its principal, the CA file.
    registry = tls_kafka.credentials("registry")
    settings = FlywheelSettings(
        home=tmp_path / "home",
        kafka_bootstrap=bootstrap,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="registry",
        kafka_sasl_password=registry.password,
        kafka_ssl_cafile=tls_kafka.cafile,
        bootstrap_admin_key=ADMIN_KEY,
        shutdown_grace_s=1.0,
    )
    process, runtime = build_process(settings, [create_app], title="flywheel-registry")
    assert runtime.kafka_security.uses_tls and runtime.kafka_security.username == "registry"
    async with process.router.lifespan_context(process):
        transport = httpx.ASGITransport(app=process)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://registry", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as client:
            assert (
                await client.post("/registry/v1/prompts", json={"name": "tls-prompt", "template": "Q: {question}"})
            ).status_code == 201
            published = await read_records(
                bootstrap, tls_kafka.admin_security(), topic_for("prompt.published"), expected=1, timeout_s=30
            )
    assert [json.loads(r.value)["payload"]["prompt_name"] for r in published] == ["tls-prompt"]


async def test_a_service_whose_topics_are_missing_stops_with_one_line_instead_of_waiting(
    secure_kafka: LocalKafka, bootstrap: str, tmp_path: Path
) -> None:
    from services.registry.app import create_app

    registry = secure_kafka.credentials("registry")
    settings = FlywheelSettings(
        home=tmp_path / "home",
        kafka_bootstrap=bootstrap,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="registry",
        kafka_sasl_password=registry.password,
        topic_prefix="never-created.",
        bootstrap_admin_key=ADMIN_KEY,
        shutdown_grace_s=1.0,
    )
    app, _ = build_process(settings, [create_app], title="flywheel-registry")
    with pytest.raises(
        ConfigurationError,
        match=r"missing at .* or not readable by principal 'registry' \(e\.g\. never-created\.evaluation\.completed\).*flywheel infra topics",
    ):
        async with app.router.lifespan_context(app):
            pass


def test_the_example_app_publishes_as_the_app_principal(secure_kafka: LocalKafka, bootstrap: str) -> None:
    example = REPO / "examples" / "app_publishes_events.py"
    env = {**os.environ, "KAFKA_PASSWORD": secure_kafka.credentials("app").password or "", "PYTHONPATH": str(REPO)}
    published = subprocess.run(
        [sys.executable, str(example), "--bootstrap", bootstrap, "--sasl-username", "app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert published.returncode == 0 and "published" in published.stdout, published.stderr[-2000:]
    env["KAFKA_PASSWORD"] = "wrong"
    refused = subprocess.run(
        [sys.executable, str(example), "--bootstrap", bootstrap, "--sasl-username", "app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0 and "SaslAuthenticationFailed" in refused.stderr
