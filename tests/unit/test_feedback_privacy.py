"""What the privacy redactor catches in realistic text, and what it deliberately leaves alone."""

from __future__ import annotations

import pytest

from services.feedback.privacy import PrivacyPolicy, Redactor

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
        ("Jane Doe, 221B Baker Street", "names and postal addresses are not detected: no pattern catches them reliably"),
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
