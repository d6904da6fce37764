"""Personal data and secrets out of what Flywheel keeps: prompts, answers, feedback, user ids, metadata
and dead letters, before they are published (the gateway) and again before they are stored (the sink).

What is found, in the order that decides overlaps (the earlier detector wins):
- secrets, always removed whole (never hashed: a token that stays equal would only help confirm a
  guessed key): PEM private keys, JWTs, Anthropic/OpenAI/AWS/GitHub/Slack/Stripe/Google keys, Flywheel
  API keys, and any value assigned to a credential keyword (`password=`, `api_key: ...`);
- personal data, replaced by policy: emails, IBANs (checksum and country format verified by
  python-stdnum), US social security numbers (validated by python-stdnum, and labelled SSN, never
  PHONE), card numbers (Luhn), IPv6 and IPv4 addresses, phone numbers, and patterns a deployment adds.

Where the maintained `detect-secrets` package has a plugin, its regexes and keyword list are used
as they are (AWS key ids and quoted secret keys, GitHub, Slack, Stripe, legacy OpenAI keys, JWTs with
its formal check, private-key headers, credential keywords). Hand-written, and why:
- detect-secrets scans source code line by line and reports a secret's start; text here is prose of
  any length, so a match is extended over the rest of its token (a Stripe key is longer than the 24
  characters its regex names, a JWT's signature follows its lazy match) and a PEM block is removed
  from BEGIN to END, not just the header line;
- it has no plugin for Anthropic keys, current OpenAI keys (`sk-proj-`, `sk-svcacct-`, without the
  legacy `T3BlbkFJ` marker), GitHub fine-grained tokens (`github_pat_`), Slack refresh tokens
  (`xoxe`), Google API keys (`AIza`), Flywheel keys or unquoted AWS secret keys;
- its keyword plugin takes the rest of a line as the secret, which in prose removes whole sentences:
  here the value ends at whitespace or a quote, any value after `=` counts (assignment is credential
  syntax), after `:` only one that looks like a credential (two character classes, or high entropy).

Detection of personal data is deliberately conservative where a false positive destroys useful text:
a bare run of digits with no `+`, separator or parentheses is not taken for a phone number (order
numbers, ids); a 13-19 digit run is a card only when it passes the Luhn check; an IBAN-shaped string
whose checksum fails is left alone. tests/unit/test_privacy.py shows what is caught and what is not.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.keyword import DENYLIST as CREDENTIAL_KEYWORDS
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.stripe import StripeDetector
from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from stdnum import iban as stdnum_iban
from stdnum.us import ssn as stdnum_ssn

from contracts.events import FeedbackReceived, FeedbackSource, InferenceLogged, SpanLogged

log = logging.getLogger("flywheel.privacy")


class PrivacyPolicy(StrEnum):
    redact = "redact"  # `[EMAIL]`: nothing of the value survives
    hash = "hash"  # `[EMAIL:3f2a...]`: the same value gives the same token, so counts and joins still work
    off = "off"


# Metadata keys whose values name a person: treated like `user_id` (the user policy), whole.
DEFAULT_IDENTITY_KEYS = ("user", "user_id", "end_user", "email", "phone", "name", "customer_id", "account_id")
USER_LABEL = "USER"
# A user id already replaced (by the gateway before publishing) is left as it is by the sink, so a
# user keeps one token whichever path their events took.
_USER_TOKEN = re.compile(rf"\[{USER_LABEL}(?::[0-9a-f]{{16}})?\]")


# ------------------------------------------------------------------------------------------ detectors


@dataclass(frozen=True)
class Detector:
    """A labelled pattern. The span replaced is the `value` group when the pattern has one (a keyword
    names the context, only the value goes), else the whole match; `tail` extends it over the rest
    of its token."""

    label: str
    pattern: re.Pattern[str]
    accept: Callable[[re.Match[str]], bool] | None = None
    secret: bool = False
    tail: re.Pattern[str] | None = None
    group: int | str | None = None
    # A cheap test of (text, text.lower()) that must hold for the pattern to match at all: most text
    # holds no `sk-` or `@`, and a substring test costs far less than a regex scan.
    hint: Callable[[str, str], bool] | None = None

    def spans(
        self, text: str, lowered: str | None = None
    ) -> Iterator[tuple[int, int]]:  # `lowered`: used by subclasses
        group = self.group if self.group is not None else ("value" if "value" in self.pattern.groupindex else 0)
        covered = 0
        for match in self.pattern.finditer(text):
            start, end = match.span(group)
            # A match inside the tail of the previous one is part of that token; skipping it also keeps
            # a long run of repeated prefixes linear instead of extending each over the rest of the run.
            if start < covered or start == end or (self.accept is not None and not self.accept(match)):
                continue
            if self.tail is not None:
                tail = self.tail.match(text, end)
                assert tail is not None, "a `*` pattern always matches"
                end = tail.end()
            covered = end
            yield start, end


@dataclass(frozen=True)
class IbanDetector(Detector):
    """IBANs, grouped or not. The shape alone also matches words that follow an IBAN, so each
    candidate is cut back, group by group, to the longest prefix whose checksum holds."""

    def spans(self, text: str, lowered: str | None = None) -> Iterator[tuple[int, int]]:
        for match in self.pattern.finditer(text):
            candidate = match.group()
            for length in range(len(candidate), 14, -1):
                prefix = candidate[:length]
                if prefix[-1] == " " or (
                    length < len(candidate) and candidate[length].isalnum() and candidate[length - 1].isalnum()
                ):
                    continue  # never cut inside a group
                if stdnum_iban.is_valid(prefix):
                    yield match.start(), match.start() + length
                    break


@dataclass(frozen=True)
class CredentialDetector(Detector):
    """A value after a credential keyword. The keywords are lowercase: matching the lowercased text
    case-sensitively is ten times faster than an IGNORECASE scan; the value is judged as written."""

    def spans(self, text: str, lowered: str | None = None) -> Iterator[tuple[int, int]]:
        lowered = text.lower() if lowered is None else lowered
        # lower() keeps positions for all but a few characters (`İ` becomes two); then scan as written.
        haystack, pattern = (
            (lowered, self.pattern)
            if len(lowered) == len(text)
            else (text, re.compile(self.pattern.pattern, re.IGNORECASE))
        )
        for match in pattern.finditer(haystack):
            start, end = match.span("value")
            if _looks_like_credential(match.group("op"), text[start:end]):
                yield start, end


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# Compiled once: `re.sub(pattern, ...)` looks its pattern up in re's cache at every call, which cost
# more than the match itself on the sink's path (most texts hold a number that looks like a phone's).
_NON_DIGIT = re.compile(r"\D")
_DIGIT_SEPARATOR_DIGIT = re.compile(r"\d[ .\-]\d")


def _is_card(match: re.Match[str]) -> bool:
    digits = _NON_DIGIT.sub("", match.group())
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _is_ipv6(match: re.Match[str]) -> bool:
    try:
        ipaddress.IPv6Address(match.group())
    except ValueError:
        return False
    return True


def _is_phone(match: re.Match[str]) -> bool:
    candidate = match.group()
    digits = _NON_DIGIT.sub("", candidate)
    formatted = candidate.startswith("+") or "(" in candidate or _DIGIT_SEPARATOR_DIGIT.search(candidate) is not None
    return 9 <= len(digits) <= 15 and formatted


def _is_ssn(match: re.Match[str]) -> bool:
    return bool(stdnum_ssn.is_valid(_NON_DIGIT.sub("", match.group("value"))))


def _letters_and_digits(match: re.Match[str]) -> bool:
    value = match.group("value") if "value" in match.re.groupindex else match.group()
    return any(char.isdigit() for char in value) and any(char.isalpha() for char in value)


def _shannon_entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(count / len(value) * math.log2(count / len(value)) for count in counts.values())


def _looks_like_credential(op: str, value: str) -> bool:
    if op != ":":
        return True  # `password=...`, `api_key := ...`: assignment is credential syntax, whatever the value
    classes = sum(
        any(test(char) for char in value) for test in (str.islower, str.isupper, str.isdigit, lambda c: not c.isalnum())
    )
    return len(value) >= 6 and (classes >= 2 or _shannon_entropy(value) >= 3.5)


def _private_key_header(match: re.Match[str]) -> bool:
    return any(header.search(match.group()) for header in PrivateKeyDetector.denylist)


def _formally_valid_jwt(match: re.Match[str]) -> bool:
    return JwtTokenDetector.is_formally_valid(match.group())


def _bounded(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """A detect-secrets pattern that must start where a token starts. Besides matching what is meant,
    this keeps scanning linear: a pattern tried at every position of a long token would rescan its
    rest each time (text here is untrusted and up to tens of kilobytes)."""
    return re.compile(rf"(?<![A-Za-z0-9_\-])(?:{pattern})", flags)


def _contains(*literals: str) -> Callable[[str, str], bool]:
    # One regex scan for several literals: a generator of `in` tests costs more than the scan (the sink
    # runs every hint on every text it stores).
    search = re.compile("|".join(map(re.escape, literals))).search
    return lambda text, _: search(text) is not None


def _contains_lower(*literals: str) -> Callable[[str, str], bool]:
    search = re.compile("|".join(map(re.escape, literals))).search
    return lambda _, lowered: search(lowered) is not None


def _found(pattern: str) -> Callable[[str, str], bool]:
    search = re.compile(pattern).search
    return lambda text, _: search(text) is not None


# What a detector of digits cannot match without: most prose holds a number or two, and a hint of
# "any digit" sent every such text through four detectors' scans, the bulk of the sink's redaction.
# Nine digits with at most two of a phone number's separators between each two: an SSN (nine), a
# card (13-19) and a phone number (9-15, `+1 (555) 010-9999`) all hold such a run.
_NINE_DIGITS = _found(r"\d(?:[ .()\-]{0,2}\d){8}")
# An IBAN starts with its country's two letters and two check digits.
_IBAN_START = _found(r"[A-Z]{2}\d{2}")
# Two groups of an IPv6 address (`::` included), and two of an IPv4 address.
_TWO_COLON_GROUPS = _found(r":[0-9A-Fa-f]{0,4}:")
_DIGIT_DOT_DIGIT = _found(r"\d\.\d")


def _is_ipv4(match: re.Match[str]) -> bool:
    return all(part == str(int(part)) and int(part) <= 255 for part in match.group().split("."))


_TOKEN_TAIL = re.compile(r"[A-Za-z0-9_\-]*")
_KEYWORDS = "|".join(CREDENTIAL_KEYWORDS)

SECRET_DETECTORS: tuple[Detector, ...] = (
    Detector(
        "PRIVATE_KEY",
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)|PuTTY-User-Key-File-2:.*?(?:Private-MAC: *\S+|\Z)",
            re.DOTALL,
        ),
        _private_key_header,
        secret=True,
        hint=_contains("PRIVATE KEY", "PuTTY-User-Key-File"),
    ),
    Detector(
        "JWT",
        _bounded(JwtTokenDetector.denylist[0].pattern),
        _formally_valid_jwt,
        secret=True,
        tail=re.compile(r"[A-Za-z0-9_\-.+/=]*"),
        hint=_contains("eyJ"),
    ),
    Detector(
        "ANTHROPIC_KEY",
        re.compile(r"(?<![A-Za-z0-9_-])sk-ant-[A-Za-z0-9_\-]{20,}"),
        secret=True,
        hint=_contains("sk-ant-"),
    ),
    Detector(
        "OPENAI_KEY", _bounded(OpenAIDetector.denylist[0].pattern), secret=True, tail=_TOKEN_TAIL, hint=_contains("sk-")
    ),
    Detector(
        "OPENAI_KEY",
        re.compile(r"(?<![A-Za-z0-9_-])sk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"),
        _letters_and_digits,
        secret=True,
        hint=_contains("sk-"),
    ),
    Detector(
        "AWS_ACCESS_KEY_ID",
        re.compile(rf"(?<![A-Za-z0-9])(?:{AWSKeyDetector.denylist[0].pattern})(?![A-Za-z0-9])"),
        secret=True,
        hint=_contains("A3T", "ABIA", "ACCA", "AKIA", "ASIA"),
    ),
    Detector("AWS_SECRET_KEY", AWSKeyDetector.denylist[1], secret=True, group=1, hint=_contains_lower("aws")),
    Detector(
        "AWS_SECRET_KEY",
        re.compile(
            r"aws.{0,20}?(?:key|secret|pwd|pw|password|pass|token).{0,20}?(?:[=:]|\bis\b)\s*['\"]?(?P<value>[0-9a-zA-Z/+]{40})(?![0-9a-zA-Z/+=])",
            re.IGNORECASE,
        ),
        secret=True,
        hint=_contains_lower("aws"),
    ),
    Detector(
        "GITHUB_TOKEN",
        _bounded(GitHubTokenDetector.denylist[0].pattern),
        secret=True,
        tail=_TOKEN_TAIL,
        hint=_contains("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    ),
    Detector(
        "GITHUB_TOKEN",
        re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,}"),
        secret=True,
        hint=_contains("github_pat_"),
    ),
    *(
        Detector(
            "SLACK_TOKEN",
            _bounded(pattern.pattern, pattern.flags),
            secret=True,
            tail=_TOKEN_TAIL,
            hint=_contains_lower("xox", "hooks.slack.com"),
        )
        for pattern in SlackDetector.denylist
    ),
    Detector(
        "SLACK_TOKEN",
        re.compile(r"(?<![A-Za-z0-9])xox[a-z](?:\.xox[a-z])?-[A-Za-z0-9\-]{8,}"),
        secret=True,
        hint=_contains("xox"),
    ),
    Detector(
        "STRIPE_KEY",
        _bounded(StripeDetector.denylist[0].pattern),
        secret=True,
        tail=re.compile(r"[0-9A-Za-z]*"),
        hint=_contains("k_live_"),
    ),
    Detector(
        "GOOGLE_API_KEY",
        re.compile(r"(?<![A-Za-z0-9_])AIza[0-9A-Za-z_\-]{35}"),
        secret=True,
        tail=_TOKEN_TAIL,
        hint=_contains("AIza"),
    ),
    Detector(
        "FLYWHEEL_KEY",
        re.compile(r"(?<![A-Za-z0-9_])fw_[A-Za-z0-9]{4,64}_[A-Za-z0-9_\-]{16,}"),
        secret=True,
        hint=_contains("fw_"),
    ),
    CredentialDetector(
        "SECRET",
        # Anchored on the keyword itself (`aws_secret_access_key` matches from `secret`), with a bounded
        # suffix: an unbounded prefix or suffix makes this quadratic on long runs of word characters.
        re.compile(
            rf"(?:{_KEYWORDS})\w{{0,40}}['\"\]]{{0,2}}[ \t]*(?P<op>:=|=>|==|=|:)[ \t]*['\"`]?(?P<value>[^\s'\"`,;]{{4,}})"
        ),
        # Every keyword in detect-secrets' list contains one of these.
        secret=True,
        hint=_contains_lower("key", "pass", "pwd", "secret", "contrase"),
    ),
)

PERSONAL_DETECTORS: tuple[Detector, ...] = (
    Detector(
        "EMAIL",
        re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        hint=_contains("@"),
    ),
    # Before cards and phones: an IBAN's digits can pass the Luhn check or look like a phone number.
    IbanDetector(
        "IBAN", re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])"), hint=_IBAN_START
    ),
    # Before phones: 123-45-6789 has a phone number's shape too.
    Detector("SSN", re.compile(r"(?<![\w-])(?P<value>\d{3}([- ])\d{2}\2\d{4})(?![\w-])"), _is_ssn, hint=_NINE_DIGITS),
    Detector(
        "SSN",
        re.compile(
            r"\b(?:ssn|social security(?: number| no\.?)?)\W{0,3}(?:is\W{1,2})?(?P<value>\d{9})\b", re.IGNORECASE
        ),
        _is_ssn,
        hint=_contains_lower("ssn", "social security"),
    ),
    # Not inside a longer token: a hex request id holds Luhn-valid digit runs by chance.
    Detector("CARD", re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), _is_card, hint=_NINE_DIGITS),
    Detector(
        "IPV6",
        re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"),
        _is_ipv6,
        hint=_TWO_COLON_GROUPS,
    ),
    Detector(
        "IPV4", re.compile(r"(?<![\d.])\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\d.])"), _is_ipv4, hint=_DIGIT_DOT_DIGIT
    ),
    Detector(
        "PHONE",
        re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]?\d{2,4}){1,5}(?!\w)"),
        _is_phone,
        hint=_NINE_DIGITS,
    ),
)

# Order is priority: where two detectors match overlapping text, the earlier one wins (a card number
# is not also a phone number; a key inside a PEM block is part of the block).
BUILTIN_DETECTORS: tuple[Detector, ...] = SECRET_DETECTORS + PERSONAL_DETECTORS

# Strings in a dead letter that are structure, not content: scrubbing them could only mangle them
# (a UUID's digit groups can look like a phone number).
_STRUCTURAL = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|\d{4}-\d{2}-\d{2}[T ][\d:.]+(?:Z|[+-]\d{2}:?\d{2})?"
)


# ------------------------------------------------------------------------------------------ redactor


@dataclass(frozen=True)
class Finding:
    """A value a detector found: where it is, what it is, and whether it is a secret."""

    start: int
    end: int
    label: str
    secret: bool


class Redactor:
    """Replaces personal data and secrets according to policies; `scrub(None)` is None.

    `policy` applies to personal data in text (prompts, answers, comments, metadata values);
    `user_policy` to whole identities (`user_id`, a person's feedback `actor`, metadata values under
    `identity_keys`). Secrets are removed under both `redact` and `hash`; `off` keeps everything.
    """

    def __init__(
        self,
        policy: PrivacyPolicy = PrivacyPolicy.redact,
        *,
        salt: str = "",
        extra_patterns: Mapping[str, str] | None = None,
        user_policy: PrivacyPolicy = PrivacyPolicy.hash,
        identity_keys: Sequence[str] = DEFAULT_IDENTITY_KEYS,
    ) -> None:
        self.policy = PrivacyPolicy(policy)
        self.user_policy = PrivacyPolicy(user_policy)
        self._salt = salt.encode()
        self._identity_keys = frozenset(key.lower() for key in identity_keys)
        extras = tuple(Detector(name.upper(), re.compile(pattern)) for name, pattern in (extra_patterns or {}).items())
        self._detectors = BUILTIN_DETECTORS + extras
        self._remembered: dict[str, str] | None = None

    def remembering(self) -> Redactor:
        """This redactor, scrubbing each distinct text once: for one batch of events, where the same system
        prompt, answer or message (an event's input text repeats its messages) comes again and again. The
        memory holds no more than the batch does, and goes with it."""
        twin = copy.copy(self)
        twin._remembered = {}  # noqa: SLF001 - a copy of this very class
        return twin

    # ---------------------------------------------------------------------------------- values

    def scrub(self, text: str | None) -> str | None:
        """The text with every detected value replaced."""
        if not text or self.policy is PrivacyPolicy.off:
            return text
        if self._remembered is None:
            return self._scrub(text)
        scrubbed = self._remembered.get(text)
        if scrubbed is None:
            scrubbed = self._remembered[text] = self._scrub(text)
        return scrubbed

    def _scrub(self, text: str) -> str:
        return self.replaced(text, self.findings(text))

    def findings(self, text: str) -> list[Finding]:
        """Every personal value and secret in `text`, in order, none overlapping (the earlier detector wins)."""
        found: list[Finding] = []
        lowered = text.lower()
        for detector in self._detectors:
            if detector.hint is not None and not detector.hint(text, lowered):
                continue
            for start, end in detector.spans(text, lowered):
                if any(start < taken.end and taken.start < end for taken in found):
                    continue
                found.append(Finding(start, end, detector.label, detector.secret))
        return sorted(found, key=lambda finding: finding.start)

    def replaced(self, text: str, findings: Sequence[Finding]) -> str:
        """`text` with each of `findings` (in order, none overlapping) replaced as this redactor's policy says."""
        if not findings:
            return text
        pieces, cursor = [], 0
        for finding in findings:
            pieces.append(text[cursor : finding.start])
            value = text[finding.start : finding.end]
            pieces.append(f"[{finding.label}]" if finding.secret else self._token(finding.label, value, self.policy))
            cursor = finding.end
        pieces.append(text[cursor:])
        return "".join(pieces)

    def scrub_user(self, user_id: str | None) -> str | None:
        """A whole identity replaced by the user policy: `[USER]`, or `[USER:<16 hex>]` equal for equal ids."""
        if not user_id or self.user_policy is PrivacyPolicy.off or _USER_TOKEN.fullmatch(user_id):
            return user_id
        if self.user_policy is PrivacyPolicy.hash:
            return f"[{USER_LABEL}:{self._digest(user_id)[:16]}]"
        return f"[{USER_LABEL}]"

    def scrub_metadata(self, metadata: Mapping[str, str]) -> dict[str, str]:
        """Values under identity keys replaced whole; other values (and the keys) scrubbed as text."""
        return {
            self.scrub(key) or key: self.scrub_user(value) if key.lower() in self._identity_keys else self.scrub(value)  # type: ignore[misc]
            for key, value in metadata.items()
        }

    def scrub_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Chat messages with every string but the role scrubbed (content, a sender's `name`)."""
        return [
            {
                key: self.scrub(value) if isinstance(value, str) and key != "role" else value
                for key, value in message.items()
            }
            for message in messages
        ]

    # ---------------------------------------------------------------------------------- events

    def scrub_inference(self, event: InferenceLogged) -> InferenceLogged:
        """The event as it may be published or stored: texts, user id and metadata scrubbed."""
        return event.model_copy(
            update={
                "user_id": self.scrub_user(event.user_id),
                "input_messages": self.scrub_messages(event.input_messages),
                "input_text": self.scrub(event.input_text),
                "output_text": self.scrub(event.output_text),
                "error": self.scrub(event.error),
                "metadata": self.scrub_metadata(event.metadata),
            }
        )

    def scrub_feedback(self, event: FeedbackReceived) -> FeedbackReceived:
        """The feedback as it may be published or stored: comment, correction, tags and a person's actor id scrubbed."""
        return event.model_copy(
            update={
                "comment": self.scrub(event.comment),
                "correction": self.scrub(event.correction),
                "tags": [self.scrub(tag) or tag for tag in event.tags],
                # A judge's actor names a model, and a reviewer's is the principal of the key that sent it
                # (as the registry's audit log records principals): neither is an end user's id.
                "actor": event.actor
                if event.source in (FeedbackSource.judge, FeedbackSource.reviewer)
                else self.scrub_user(event.actor),
            }
        )

    def scrub_span(self, span: SpanLogged) -> SpanLogged:
        """The span as it may be published or stored, scrubbed as an inference is: its name, input, output
        and error as text, its user id whole, and its attributes as metadata (values under identity keys
        whole). Scrubbing a scrubbed span changes nothing, so every path that carries one may scrub it."""
        return span.model_copy(
            update={
                "name": self.scrub(span.name) or span.name,
                "input_text": self.scrub(span.input_text),
                "output_text": self.scrub(span.output_text),
                "error": self.scrub(span.error),
                "user_id": self.scrub_user(span.user_id),
                "attributes": self.scrub_metadata(span.attributes),
            }
        )

    def scrub_bytes(self, value: bytes) -> tuple[bytes, str]:
        """A message value fit to keep, and what was done: `clean` (unchanged), `scrubbed`, or `withheld`
        (not UTF-8, so it cannot be searched: nothing of it is kept).

        JSON is scrubbed string by string, identities by key, and re-serialised only when something was
        found, so a clean message stays byte for byte what was sent.
        """
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return b"", "withheld"
        try:
            document = json.loads(text)
        except ValueError:
            scrubbed = self.scrub(text)
            return (value, "clean") if scrubbed == text else (scrubbed.encode(), "scrubbed")  # type: ignore[union-attr]
        cleaned = self._scrub_json(document, key=None)
        if cleaned == document:
            return value, "clean"
        return json.dumps(cleaned, ensure_ascii=False, separators=(",", ":")).encode(), "scrubbed"

    def _scrub_json(self, node: Any, key: str | None) -> Any:
        if isinstance(node, dict):
            return {(self.scrub(name) or name): self._scrub_json(child, name) for name, child in node.items()}
        if isinstance(node, list):
            return [self._scrub_json(child, key) for child in node]
        if isinstance(node, str):
            if key is not None and key.lower() in self._identity_keys | {"actor"}:
                return self.scrub_user(node)
            return node if _STRUCTURAL.fullmatch(node) else self.scrub(node)
        return node

    # ---------------------------------------------------------------------------------- tokens

    def _digest(self, value: str) -> str:
        return hashlib.sha256(self._salt + value.encode()).hexdigest()

    def _token(self, label: str, value: str, policy: PrivacyPolicy) -> str:
        if policy is PrivacyPolicy.hash:
            return f"[{label}:{self._digest(value)[:12]}]"
        return f"[{label}]"


# ------------------------------------------------------------------------------------------ settings


class PrivacySettings(BaseSettings):
    """What personal data becomes before the gateway publishes it and before the sink stores it
    (`FLYWHEEL_PRIVACY_*`). Shared by serving and feedback: equal salts keep hashed tokens equal
    across both paths, so an app's own events join the gateway's."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_PRIVACY_", extra="ignore")

    policy: PrivacyPolicy = Field(
        default=PrivacyPolicy.redact,
        description="Personal data in text (prompts, answers, comments, corrections, metadata values): `redact` ([EMAIL]), `hash` ([EMAIL:3f2a9c0d11be], equal values equal) or `off`. Secrets are removed under both redact and hash.",
    )
    user_policy: PrivacyPolicy = Field(
        default=PrivacyPolicy.hash,
        description="End-user ids (`user_id`, a person's feedback actor, metadata values under identity_keys), replaced whole: `hash` (the default: [USER:<16 hex>], the same user gives the same token, so counts and joins per user still work; set a salt), `redact` ([USER]) or `off`.",
    )
    identity_keys: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IDENTITY_KEYS),
        description="Metadata keys whose values are identities, replaced whole by user_policy (JSON list).",
    )
    salt: str = Field(
        default="",
        description="Salt of the `hash` policies; without one, a hashed email or user id can be guessed from a list of candidates. Keep it secret and equal across services.",
    )
    patterns: dict[str, str] = Field(
        default_factory=dict, description='Extra patterns as JSON, e.g. {"employee_id": "EMP-\\\\d{6}"}.'
    )

    # The variables these settings had when only the sink used them; still read when the new ones are unset.
    legacy_policy: PrivacyPolicy | None = Field(
        default=None, validation_alias=AliasChoices("FLYWHEEL_FEEDBACK_PRIVACY_POLICY"), exclude=True
    )
    legacy_salt: str | None = Field(
        default=None, validation_alias=AliasChoices("FLYWHEEL_FEEDBACK_PRIVACY_SALT"), exclude=True
    )
    legacy_patterns: dict[str, str] | None = Field(
        default=None, validation_alias=AliasChoices("FLYWHEEL_FEEDBACK_PRIVACY_PATTERNS"), exclude=True
    )

    @field_validator("patterns", "legacy_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: dict[str, str] | None) -> dict[str, str] | None:
        for name, pattern in (patterns or {}).items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                raise ValueError(f"pattern name {name!r} must be letters, digits and _")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"pattern {name!r} is not a valid regular expression: {error}") from None
        return patterns

    @model_validator(mode="after")
    def _legacy_names(self) -> PrivacySettings:
        for name in ("policy", "salt", "patterns"):
            legacy = getattr(self, f"legacy_{name}")
            if legacy is not None and name not in self.model_fields_set:
                setattr(self, name, legacy)
        return self

    def redactor(self) -> Redactor:
        """The redactor these settings describe; warns when hashing without a salt."""
        if PrivacyPolicy.hash in (self.policy, self.user_policy) and not self.salt:
            log.warning(
                "FLYWHEEL_PRIVACY_SALT is unset: hashed user ids and values can be recovered by hashing a list of candidates; set a secret salt, the same for every service"
            )
        return Redactor(
            self.policy,
            salt=self.salt,
            extra_patterns=self.patterns,
            user_policy=self.user_policy,
            identity_keys=self.identity_keys,
        )


def dead_letter_redactor() -> Redactor:
    """What dead letters are scrubbed with: everything redacted, nothing hashed, so no salt is needed
    and nothing in a dead letter can be matched against a guess."""
    return Redactor(PrivacyPolicy.redact, user_policy=PrivacyPolicy.redact)
