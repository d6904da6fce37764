"""What the privacy redactor catches in realistic text, and what it deliberately leaves alone: personal
data, secrets, identities, events and dead letters."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts.events import FeedbackReceived, FeedbackReviewed, InferenceLogged
from services.runtime.errors import ConfigurationError
from services.runtime.privacy import PERSONAL_DETECTORS, Detector, PrivacyPolicy, PrivacySettings, Redactor
from services.runtime.settings import load_settings

pytestmark = pytest.mark.unit

SUPPORT_TICKET = (
    "Hi, I'm Jane (jane.doe+billing@example.co.uk). My card 4111-1111-1111-1111 was charged twice; "
    "call me on +44 20 7946 0958 or (415) 555-0100. Our gateway at 192.168.10.4 and fe80::1ff:fe23:4567:890a "
    "logged it on 2026-11-22 at 12:30:45, order 5551234567, firmware v2.10.3, MAC 00:1a:2b:3c:4d:5e."
)


def test_caught_in_a_realistic_support_ticket() -> None:
    assert Redactor().scrub(SUPPORT_TICKET) == (
        "Hi, I'm Jane ([EMAIL]). My card [CARD] was charged twice; "
        "call me on [PHONE] or [PHONE]. Our gateway at [IPV4] and [IPV6] "
        "logged it on 2026-11-22 at 12:30:45, order 5551234567, firmware v2.10.3, MAC 00:1a:2b:3c:4d:5e."
    )


@pytest.mark.parametrize(
    ("text", "why_kept"),
    [
        ("4111 1111 1111 1112", "16 digits failing the Luhn check are not a card"),
        ("order 5551234567", "a bare digit run has no +, separator or parentheses: ids and order numbers stay"),
        ("on 2026-11-22 at 12:30:45", "dates and times are not phone numbers or IPv6 addresses"),
        ("version 1.2.3 and 256.1.1.1", "three parts, or an octet over 255, is not an IPv4 address"),
        ("MAC 00:1a:2b:3c:4d:5e", "MAC addresses are not detected (add a pattern if they matter)"),
        (
            "Jane Doe, 221B Baker Street",
            "names and postal addresses are not detected: no pattern catches them reliably",
        ),
        ("ratio 3:2", "short colon pairs are not IPv6"),
    ],
)
def test_left_alone(text: str, why_kept: str) -> None:
    assert Redactor().scrub(text) == text, why_kept


def test_international_phone_formats() -> None:
    scrub = Redactor().scrub
    assert scrub("+33 6 12 34 56 78") == "[PHONE]"
    assert scrub("+14155550100") == "[PHONE]"
    assert scrub("555-123-4567") == "[PHONE]"
    assert scrub("tel 030 1234567") == "tel [PHONE]"


def test_hash_policy_keeps_equal_values_equal_and_depends_on_the_salt() -> None:
    salted = Redactor(PrivacyPolicy.hash, salt="s1")
    first, second = salted.scrub("from a@b.io"), salted.scrub("again a@b.io")
    assert first.startswith("from [EMAIL:") and first.removeprefix("from ") == second.removeprefix("again ")
    assert Redactor(PrivacyPolicy.hash, salt="s2").scrub("from a@b.io") != first
    assert "a@b.io" not in first


def test_extra_patterns_and_the_off_policy() -> None:
    assert Redactor(extra_patterns={"employee_id": r"EMP-\d{6}"}).scrub("EMP-123456 said hi") == "[EMPLOYEE_ID] said hi"
    assert Redactor(PrivacyPolicy.off).scrub("a@b.io") == "a@b.io"
    assert Redactor().scrub(None) is None


# ------------------------------------------------------------------------------------ personal data


def test_an_ssn_is_labelled_ssn_not_phone() -> None:
    scrub = Redactor().scrub
    assert scrub("my SSN is 536-22-1234, thanks") == "my SSN is [SSN], thanks"
    assert scrub("social security number: 536221234") == "social security number: [SSN]"
    assert scrub("ssn 536 22 1234") == "ssn [SSN]"
    # Not valid SSNs (area 666, group 00): never labelled SSN; the first still has a phone number's shape.
    assert scrub("666-12-3456") == "[PHONE]"
    assert "[SSN]" not in scrub("536-00-1234")
    assert scrub("ticket 536221234") == "ticket 536221234", (
        "nine bare digits without an SSN keyword are an id, not an SSN"
    )


def test_ibans_are_caught_only_when_their_checksum_holds() -> None:
    scrub = Redactor().scrub
    assert scrub("pay to DE89 3704 0044 0532 0130 00 today") == "pay to [IBAN] today"
    assert scrub("IBAN GB82WEST12345698765432.") == "IBAN [IBAN]."
    assert scrub("GB82 WEST 1234 5698 7654 32 PLEASE HURRY") == "[IBAN] PLEASE HURRY", (
        "words after an IBAN are not part of it"
    )
    assert scrub("DE89370400440532013001") == "DE89370400440532013001", "one digit off: the checksum fails, not an IBAN"
    assert "[IBAN]" not in scrub("FR14 2004 1010 0505 0001 3M02 607"), "checksum fails"


# ------------------------------------------------------------------------------------------ secrets


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


JWT = ".".join(
    (
        _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()),
        _b64(json.dumps({"sub": "42", "name": "Ann"}).encode()),
        _b64(bytes(range(32))),
    )
)
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\naNlGWj0hiHsbpkiCT5l0bwXb3LEJq8wTo9KQ7r+S9cxEX7bdnJS+bCw2FhnXjR7ll\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize(
    ("secret", "label"),
    [
        ("sk-proj-Qw3rTy7uIo9pAs1dFg5hJk2lZx8cVb4nM6", "OPENAI_KEY"),
        ("sk-Qw3rTy7uIo9pAs1dFg5hT3BlbkFJk2lZx8cVb4nM6QwErTyUi", "OPENAI_KEY"),
        ("sk-ant-api03-Zx8cVb4nM6Qw3rTy7uIo9pAs1dFg5hJk2lZx8cVb4nM6Qw3rTy7uIo9pAs1dFg5hJk2l-AAAA", "ANTHROPIC_KEY"),
        ("AKIAIOSFODNN7EXAMPLE", "AWS_ACCESS_KEY_ID"),
        ("ASIAY34FZKBOKMUTVV7A", "AWS_ACCESS_KEY_ID"),
        ("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", "GITHUB_TOKEN"),
        (
            "github_pat_11ABCDEFG0abcdefghijkl_mnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghi",
            "GITHUB_TOKEN",
        ),
        ("xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "SLACK_TOKEN"),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc9nF2kLm0", "STRIPE_KEY"),
        ("AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "GOOGLE_API_KEY"),
        (JWT, "JWT"),
        (PEM, "PRIVATE_KEY"),
        ("fw_0a1b2c3d4e5f_Zx8cVb4nM6Qw3rTy7uIo9pAs1dFg5hJk2lZx8cVb4nM6Qw", "FLYWHEEL_KEY"),
    ],
)
def test_each_kind_of_secret_is_removed_whole(secret: str, label: str) -> None:
    text = f"here it is: {secret} -- do not share"
    assert Redactor().scrub(text) == f"here it is: [{label}] -- do not share"
    # Never hashed: an equal token would only help confirm a guessed key.
    assert Redactor(PrivacyPolicy.hash, salt="s").scrub(text) == f"here it is: [{label}] -- do not share"


def test_aws_secret_keys_are_caught_in_context() -> None:
    scrub = Redactor().scrub
    assert (
        scrub("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
        == "aws_secret_access_key = [AWS_SECRET_KEY]"
    )
    assert scrub('AWS secret key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"') == 'AWS secret key: "[AWS_SECRET_KEY]"'


def test_credentials_after_a_keyword_are_caught_and_prose_is_not() -> None:
    scrub = Redactor().scrub
    assert scrub("login with password=hunter2 please") == "login with password=[SECRET] please"
    assert scrub("DB_PASSWORD: 'c0rrect-Horse'") == "DB_PASSWORD: '[SECRET]'"
    assert scrub("api_key: Xy7qp9LmN2zK") == "api_key: [SECRET]"
    assert scrub("the secret: tomorrow we ship") == "the secret: tomorrow we ship", (
        "after `:` only a value that looks like a credential"
    )
    assert scrub("risk-assessment-framework-2026 and sk-learn") == "risk-assessment-framework-2026 and sk-learn"


@pytest.mark.parametrize(
    "text",
    [
        "Our Q3 revenue grew 12% to 4.5 million; see report 2026-Q3 page 17.",
        "Use `pip install scikit-learn==1.5.0` and set max_tokens=256.",
        "The token limit is 4096 and the passphrase policy needs 12 characters.",
        "Order #A1B2C3D4 ships on 2026-12-05 at 09:30 from warehouse DE-7.",
        "Error E1234: upstream 503 after 3 retries (trace 7f3a9c0d11be4c1e).",
        "The function AKIA_COUNT returns 20 and GB82 is a grid reference.",
        # Request ids in hex: their digit runs pass the Luhn check by chance (the Triton fault test's ids did).
        "request fbe01831d10747658058262c763fe859 and 1f6df0815018494797068b0246a1562c",
    ],
)
def test_clean_text_is_left_alone(text: str) -> None:
    assert Redactor().scrub(text) == text


# ------------------------------------------------------------------------------------------ identities


def test_user_ids_are_hashed_by_default_stably_and_once() -> None:
    redactor = Redactor(salt="pepper")
    token = redactor.scrub_user("alice@example.com")
    assert token is not None and token.startswith("[USER:") and len(token) == len("[USER:]") + 16
    assert redactor.scrub_user("alice@example.com") == token, (
        "the same user gives the same token: counts per user still work"
    )
    assert redactor.scrub_user(token) == token, "a token the gateway already made is kept by the sink"
    assert Redactor(salt="other").scrub_user("alice@example.com") != token
    assert Redactor(user_policy=PrivacyPolicy.redact).scrub_user("alice@example.com") == "[USER]"
    assert Redactor(user_policy=PrivacyPolicy.off).scrub_user("alice@example.com") == "alice@example.com"
    assert redactor.scrub_user(None) is None


def test_metadata_identities_are_replaced_whole_and_other_values_scrubbed() -> None:
    redactor = Redactor()
    cleaned = redactor.scrub_metadata(
        {"customer_id": "C-1042", "tier": "gold", "note": "call +1 415 555 0100", "Email": "bob@acme.io"}
    )
    assert cleaned["tier"] == "gold" and cleaned["note"] == "call [PHONE]"
    assert cleaned["customer_id"] == redactor.scrub_user("C-1042") and cleaned["Email"] == redactor.scrub_user(
        "bob@acme.io"
    )


def test_events_are_scrubbed_field_by_field() -> None:
    redactor = Redactor()
    event = InferenceLogged(
        inference_id="i-1",
        model_name="m",
        user_id="ann@example.org",
        principal="support-bot",
        input_messages=[{"role": "user", "content": "I am ann@example.org", "name": "ann@example.org"}],
        input_text="I am ann@example.org",
        output_text="Call 415-555-0100",
        error="refused AKIAIOSFODNN7EXAMPLE",
        metadata={"ip": "10.1.2.3"},
    )
    clean = redactor.scrub_inference(event)
    assert clean.input_messages == [{"role": "user", "content": "I am [EMAIL]", "name": "[EMAIL]"}]
    assert (clean.input_text, clean.output_text, clean.error, clean.metadata) == (
        "I am [EMAIL]",
        "Call [PHONE]",
        "refused [AWS_ACCESS_KEY_ID]",
        {"ip": "[IPV4]"},
    )
    assert (
        clean.user_id == redactor.scrub_user("ann@example.org")
        and clean.principal == "support-bot"
        and clean.inference_id == "i-1"
    )
    assert redactor.scrub_inference(clean) == clean, "scrubbing twice changes nothing"

    person = redactor.scrub_feedback(
        FeedbackReceived(
            inference_id="i-1", comment="mail ann@example.org", tags=["ann@example.org"], actor="ann@example.org"
        )
    )
    assert (person.comment, person.tags, person.actor) == (
        "mail [EMAIL]",
        ["[EMAIL]"],
        redactor.scrub_user("ann@example.org"),
    )
    judge = redactor.scrub_feedback(
        FeedbackReceived(inference_id="i-1", thumbs="up", source="judge", actor="judge:smollm2")
    )
    assert judge.actor == "judge:smollm2", "a judge's actor names a model, not a person"
    reviewer = redactor.scrub_feedback(
        FeedbackReviewed(inference_id="i-1", rating=4, source="reviewer", actor="test-reviewer")
    )
    assert reviewer.actor == "test-reviewer", "a reviewer's actor is the principal of the key that sent it"


# ------------------------------------------------------------------------------------------ dead letters


def test_dead_letter_values_keep_no_personal_data() -> None:
    redactor = Redactor()
    clean = b'{"event_id":"12345678-1234-4123-8123-123456789012","occurred_at":"2026-12-05T14:28:25.123456Z","x":1}'
    assert redactor.scrub_bytes(clean) == (clean, "clean"), (
        "nothing found: byte for byte the original (UUIDs and timestamps untouched)"
    )
    assert redactor.scrub_bytes(b"{not json") == (b"{not json", "clean")
    scrubbed, how = redactor.scrub_bytes(
        b'{"payload": {"user_id": "bob", "input_text": "I am bob@acme.io \\u0040 sk-proj-Qw3rTy7uIo9pAs1dFg5hJk2lZx8cVb4nM6"}}'
    )
    assert (
        how == "scrubbed" and b"bob@acme.io" not in scrubbed and b"sk-proj" not in scrubbed and b'"bob"' not in scrubbed
    )
    assert json.loads(scrubbed)["payload"]["input_text"] == "I am [EMAIL] @ [OPENAI_KEY]"
    assert redactor.scrub_bytes(b"not json: ann@example.org") == (b"not json: [EMAIL]", "scrubbed")
    assert redactor.scrub_bytes(b"\xff\xfeann@example.org") == (b"", "withheld"), "not UTF-8: nothing of it is kept"


# ------------------------------------------------------------------------------------------ settings


def test_settings_read_the_new_and_the_former_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = PrivacySettings()
    assert (defaults.policy, defaults.user_policy, defaults.salt) == (PrivacyPolicy.redact, PrivacyPolicy.hash, "")
    monkeypatch.setenv("FLYWHEEL_FEEDBACK_PRIVACY_POLICY", "hash")
    monkeypatch.setenv("FLYWHEEL_FEEDBACK_PRIVACY_SALT", "old-salt")
    monkeypatch.setenv("FLYWHEEL_FEEDBACK_PRIVACY_PATTERNS", '{"employee_id": "EMP-\\\\d{6}"}')
    legacy = PrivacySettings()
    assert (legacy.policy, legacy.salt) == (PrivacyPolicy.hash, "old-salt")
    assert legacy.redactor().scrub("EMP-123456").startswith("[EMPLOYEE_ID:")
    monkeypatch.setenv("FLYWHEEL_PRIVACY_POLICY", "redact")
    monkeypatch.setenv("FLYWHEEL_PRIVACY_USER_POLICY", "redact")
    current = PrivacySettings()
    assert (current.policy, current.user_policy, current.salt) == (
        PrivacyPolicy.redact,
        PrivacyPolicy.redact,
        "old-salt",
    ), "the new name wins"
    monkeypatch.setenv("FLYWHEEL_PRIVACY_PATTERNS", '{"bad": "("}')
    with pytest.raises(ConfigurationError, match="pattern 'bad' is not a valid regular expression"):
        load_settings(PrivacySettings)


@pytest.mark.parametrize(
    "text",
    [
        "-" * 32_000,
        "_" * 32_000,
        "a." * 16_000,
        "xoxb-1-" * 4_000,
        "password" * 4_000,
        "eyJa" * 8_000,
        "sk-" * 10_000,
        "fw_" * 10_000,
    ],
)
def test_scrubbing_stays_linear_on_hostile_text(text: str) -> None:
    # Prompts are untrusted: each of these took from 8 s to 3 min when a pattern rescanned the rest of a run at every position.
    started = time.perf_counter()
    Redactor().scrub(text)
    assert time.perf_counter() - started < 5.0


def test_hashing_without_a_salt_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flywheel.privacy"):
        PrivacySettings().redactor()
        assert "FLYWHEEL_PRIVACY_SALT is unset" in caplog.text
        caplog.clear()
        PrivacySettings(salt="s3cret").redactor()
        PrivacySettings(user_policy=PrivacyPolicy.redact).redactor()
    assert caplog.text == ""


def test_a_remembering_redactor_scrubs_each_distinct_text_once_and_alike() -> None:
    redactor = Redactor(PrivacyPolicy.hash, salt="s")
    batch = redactor.remembering()
    text = "mail ada@example.com or call +44 20 7946 0958"
    calls = []
    original = batch._scrub
    batch._scrub = lambda value: calls.append(value) or original(value)  # type: ignore[method-assign]

    assert [batch.scrub(text), batch.scrub(text), batch.scrub(None), batch.scrub("")] == [
        redactor.scrub(text),
        redactor.scrub(text),
        None,
        "",
    ]
    assert calls == [text]
    assert redactor._remembered is None  # the redactor it came from keeps no texts


def _first(label: str) -> Detector:
    return next(detector for detector in PERSONAL_DETECTORS if detector.label == label)


@pytest.mark.parametrize(
    ("label", "accepted_only"),
    # Every match of these patterns holds what their hints look for; a phone number's pattern also
    # matches short digit groups, which only its acceptance (nine digits at least) turns away.
    [("IBAN", False), ("SSN", False), ("CARD", False), ("IPV6", False), ("IPV4", False), ("PHONE", True)],
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_a_detector_skipped_by_its_hint_could_not_have_matched(
    label: str, accepted_only: bool, data: st.DataObject
) -> None:
    # A hint only saves time if it never hides a match: texts drawn from the detector's own pattern,
    # within other text, pass its hint whenever the pattern matches (or, for phones, is accepted).
    detector = _first(label)
    text = data.draw(st.from_regex(detector.pattern, fullmatch=False))
    assert detector.hint is not None
    matched = list(detector.spans(text, text.lower())) if accepted_only else detector.pattern.search(text)
    if matched:
        assert detector.hint(text, text.lower()), text


@pytest.mark.parametrize(
    "text",
    [
        "+1 (555) 010-9999",
        "(415)555-0100",
        "+44 20 7946 0958",
        "555.123.4567",
        "+33 6 12 34 56 78",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "078-05-1120",
        "fe80::1",
        "::1",
        "2001:db8::8a2e:370:7334",
        "10.0.0.1",
        "GB82 WEST 1234 5698 7654 32",
    ],
)
def test_formats_at_the_edge_of_the_hints_are_still_caught(text: str) -> None:
    assert Redactor().scrub(f"reach me at {text} today").startswith("reach me at [")
