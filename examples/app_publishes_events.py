"""An app that runs its own LLM and still feeds Flywheel: it logs each inference and the user's
feedback as typed events, with only the contracts installed (`pip install ./contracts`).

    python examples/app_publishes_events.py --bootstrap 127.0.0.1:9092

Against a broker with identities (docker-compose's host listener), as the `app` principal, which may
publish these two events and nothing else; the password comes from the environment, never argv:

    KAFKA_PASSWORD=... python examples/app_publishes_events.py --bootstrap localhost:9094 --sasl-username app

The sink stores both in ClickHouse (`inference_log`, `feedback`); the monitor watches them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from datetime import UTC, datetime

from contracts.events import FeedbackReceived, FeedbackSource, InferenceLogged, Thumbs
from contracts.publisher import EventPublisher


def call_my_llm(question: str) -> str:
    """Stands in for the app's own model call."""
    return "Hold the reset button for 10 seconds until the ring turns white."


async def main(
    bootstrap: str, topic_prefix: str, sasl_username: str | None = None, ssl_cafile: str | None = None
) -> None:
    question = "How do I reset my Acme Nimbus hub?"
    inference_id = f"app-{uuid.uuid4()}"
    started = time.perf_counter()
    answer = call_my_llm(question)
    credentials = (
        {"sasl_username": sasl_username, "sasl_password": os.environ["KAFKA_PASSWORD"]} if sasl_username else {}
    )
    async with EventPublisher(
        bootstrap, producer="support-bot", topic_prefix=topic_prefix, ssl_cafile=ssl_cafile, **credentials
    ) as publisher:
        inference = await publisher.publish(
            InferenceLogged(
                inference_id=inference_id,
                model_name="smollm2-135m-instruct",
                endpoint="app",
                user_id="user-42",
                input_messages=[{"role": "user", "content": question}],
                input_text=question,
                output_text=answer,
                latency_total_ms=(time.perf_counter() - started) * 1000,
                started_at=datetime.now(UTC),
            ),
            correlation_id=inference_id,
        )
        feedback = await publisher.publish(
            FeedbackReceived(
                inference_id=inference_id,
                thumbs=Thumbs.down,
                correction="Hold the reset button for 30 seconds until the ring flashes white.",
                source=FeedbackSource.end_user,
                actor="user-42",
            ),
            correlation_id=inference_id,
        )
    print(f"inference {inference_id}: events {inference.event_id} and {feedback.event_id} published")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    parser.add_argument("--topic-prefix", default="", help="FLYWHEEL_TOPIC_PREFIX of the deployment, if any")
    parser.add_argument(
        "--sasl-username", help="SCRAM-SHA-512 principal (e.g. app); its password is read from KAFKA_PASSWORD"
    )
    parser.add_argument("--ssl-cafile", help="CA bundle (PEM) of the brokers' TLS certificates: connects over TLS")
    arguments = parser.parse_args()
    if arguments.sasl_username and "KAFKA_PASSWORD" not in os.environ:
        parser.error("--sasl-username needs the password in the KAFKA_PASSWORD environment variable")
    asyncio.run(main(arguments.bootstrap, arguments.topic_prefix, arguments.sasl_username, arguments.ssl_cafile))
