"""The output guard on its own: what each action does, and that a stream, fed in any pieces, releases
exactly what the whole answer would, without a found value ever leaving whole or in part."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.events import GuardAction
from contracts.http import ResponseFormat
from services.runtime.scoring.grounding import Embedder
from services.serving.guard import HOLD_CHARS, ContentBlocked, ContentGuard, SchemaRefused, answer_structure

pytestmark = pytest.mark.unit

CARD = "4111 1111 1111 1111"
KEY = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34"
ANSWER = f"Your card {CARD} is on file. Use the key {KEY} to call the API, or write to jane.doe@example.com today."


def test_redact_replaces_each_value_and_says_what_it_found() -> None:
    guard = ContentGuard(secrets=GuardAction.redact, personal=GuardAction.redact)
    text, verdict = guard.whole(ANSWER)
    assert CARD not in text and KEY not in text and "jane.doe@example.com" not in text
    assert "[CARD]" in text and "[OPENAI_KEY]" in text and "[EMAIL]" in text
    assert text.startswith("Your card ") and text.endswith(" today.")
    assert (verdict.outcome, verdict.labels) == ("redacted", {"CARD", "OPENAI_KEY", "EMAIL"})


def test_each_kind_has_its_own_action() -> None:
    text, verdict = ContentGuard(secrets=GuardAction.redact, personal=GuardAction.flag).whole(ANSWER)
    assert CARD in text and KEY not in text and verdict.outcome == "redacted"
    text, verdict = ContentGuard(secrets=GuardAction.off, personal=GuardAction.flag).whole(ANSWER)
    assert text == ANSWER and (verdict.outcome, verdict.labels) == ("flagged", {"CARD", "EMAIL"})
    text, verdict = ContentGuard(secrets=GuardAction.off, personal=GuardAction.off).whole(ANSWER)
    assert text == ANSWER and verdict.outcome == "passed" and not verdict.labels


def test_block_names_only_what_it_blocks() -> None:
    with pytest.raises(ContentBlocked, match="OPENAI_KEY") as blocked:
        ContentGuard(secrets=GuardAction.block, personal=GuardAction.redact).whole(ANSWER)
    assert blocked.value.labels == ("OPENAI_KEY",)


def test_a_clean_answer_passes_unchanged() -> None:
    text, verdict = ContentGuard(secrets=GuardAction.block, personal=GuardAction.block).whole("Delivery takes 3 days.")
    assert text == "Delivery takes 3 days." and verdict.outcome == "passed"


def test_a_stream_holds_back_only_its_tail_and_an_unfinished_value() -> None:
    guarded = ContentGuard(secrets=GuardAction.redact, personal=GuardAction.redact).stream()
    prose = "word " * 60
    out = guarded.feed(prose)
    assert out == prose[: len(prose) - HOLD_CHARS], "text far from the end is released at once"
    out += guarded.feed("and the key is sk-proj-Ab12Cd34Ef56")
    assert "sk-proj" not in out
    out += guarded.feed("Gh78Ij90Kl12Mn34 " + "word " * 40)
    assert "[OPENAI_KEY]" in out and "Ab12" not in out, "a finished key goes out replaced once it is past the hold"
    out += guarded.finish()
    assert out == prose + "and the key is [OPENAI_KEY] " + "word " * 40


def test_a_blocked_stream_has_sent_nothing_of_the_value() -> None:
    guarded = ContentGuard(secrets=GuardAction.block, personal=GuardAction.off).stream()
    sent = ""
    with pytest.raises(ContentBlocked):
        for piece in ("Here it is: s", "k-proj-Ab12Cd34", "Ef56Gh78Ij90Kl12Mn34", " done", ""):
            sent += guarded.feed(piece)
        sent += guarded.finish()
    assert "sk-" not in sent and sent == ""  # under HOLD_CHARS of text: nothing was due to go out yet
    assert guarded.verdict.outcome == "blocked"


PIECES = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=60)
FILLER = st.text(alphabet="abc de.,\n0123456789", max_size=200)


@settings(max_examples=150, deadline=None)
@given(before=FILLER, after=FILLER, cuts=PIECES)
def test_any_split_of_a_stream_releases_what_the_whole_answer_would(before: str, after: str, cuts: list[int]) -> None:
    guard = ContentGuard(secrets=GuardAction.redact, personal=GuardAction.redact)
    answer = f"{before} card {CARD} key {KEY} {after}"
    whole, _ = guard.whole(answer)
    guarded, sent, cursor = guard.stream(), [], 0
    for size in cuts * (len(answer) // max(sum(cuts), 1) + 1):
        if cursor >= len(answer):
            break
        sent.append(guarded.feed(answer[cursor : cursor + size]))
        cursor += size
        # What went out is always the start of the guarded whole: no piece of a value ever left raw.
        assert whole.startswith("".join(sent))
    sent.append(guarded.feed(answer[cursor:]))
    sent.append(guarded.finish())
    assert "".join(sent) == whole


def test_a_value_is_judged_once_it_is_settled_not_by_its_prefix() -> None:
    # Twelve digits of a card in groups look like a phone number: judged then, the block would name PHONE.
    guarded = ContentGuard(secrets=GuardAction.off, personal=GuardAction.block).stream()
    text = "word " * 40 + f"card {CARD} and then " + "word " * 40
    with pytest.raises(ContentBlocked) as blocked:
        for character in text:
            guarded.feed(character)
        guarded.finish()
    assert blocked.value.labels == ("CARD",) and guarded.verdict.labels == {"CARD"}


UNSAFE = (
    "word " * 40
    + "If it fails again, go kill\n  yourself, you are an idiot. Your card "
    + CARD
    + " is safe. "
    + "word " * 40
)


def test_unsafe_phrases_are_redacted_to_their_category_beside_values_streamed_in_any_pieces() -> None:
    guard = ContentGuard(
        secrets=GuardAction.off, personal=GuardAction.redact, check="output", unsafe=GuardAction.redact
    )
    whole, verdict = guard.whole(UNSAFE)
    assert "go [UNSAFE_SELF_HARM], [UNSAFE_HARASSMENT]. Your card [CARD] is safe." in whole
    assert (verdict.outcome, verdict.labels) == ("redacted", {"UNSAFE_SELF_HARM", "UNSAFE_HARASSMENT", "CARD"})
    guarded, sent = guard.stream(), ""
    for character in UNSAFE:  # one character at a time: the phrase is judged only once it is whole
        sent += guarded.feed(character)
        assert whole.startswith(sent) and "kill" not in sent
    assert sent + guarded.finish() == whole


def test_unsafe_content_blocks_or_flags_as_its_action_says_and_only_in_the_answer() -> None:
    with pytest.raises(ContentBlocked, match="UNSAFE_SELF_HARM") as blocked:
        ContentGuard(secrets=GuardAction.off, personal=GuardAction.off, unsafe=GuardAction.block).whole(UNSAFE)
    assert blocked.value.labels == ("UNSAFE_HARASSMENT", "UNSAFE_SELF_HARM")
    text, verdict = ContentGuard(secrets=GuardAction.off, personal=GuardAction.off, unsafe=GuardAction.flag).whole(
        UNSAFE
    )
    assert text == UNSAFE and verdict.outcome == "flagged"
    clean, verdict = ContentGuard(secrets=GuardAction.off, personal=GuardAction.off, unsafe=GuardAction.block).whole(
        "Kill the process, then execute the script; the skill check passes."
    )
    assert verdict.outcome == "passed" and clean.startswith("Kill the process")
    with pytest.raises(ValueError, match="in the answer"):
        ContentGuard(check="input", secrets=GuardAction.off, personal=GuardAction.off, unsafe=GuardAction.block)


ORDER = {
    "type": "object",
    "properties": {"order": {"type": "integer"}, "status": {"enum": ["open", "shipped"]}},
    "required": ["order", "status"],
}


def formats(schema: dict | None = None, kind: str = "json_schema") -> ResponseFormat:
    body: dict = {"type": kind}
    if kind == "json_schema":
        body["json_schema"] = {"name": "order", "schema": schema}
    return ResponseFormat.model_validate(body)


def test_the_structure_asked_for_is_checked_on_the_whole_answer_and_a_blocking_check_holds_a_stream() -> None:
    guard = ContentGuard(secrets=GuardAction.off, personal=GuardAction.off, json_schema=GuardAction.block)
    schema = answer_structure(formats(ORDER))
    text, verdict = guard.whole('```json\n{"order": 7, "status": "open"}\n```', schema)
    assert verdict.outcome == "passed" and text.startswith("```json")
    with pytest.raises(ContentBlocked, match=r"INVALID_JSON \(status: fails enum\)$") as blocked:
        guard.whole('{"order": 7, "status": "lost 4111 1111 1111 1111"}', schema)
    assert "4111" not in str(blocked.value), "the validator's message would quote the answer"
    assert blocked.value.labels == ("INVALID_JSON",)
    guarded, sent = guard.stream(schema), ""
    for piece in ('{"order": 7, ', '"status": "open"}', " " * 300):
        sent += guarded.feed(piece)
    assert sent == "", "nothing goes out before the whole answer is judged"
    assert guarded.finish() == '{"order": 7, "status": "open"}' + " " * 300
    flagging = ContentGuard(secrets=GuardAction.off, personal=GuardAction.off, json_schema=GuardAction.flag)
    text, verdict = flagging.whole("Sure! Here is the order.", answer_structure(formats(kind="json_object")))
    assert text == "Sure! Here is the order." and (verdict.outcome, verdict.labels) == ("flagged", {"INVALID_JSON"})
    assert flagging.stream({"type": "object"}).feed("x" * 300), "a flagging check releases as it goes"
    assert guard.whole("not json at all")[1].outcome == "passed", "no response_format: no structure to check"


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "string", "pattern": "^(a+)+$"}, "may not use pattern"),
        ({"patternProperties": {"^x": {}}}, "may not use patternProperties"),
        ({"$ref": "https://attacker.example/schema.json"}, "only within itself"),
        ({"type": 5}, "is invalid"),
        ({"$ref": "#"}, "cannot be applied: RecursionError"),
        ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "cannot be applied"),
        ({"$ref": "#/$defs/missing"}, "cannot be applied"),
        ({"enum": ["x" * 100] * 200}, "over 16384 bytes"),
    ],
)
def test_a_schema_the_gateway_will_not_run_is_refused(schema: dict, why: str) -> None:
    for _ in range(2):  # checked schemas are remembered; a refusal must not be
        with pytest.raises(SchemaRefused, match=why):
            answer_structure(formats(schema))


def test_a_checked_schema_is_remembered_by_its_content_not_by_its_key_order() -> None:
    first = answer_structure(formats({"type": "object", "properties": ORDER["properties"]}))
    again = answer_structure(formats({"properties": ORDER["properties"], "type": "object"}))
    assert again is first, "the same schema written in another key order is checked once"
    assert answer_structure(formats({"type": "object", "required": ["order"]})) is not first


def test_no_structure_is_asked_for_by_text_or_by_no_response_format() -> None:
    assert answer_structure(None) is None and answer_structure(formats(kind="text")) is None
    assert answer_structure(formats({"$ref": "#/$defs/order", "$defs": {"order": ORDER}})) is not None


CONTEXT = "Orders ship from Rotterdam. Delivery takes 3 working days; express delivery takes 1 working day."


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(max_length=256)


async def test_an_answer_is_judged_grounded_in_its_context_by_meaning_words_and_numbers(embedder: Embedder) -> None:
    guard = ContentGuard(
        secrets=GuardAction.off, personal=GuardAction.off, grounding=GuardAction.block, embedder=embedder
    )
    text, guarded = await guard.answer("Delivery takes 3 working days from Rotterdam.", context=CONTEXT)
    verdict = guarded.verdict
    assert text == "Delivery takes 3 working days from Rotterdam."
    assert verdict.outcome == "passed" and verdict.groundedness is not None and verdict.groundedness >= 0.5
    with pytest.raises(ContentBlocked, match=r"states 1 number\(s\) the context does not have\)$"):
        await guard.answer("Delivery takes 5 working days from Rotterdam.", context=CONTEXT)
    with pytest.raises(ContentBlocked, match=r"groundedness 0\.\d\d is under the floor 0\.50") as blocked:
        await guard.answer("Our refund policy lets you return any item within a month.", context=CONTEXT)
    assert blocked.value.labels == ("UNGROUNDED",) and blocked.value.verdict.outcome == "blocked"
    assert (await guard.answer("Anything at all.", context=None))[1].verdict.outcome == "passed", (
        "no context: not checked"
    )


async def test_a_blocking_groundedness_check_holds_a_stream_and_a_flagging_one_does_not(embedder: Embedder) -> None:
    blocking = ContentGuard(
        secrets=GuardAction.off, personal=GuardAction.off, grounding=GuardAction.block, embedder=embedder
    )
    guarded = blocking.stream(context=CONTEXT)
    answer = "Delivery takes 3 working days. " * 10
    assert guarded.feed(answer) == "", "held until the whole answer is judged"
    await guarded.ground()
    assert guarded.finish() == answer
    flagging = ContentGuard(
        secrets=GuardAction.off, personal=GuardAction.off, grounding=GuardAction.flag, embedder=embedder
    )
    guarded = flagging.stream(context=CONTEXT)
    sent = guarded.feed("Refunds take 30 days. " * 10)
    await guarded.ground()
    sent += guarded.finish()
    assert sent == "Refunds take 30 days. " * 10
    assert (guarded.verdict.outcome, guarded.verdict.labels) == ("flagged", {"UNGROUNDED"})
    # Whole, a flag-only check does not hold the answer: it is scored by `ground` once the answer has gone.
    text, later = await flagging.answer("Refunds take 30 days.", context=CONTEXT)
    assert text == "Refunds take 30 days." and later.grounds_after_release
    assert later.verdict.groundedness is None and later.verdict.outcome == "passed", "not scored yet"
    await later.ground()
    assert later.verdict.groundedness is not None and later.verdict.labels == {"UNGROUNDED"}
    _, held = await blocking.answer("Delivery takes 3 working days.", context=CONTEXT)
    assert not held.grounds_after_release and held.verdict.groundedness is not None, "a blocking check judged first"
    with pytest.raises(ValueError, match="cannot be redacted"):
        ContentGuard(secrets=GuardAction.off, personal=GuardAction.off, grounding=GuardAction.redact, embedder=embedder)
