"""An app that runs its own LLM and still feeds Flywheel: it logs each inference and the user's
feedback as typed events, with only the contracts installed (`pip install ./contracts`).

    python examples/app_publishes_events.py --bootstrap 127.0.0.1:9092

The sink stores both in ClickHouse (`inference_log`, `feedback`); the monitor watches them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import UTC, datetime

from contracts.events import FeedbackReceived, FeedbackSource, InferenceLogged, Thumbs
from contracts.publisher import EventPublisher


def call_my_llm(question: str) -> str:
    """Stands in for the app's own model call."""
    return "Hold the reset button for 10 seconds until the ring turns white."


async def main(bootstrap: str, topic_prefix: str) -> None:
    question = "How do I reset my Acme Nimbus hub?"
    inference_id = f"app-{uuid.uuid4()}"
    started = time.perf_counter()
    answer = call_my_llm(question)
    async with EventPublisher(bootstrap, producer="support-bot", topic_prefix=topic_prefix) as publisher:
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
    arguments = parser.parse_args()
    asyncio.run(main(arguments.bootstrap, arguments.topic_prefix))
