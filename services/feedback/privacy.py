"""Personal data out of text before it is stored: emails, phone numbers, card numbers (Luhn-checked),
IPv4 and IPv6 addresses, and patterns a deployment adds.

Detection is deliberately conservative where a false positive destroys useful text: a bare run of
digits with no `+`, separator or parentheses is not taken for a phone number (order numbers, ids),
and a 13-19 digit run is a card only when it passes the Luhn check. The tests in
tests/unit/test_feedback_privacy.py show, on realistic text, what is caught and what is not.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class PrivacyPolicy(StrEnum):
    redact = "redact"  # `[EMAIL]`: nothing of the value survives
    hash = "hash"  # `[EMAIL:3f2a...]`: the same value gives the same token, so counts and joins still work
    off = "off"


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _is_card(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _is_ipv6(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _is_phone(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    formatted = candidate.startswith("+") or "(" in candidate or re.search(r"\d[ .\-]\d", candidate) is not None
    return 9 <= len(digits) <= 15 and formatted


@dataclass(frozen=True)
class Detector:
    label: str
    pattern: re.Pattern[str]
    accept: Callable[[str], bool] = lambda _: True


# Order is priority: where two detectors match overlapping text, the earlier one wins (a card number
# is not also a phone number).
BUILTIN_DETECTORS: tuple[Detector, ...] = (
    Detector("EMAIL", re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    Detector("CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _is_card),
    Detector("IPV6", re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"), _is_ipv6),
    Detector("IPV4", re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")),
    Detector("PHONE", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]?\d{2,4}){1,5}(?!\w)"), _is_phone),
)


class Redactor:
    """Replaces personal data in text according to a policy; `scrub(None)` is None."""

    def __init__(self, policy: PrivacyPolicy = PrivacyPolicy.redact, *, salt: str = "", extra_patterns: Mapping[str, str] | None = None) -> None:
        self.policy = PrivacyPolicy(policy)
        self._salt = salt.encode()
        extras = tuple(Detector(name.upper(), re.compile(pattern)) for name, pattern in (extra_patterns or {}).items())
        self._detectors = BUILTIN_DETECTORS + extras

    def scrub(self, text: str | None) -> str | None:
        """The text with every detected value replaced."""
        if not text or self.policy is PrivacyPolicy.off:
            return text
        spans: list[tuple[int, int, str]] = []
        for detector in self._detectors:
            for match in detector.pattern.finditer(text):
                start, end = match.span()
                if start == end or not detector.accept(match.group()):
                    continue
                if any(start < taken_end and taken_start < end for taken_start, taken_end, _ in spans):
                    continue
                spans.append((start, end, detector.label))
        if not spans:
            return text
        pieces, cursor = [], 0
        for start, end, label in sorted(spans):
            pieces.append(text[cursor:start])
            pieces.append(self._token(label, text[start:end]))
            cursor = end
        pieces.append(text[cursor:])
        return "".join(pieces)

    def _token(self, label: str, value: str) -> str:
        if self.policy is PrivacyPolicy.hash:
            return f"[{label}:{hashlib.sha256(self._salt + value.encode()).hexdigest()[:12]}]"
        return f"[{label}]"
