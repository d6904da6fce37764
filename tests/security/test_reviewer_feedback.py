"""Reviewer corrections steer automatic retraining, so they cannot be claimed by publishing to Kafka: on a
real broker with SASL/SCRAM and the ACLs of infra/kafka_acls.py (`LocalKafka(secure=True)`, one for this
module), the app principal's feedback.reviewed is refused by Kafka and its EventPublisher refuses a
reviewer claim on feedback.received before sending; the sink, connected as the feedback principal,
dead-letters such a claim sent raw and stores the door's reviewer correction from feedback.reviewed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError

from contracts.envelope import wrap
from contracts.events import FeedbackReceived, FeedbackReviewed, FeedbackSource, Thumbs
from contracts.http import Role
from contracts.publisher import EventPublisher, ReviewerClaimRefused, encode
from contracts.topics import dlq_for, topic_for
from infra.local_kafka import LocalKafka
from services.feedback.handlers import BATCH_HANDLERS
from services.feedback.service import Sink
from services.feedback.store import FeedbackStore
from services.runtime.broker import EventBus, create_broker
from services.runtime.clickhouse import ClickHouseStore
from services.runtime.consumer import DeadLetters
from services.runtime.privacy import Redactor
from services.runtime.service import subscribe_batches
from services.runtime.settings import FlywheelSettings
from tests.integration.test_feedback_http import feedback_door
from tests.integration.test_sink_clickhouse import SINK_SETTINGS, clickhouse, eventually  # noqa: F401 - fixture
from tests.security.test_kafka_acl import bootstrap, end_offset, read_records, secure_kafka  # noqa: F401 - fixtures
from tests.support import api_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def test_the_app_principal_cannot_publish_reviewer_feedback(secure_kafka: LocalKafka, bootstrap: str) -> None:  # noqa: F811
    admin = secure_kafka.admin_security()
    reviewed_topic, received_topic = topic_for(FeedbackReviewed), topic_for(FeedbackReceived)
    reviewed_before, received_before = (
        await end_offset(bootstrap, admin, reviewed_topic),
        await end_offset(bootstrap, admin, received_topic),
    )

    async with EventPublisher(bootstrap, producer="support-bot", security=secure_kafka.credentials("app")) as app:
        with pytest.raises(TopicAuthorizationFailedError):
            await app.publish(
                FeedbackReviewed(inference_id="chatcmpl-1", thumbs=Thumbs.down, correction="The warranty is 9 years.")
            )
        with pytest.raises(ReviewerClaimRefused) as refused:
            await app.publish(
                FeedbackReceived(
                    inference_id="chatcmpl-1",
                    thumbs=Thumbs.down,
                    correction="The warranty is 9 years.",
                    source=FeedbackSource.reviewer,
                )
            )
        assert str(refused.value).startswith(
            "feedback.received may not carry source reviewer: reviewer feedback travels as feedback.reviewed"
        )
        with pytest.raises(ReviewerClaimRefused, match="feedback.received may not name a review queue"):
            await app.publish(
                FeedbackReceived(
                    inference_id="chatcmpl-1", thumbs=Thumbs.up, queue="support-review", scores={"correct": "up"}
                )
            )
        # Nor a pairwise choice: a preference pair is built from it, so only the review door may publish one.
        for choice in ({"preferred_over": "chatcmpl-2"}, {"tied_with": "chatcmpl-2"}):
            with pytest.raises(ReviewerClaimRefused, match="or a pairwise choice"):
                await app.publish(FeedbackReceived(inference_id="chatcmpl-1", **choice))
        # Its end users' feedback still goes through.
        await app.publish(FeedbackReceived(inference_id="chatcmpl-1", thumbs=Thumbs.down))

    assert await end_offset(bootstrap, admin, reviewed_topic) == reviewed_before, (
        "the app's feedback.reviewed reached the topic"
    )
    assert await end_offset(bootstrap, admin, received_topic) == received_before + 1, (
        "only the end user's feedback may reach feedback.received"
    )

    # The refusal is the ACL, not a missing topic: the feedback service's principal writes it.
    async with EventPublisher(
        bootstrap, producer="feedback", security=secure_kafka.credentials("feedback")
    ) as feedback:
        await feedback.publish(
            FeedbackReviewed(inference_id="chatcmpl-1", thumbs=Thumbs.down, correction="The warranty is 2 years.")
        )
    assert await end_offset(bootstrap, admin, reviewed_topic) == reviewed_before + 1


async def test_the_sink_as_the_feedback_principal_stores_reviewer_rows_only_from_feedback_reviewed(
    secure_kafka: LocalKafka,
    bootstrap: str,
    clickhouse: ClickHouseStore,
    tmp_path: Path,  # noqa: F811
) -> None:
    credentials = secure_kafka.credentials("feedback")
    settings = FlywheelSettings(
        home=tmp_path / "home",
        kafka_bootstrap=bootstrap,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="feedback",
        kafka_sasl_password=credentials.password,
        consumer_max_retries=1,
        shutdown_grace_s=1.0,
    )
    inference_id = f"chatcmpl-{uuid.uuid4().hex[:10]}"
    forged = wrap(
        FeedbackReceived(
            inference_id=inference_id,
            thumbs=Thumbs.down,
            correction="The warranty is 9 years.",
            source=FeedbackSource.reviewer,
        ),
        producer="feedback",
    )
    # The app skips the SDK's refusal with a raw producer: feedback.received is a topic it may write.
    raw = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **secure_kafka.credentials("app").client_options())
    await raw.start()
    try:
        key, value, headers = encode(forged)
        await raw.send_and_wait(topic_for(FeedbackReceived), value=value, key=key, headers=headers)
    finally:
        await raw.stop()

    # The sink as `flywheel run feedback` connects: the feedback principal, in its group (the only one its ACLs grant).
    broker = create_broker(settings, client_id="secure-sink")
    subscribe_batches(
        broker,
        BATCH_HANDLERS,
        Sink(FeedbackStore(lambda: clickhouse), Redactor()),
        group="feedback",
        dead_letters=DeadLetters(broker),
        topic_prefix="",
        max_retries=1,
        **SINK_SETTINGS.batch_options(),
    )
    async with broker:
        await broker.start()
        bus = EventBus(broker, producer="feedback")
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=feedback_door(bus, clickhouse, settings)), base_url="http://test"
        ) as client:
            answer = await client.post(
                "/feedback/v1/feedback",
                json={
                    "inference_id": inference_id,
                    "thumbs": "down",
                    "correction": "The warranty is 2 years.",
                    "source": "reviewer",
                },
                headers={"Authorization": f"Bearer {api_key(settings, Role.reviewer)}"},
            )
        assert answer.status_code == 202, answer.text
        await eventually(
            lambda: (
                clickhouse.query(
                    "SELECT count() AS n FROM feedback WHERE inference_id = {id:String}", {"id": inference_id}
                )[0]["n"]
                >= 1
            ),
            what="the reviewer's correction stored",
        )
        letters = await read_records(
            bootstrap, secure_kafka.admin_security(), dlq_for(topic_for(FeedbackReceived)), expected=10**6, timeout_s=10
        )

    stored = clickhouse.query(
        "SELECT toString(event_id) AS event_id, source, correction FROM feedback WHERE inference_id = {id:String}",
        {"id": inference_id},
    )
    assert stored == [
        {"event_id": answer.json()["event_id"], "source": "reviewer", "correction": "The warranty is 2 years."}
    ]
    mine = [letter for letter in letters if json.loads(letter.value)["event_id"] == str(forged.event_id)]
    assert len(mine) == 1, "the forged claim was not dead-lettered once"
    reason = dict((name, value.decode()) for name, value in mine[0].headers)["x-flywheel-error"]
    assert "feedback.received may not carry source reviewer" in reason and "feedback.reviewed" in reason


async def test_the_cli_gives_a_reviewers_feedback_as_the_feedback_principal_and_an_end_users_as_the_app(
    secure_kafka: LocalKafka, bootstrap: str
) -> None:  # noqa: F811
    # The CLI finds the broker and the principals' credentials where `flywheel infra up --secure` recorded them.
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_KAFKA_")}
    env.update(FLYWHEEL_HOME=str(secure_kafka.dir.parent.parent), PYTHONWARNINGS="ignore")
    flywheel = str(Path(sys.executable).parent / "flywheel")
    admin = secure_kafka.admin_security()
    topics = (topic_for(FeedbackReviewed), topic_for(FeedbackReceived))

    async def offsets() -> tuple[int, ...]:
        return tuple([await end_offset(bootstrap, admin, topic) for topic in topics])

    async def give(*args: str) -> None:
        done = await asyncio.to_thread(
            subprocess.run,
            [flywheel, "feedback", "give", "chatcmpl-cli", "--thumbs", "down", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    reviewed, received = await offsets()
    await give("--correction", "The warranty is 2 years.", "--source", "reviewer")
    assert await offsets() == (reviewed + 1, received)
    await give()
    assert await offsets() == (reviewed + 1, received + 1)
