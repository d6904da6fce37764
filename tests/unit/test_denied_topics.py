"""Denied topics on the real MiniLM: a request on a topic its examples declare is found, in other words
too; one on another subject passes; a policy declares the topics it checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from contracts.events import GuardAction, GuardPolicySpec
from services.runtime.scoring.grounding import Embedder
from services.runtime.scoring.topics import TopicMatcher
from services.serving.guard import ContentBlocked, ContentGuard

pytestmark = pytest.mark.unit

TOPICS = {
    "medical": [
        "What medicine should I take for my headache?",
        "Is this rash serious, should I see a doctor?",
        "How much ibuprofen can I take?",
    ],
    "competitors": ["Is Acme Kettles better than you?", "Should I buy from Acme instead?"],
}
ON_TOPIC = {
    "Which painkiller works best for a migraine?": "medical",
    "I have a fever and a cough, what should I take?": "medical",
    "Do you think Acme has cheaper kettles?": "competitors",
}
OFF_TOPIC = [
    "How long does delivery take?",
    "Can I return my kettle after 30 days?",
    "My kettle leaks, what should I do?",
    "Write me a poem about the sea",
]


@pytest.fixture(scope="module")
def matcher() -> TopicMatcher:
    return TopicMatcher(TOPICS, 0.5, Embedder(max_length=256))


def test_requests_on_a_denied_topic_are_found_in_other_words_and_others_pass(matcher: TopicMatcher) -> None:
    for text, topic in ON_TOPIC.items():
        found = matcher.matches([text])
        assert set(found) == {"", topic}, (text, found)
    for text in OFF_TOPIC:
        found = matcher.matches([text])
        assert set(found) == {""} and found[""] < 0.5, (text, found)


async def test_the_input_guard_blocks_or_flags_a_denied_topic_naming_it(matcher: TopicMatcher) -> None:
    blocking = ContentGuard(
        check="input",
        secrets=GuardAction.off,
        personal=GuardAction.off,
        topics=GuardAction.block,
        topic_matcher=matcher,
        policy="support-guard:v4",
    )
    with pytest.raises(ContentBlocked, match="guard policy support-guard:v4: it contained TOPIC_medical") as blocked:
        await blocking.screen(["Hi there", "Which painkiller works best for a migraine?"])
    assert blocked.value.verdict.topic_similarity is not None and blocked.value.verdict.topic_similarity >= 0.5
    passed = await blocking.screen(["How long does delivery take?"])
    assert passed.outcome == "passed" and not passed.labels and passed.topic_similarity is not None
    flagging = ContentGuard(
        check="input", secrets=GuardAction.off, personal=GuardAction.off, topics=GuardAction.flag, topic_matcher=matcher
    )
    flagged = await flagging.screen(["Do you think Acme has cheaper kettles?"])
    assert (flagged.outcome, flagged.labels) == ("flagged", {"TOPIC_competitors"})


def test_a_policy_declares_the_topics_it_checks_by_safe_names() -> None:
    with pytest.raises(ValidationError, match="declares none"):
        GuardPolicySpec(input_denied_topics=GuardAction.block)
    with pytest.raises(ValidationError, match="pattern"):
        GuardPolicySpec(denied_topics={"Medical Advice": ["How much ibuprofen?"]})
    with pytest.raises(ValidationError, match="cannot be redacted"):
        GuardPolicySpec(input_denied_topics=GuardAction.redact, denied_topics=TOPICS)
    assert GuardPolicySpec(input_denied_topics=GuardAction.flag, denied_topics=TOPICS).denied_topic_threshold == 0.5
