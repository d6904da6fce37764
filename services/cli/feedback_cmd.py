"""`flywheel feedback give|list`: give feedback on an inference, read what is stored."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from contracts.events import FeedbackReviewed, FeedbackSource, Thumbs
from services.cli.doors import api_key_headers
from services.runtime.errors import FlywheelError
from services.runtime.settings import FlywheelSettings, load_settings

app = typer.Typer(help="Give feedback on inferences and read it back.", no_args_is_help=True)


@app.command()
def give(
    inference_id: Annotated[str, typer.Argument(help="The inference id (the completion response's `id`).")],
    thumbs: Annotated[Thumbs | None, typer.Option(help="up or down.")] = None,
    rating: Annotated[int | None, typer.Option(help="1 to 5.")] = None,
    comment: Annotated[str | None, typer.Option(help="Free-text comment.")] = None,
    correction: Annotated[str | None, typer.Option(help="The answer that should have been given.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A label; repeat for several.")] = None,
    source: Annotated[FeedbackSource, typer.Option(help="Who gives it.")] = FeedbackSource.end_user,
    actor: Annotated[str | None, typer.Option(help="Id of the person or judge.")] = None,
) -> None:
    """Publish feedback as `feedback.received` (`feedback.reviewed` with --source reviewer); the sink stores it, also before its inference lands."""
    from pydantic import ValidationError

    from contracts.http import FeedbackCreate
    from contracts.publisher import EventPublisher
    from services.feedback.service import InvalidFeedback, feedback_event
    from services.runtime.privacy import PrivacySettings

    settings = load_settings(FlywheelSettings)
    try:
        event = feedback_event(FeedbackCreate(inference_id=inference_id, thumbs=thumbs, rating=rating, comment=comment, correction=correction, tags=tag or [], source=source, actor=actor))
    except ValidationError as error:
        first = error.errors()[0]
        raise FlywheelError(f"invalid feedback: {'.'.join(str(part) for part in first['loc'])}: {first['msg']}") from None
    except InvalidFeedback as error:
        raise FlywheelError(f"invalid feedback: {error}") from None

    async def publish() -> str:
        from aiokafka.admin import AIOKafkaAdminClient

        from contracts.topics import topic_for
        from services.runtime.broker import check_reachable

        bootstrap = settings.resolved_kafka_bootstrap()
        # Feedback is what apps may publish: the `app` principal where the broker has identities. A
        # reviewer's travels on feedback.reviewed, which only the feedback service's principal may write.
        security = settings.resolved_kafka_security("feedback" if isinstance(event, FeedbackReviewed) else "app")
        await check_reachable(bootstrap, security=security)
        # Without this check the producer retries a missing topic for a minute, logging each attempt.
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.client_options())
        await admin.start()
        try:
            topic = topic_for(event, settings.topic_prefix)
            if topic not in await admin.list_topics():
                raise FlywheelError(f"topic {topic} does not exist on {bootstrap}: create the topics with `flywheel infra topics`")
        finally:
            await admin.close()
        async with EventPublisher(bootstrap, producer="flywheel-cli", topic_prefix=settings.topic_prefix, security=security) as publisher:
            # Scrubbed as the feedback door scrubs: raw personal data never sits in the topic.
            return str((await publisher.publish(load_settings(PrivacySettings).redactor().scrub_feedback(event))).event_id)

    event_id = asyncio.run(publish())
    typer.echo(f"feedback {event.feedback_id} published (event {event_id})")


@app.command(name="list")
def list_(inference_id: Annotated[str, typer.Argument(help="The inference id.")]) -> None:
    """Print the stored feedback on one inference, as JSON: through a running process's door, else from the store."""
    import httpx

    settings = load_settings(FlywheelSettings)
    url = f"http://{settings.http_host}:{settings.http_port}/feedback/v1/feedback"
    try:
        response = httpx.get(url, params={"inference_id": inference_id}, headers=api_key_headers(), timeout=10)
    except httpx.ConnectError:
        typer.echo(_from_store(settings, inference_id))
        return
    if response.status_code != 200:
        raise FlywheelError(f"{url} answered {response.status_code}: {response.json().get('error', {}).get('message', response.text)}")
    typer.echo(json.dumps(response.json(), indent=2))


def _from_store(settings: FlywheelSettings, inference_id: str) -> str:
    from services.feedback.service import InvalidFeedback, list_feedback
    from services.feedback.store import FeedbackStore
    from services.runtime.clickhouse import open_clickhouse

    with open_clickhouse(settings.clickhouse_url, settings.home, readonly=True) as clickhouse:
        try:
            return list_feedback(FeedbackStore(lambda: clickhouse), inference_id).model_dump_json(indent=2)
        except InvalidFeedback as error:
            raise FlywheelError(str(error)) from None
