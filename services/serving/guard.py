"""The gateway's guards: secrets and personal data kept out of the model's input and out of its answers,
inline, before a request reaches the model and before an answer leaves the gateway.

The detectors are the sink's redactor's (services/runtime/privacy.py), one implementation: what the
platform would scrub from storage is what a guard finds. Each kind has an action: `off`, `flag` (the
text goes on as it is, the finding is recorded), `redact` (each value is replaced as the redactor
replaces it, `[CARD]`, `[OPENAI_KEY]`, ...) or `block` (the request is refused, or the answer does not
go out; the caller gets an error naming the guard and what it found).

Streams are checked as they are decoded. A value can only be judged once it is whole, so the guard
holds back the last HOLD_CHARS characters of the text (longer than any card, phone number, IBAN or key
prefix a detector needs to recognise) and any finding that still reaches the end of the text (a key or
a private-key block whose end has not been decoded yet); everything before is released, redacted.
The held text goes out when the answer ends. A blocked stream ends with an error event, and nothing
of the blocked value has left. What a client receives in pieces is exactly what it would have
received whole.

The input guard also screens what the caller wrote (user and tool messages, a completion's prompt,
a prompt_ref's variables) for prompt injection and jailbreaks (services/runtime/scoring/injection.py:
phrase rules and a classifier on MiniLM embeddings, measured by `flywheel bench injection`). An
injection can be flagged or blocked, not redacted: there is no value to replace.

The output guard also finds unsafe content (the lexicon of services/runtime/scoring/safety.py, shared
with the evaluator and the monitor), labelled UNSAFE_<CATEGORY> and judged like a value as the answer
streams, and checks that a chat answer whose request set `response_format` is the JSON it asked for
(services/runtime/scoring/format.py, the evaluator's check), and that an answer is grounded in the
context its request supplied (services/runtime/scoring/grounding.py, the evaluator's score). Only the
whole answer can be judged for those two: a blocking check holds a stream's text back until it ends. A
groundedness check that only flags changes nothing the caller receives, so the answer does not wait for
its MiniLM pass: the gateway scores it after the answer has gone out and logs the call once scored.
The input screen also finds requests on a denied topic (services/runtime/scoring/topics.py).

Which actions apply is a model's guard policy (GuardPolicy: the registry's active version, or the
gateway's settings).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from contracts.events import GuardAction, GuardOutcome, GuardPolicySpec
from contracts.http import ResponseFormat
from services.runtime.privacy import Finding, PrivacyPolicy, Redactor
from services.runtime.scoring.injection import InjectionDetector, InjectionScore
from services.runtime.scoring.format import FormatCheck, checked_validator, json_validity
from services.runtime.scoring.grounding import Embedder, GroundednessScore, score_groundedness
from services.runtime.scoring.safety import unsafe_spans
from services.runtime.scoring.topics import TopicMatcher

# Longer than the longest text a detector needs before it matches: 19 card digits with separators (37),
# an IBAN (42), a keyword, 40 characters and a credential's first 4 (about 100).
HOLD_CHARS = 128
INJECTION_LABEL = "PROMPT_INJECTION"
# An unsafe phrase's label: UNSAFE_ and its lexicon category (services/runtime/scoring/safety.py).
UNSAFE_PREFIX = "UNSAFE_"
# An answer that is not the JSON its request's response_format asked for.
INVALID_JSON = "INVALID_JSON"
# What the caller wrote is on a denied topic: TOPIC_ and the topic's name.
TOPIC_PREFIX = "TOPIC_"
# An answer not grounded in the context its request supplied.
UNGROUNDED = "UNGROUNDED"
SCHEMA_MAX_BYTES = 16_384
# The classifier reads at most this many of a request's texts (the latest); the rules read them all.
INJECTION_TEXTS = 16
_SEVERITY = (GuardOutcome.passed, GuardOutcome.flagged, GuardOutcome.redacted, GuardOutcome.blocked)


class ContentBlocked(Exception):
    """The text holds what the guard blocks; `labels` names what was found."""

    def __init__(
        self,
        check: str,
        labels: tuple[str, ...],
        verdict: GuardVerdict,
        policy: str | None = None,
        detail: str | None = None,
    ) -> None:
        subject = "answer" if check == "output" else "request"
        by = f"the {check} guard of guard policy {policy}" if policy else f"the {check} guard"
        why = f"it contained {', '.join(labels)}" + (f" ({detail})" if detail else "")
        super().__init__(f"the {subject} was blocked by {by}: {why}")
        self.labels = labels
        self.verdict = verdict


@dataclass
class GuardVerdict:
    """What the guard did to one answer: its outcome (passed, flagged, redacted, blocked), the labels
    of what it found, and the time its checks took."""

    outcome: GuardOutcome = GuardOutcome.passed
    labels: set[str] = field(default_factory=set)
    checked_ms: float = 0.0
    started_ns: int = 0
    ended_ns: int = 0
    injection_probability: float | None = None  # the deciding stage's probability, when the screen ran
    injection_stage: str | None = None  # which stage decided: rules, words or meaning (MiniLM)
    groundedness: float | None = None  # the answer's groundedness score, when it was checked against a context
    topic_similarity: float | None = None  # the closest any text came to a denied topic's example, when screened

    def replayed(self) -> GuardVerdict:
        """This verdict for a later call that reuses it (a cache hit on the same input): no time spent now."""
        now = time.time_ns()
        return dataclasses.replace(self, labels=set(self.labels), checked_ms=0.0, started_ns=now, ended_ns=now)

    def merge(self, other: GuardVerdict) -> GuardVerdict:
        """One verdict for two checks of the same side: the more severe outcome, every label, both times."""
        return GuardVerdict(
            outcome=max(self.outcome, other.outcome, key=_SEVERITY.index),
            labels=self.labels | other.labels,
            checked_ms=self.checked_ms + other.checked_ms,
            started_ns=min(ns for ns in (self.started_ns, other.started_ns, time.time_ns()) if ns),
            ended_ns=max(self.ended_ns, other.ended_ns),
            injection_probability=other.injection_probability
            if other.injection_probability is not None
            else self.injection_probability,
            injection_stage=other.injection_stage or self.injection_stage,
            groundedness=other.groundedness if other.groundedness is not None else self.groundedness,
            topic_similarity=other.topic_similarity if other.topic_similarity is not None else self.topic_similarity,
        )


class ContentGuard:
    """One policy for one side of a call (`check`: input or output): an action for secrets, one for personal
    data, and on the input side one for prompt injection."""

    def __init__(
        self,
        *,
        secrets: GuardAction,
        personal: GuardAction,
        check: str = "output",
        injection: GuardAction = GuardAction.off,
        redactor: Redactor | None = None,
        detector: InjectionDetector | None = None,
        policy: str | None = None,
        unsafe: GuardAction = GuardAction.off,
        json_schema: GuardAction = GuardAction.off,
        grounding: GuardAction = GuardAction.off,
        grounding_floor: float = 0.5,
        embedder: Embedder | None = None,
        topics: GuardAction = GuardAction.off,
        topic_matcher: TopicMatcher | None = None,
    ) -> None:
        self.check = check
        self.policy = policy  # the registry policy version it enforces (`name:vN`), named when it blocks
        self.secrets = GuardAction(secrets)
        self.personal = GuardAction(personal)
        self.injection = GuardAction(injection)
        self.unsafe = GuardAction(unsafe)
        self.json_schema = GuardAction(json_schema)
        self.grounding = GuardAction(grounding)
        self.grounding_floor = grounding_floor
        answer_checks = (self.unsafe, self.json_schema, self.grounding)
        if any(action is not GuardAction.off for action in answer_checks) and check != "output":
            raise ValueError(
                "unsafe content, JSON structure and groundedness are checked in the answer, not in the request"
            )
        if GuardAction.redact in (self.json_schema, self.grounding):
            raise ValueError(
                "an answer that is not the JSON asked for, or not grounded, cannot be redacted: flag or block it"
            )
        self._embedder = embedder if self.grounding is not GuardAction.off else None
        if self.grounding is not GuardAction.off and embedder is None:
            raise ValueError("the groundedness check needs MiniLM: pass the gateway's embedder")
        if self.injection is GuardAction.redact:
            raise ValueError("a prompt injection cannot be redacted (there is no value to replace): flag or block it")
        if self.injection is not GuardAction.off and check != "input":
            raise ValueError("prompt injection is screened in the input, not in the answer")
        # Personal values are replaced by a label, never hashed: neither the model nor a reader is an analyst.
        self._redactor = redactor or Redactor(PrivacyPolicy.redact)
        self._detector = detector or (InjectionDetector() if self.injection is not GuardAction.off else None)
        self.topics = GuardAction(topics)
        if self.topics is not GuardAction.off and (check != "input" or topic_matcher is None):
            raise ValueError("denied topics are screened in the request, with their examples' TopicMatcher")
        if self.topics is GuardAction.redact:
            raise ValueError("a denied topic cannot be redacted (there is no value to replace): flag or block it")
        self._topics = topic_matcher if self.topics is not GuardAction.off else None

    @property
    def reads_values(self) -> bool:
        """Whether it looks for secrets or personal data."""
        return self.secrets is not GuardAction.off or self.personal is not GuardAction.off

    @property
    def screens(self) -> bool:
        """Whether it reads what the caller wrote (for injection, or denied topics)."""
        return self.injection is not GuardAction.off or self.topics is not GuardAction.off

    @property
    def enabled(self) -> bool:
        return self.reads_values or any(
            action is not GuardAction.off
            for action in (self.injection, self.topics, self.unsafe, self.json_schema, self.grounding)
        )

    def warm(self) -> None:
        """Load the injection classifier and embed the topics' examples now, so that the first request does
        not wait for them."""
        if self._detector is not None:
            self._detector.warm()
        if self._topics is not None:
            self._topics.warm()

    async def screen(self, texts: Sequence[str]) -> GuardVerdict:
        """The verdict on what a caller wrote; ContentBlocked when it holds an injection, or is on a denied
        topic, that the policy blocks."""
        verdict = GuardVerdict(started_ns=time.time_ns())
        if not self.screens or not texts:
            verdict.ended_ns = time.time_ns()
            return verdict
        started = time.perf_counter_ns()
        latest = list(texts[-INJECTION_TEXTS:])
        found: dict[str, GuardAction] = {}
        # Most texts are decided by the rules and the word model at once; only MiniLM leaves the event loop,
        # and once per request for both of its uses (a thread hop on two busy cores costs more than those
        # two stages).
        scores = self._detector.quick(latest) if self._detector is not None else None
        matched: dict[str, float] = {}
        if (self._detector is not None and scores is None) or self._topics is not None:
            scores, matched = await asyncio.to_thread(self._read_meaning, latest, scores)
        if self._detector is not None and scores is not None:
            if any(score.injection for score in scores) or any(
                self._detector.rules_match(text) for text in texts[:-INJECTION_TEXTS]
            ):
                found[INJECTION_LABEL] = self.injection
            # The verdict names the text that decided: an injection if there is one, else the most suspicious.
            decisive = max(scores, key=lambda score: (score.injection, score.probability))
            verdict.injection_probability, verdict.injection_stage = decisive.probability, decisive.stage
        if self._topics is not None:
            verdict.topic_similarity = matched.pop("")
            found |= {f"{TOPIC_PREFIX}{name}": self.topics for name in matched}
        verdict.checked_ms = (time.perf_counter_ns() - started) / 1e6
        verdict.ended_ns = time.time_ns()
        verdict.labels.update(found)
        blocked = tuple(sorted(label for label, action in found.items() if action is GuardAction.block))
        if blocked:
            verdict.outcome = GuardOutcome.blocked
            raise ContentBlocked(self.check, blocked, verdict, self.policy)
        if found:
            verdict.outcome = GuardOutcome.flagged
        return verdict

    def _read_meaning(
        self, texts: list[str], decided: list[InjectionScore] | None
    ) -> tuple[list[InjectionScore] | None, dict[str, float]]:
        """MiniLM's part of the screen, off the event loop: the injection scores (`decided` when the word
        model was sure of every text), and the denied topics the texts are on."""
        if decided is None and self._detector is not None:
            decided = self._detector.score(texts)
        return decided, self._topics.matches(texts) if self._topics is not None else {}

    def action(self, finding: Finding) -> GuardAction:
        if finding.label.startswith(UNSAFE_PREFIX):
            return self.unsafe
        return self.secrets if finding.secret else self.personal

    def stream(self, structure: dict[str, Any] | None = None, context: str | None = None) -> GuardedText:
        """A guarded answer; `structure`: the JSON Schema the request's response_format asks for; `context`:
        what the request says the answer must be grounded in."""
        return GuardedText(
            self,
            structure if self.json_schema is not GuardAction.off else None,
            context if self.grounding is not GuardAction.off else None,
        )

    def whole(self, text: str, structure: dict[str, Any] | None = None) -> tuple[str, GuardVerdict]:
        """The answer as it may go out, and the verdict; ContentBlocked when it may not (no groundedness:
        that needs `answer`, off the event loop)."""
        guarded = self.stream(structure)
        released = guarded.feed(text) + guarded.finish()
        return released, guarded.verdict

    async def answer(
        self, text: str, structure: dict[str, Any] | None = None, context: str | None = None
    ) -> tuple[str, GuardedText]:
        """The whole answer as it may go out, and its guarded text (whose `verdict` is the guard's);
        ContentBlocked when it may not. With a context, a blocking groundedness check is judged first
        (MiniLM, off the event loop); one that only flags is left to `ground`, once the answer has gone."""
        guarded = self.stream(structure, context)
        released = guarded.feed(text)
        if not guarded.grounds_after_release:
            await guarded.ground()
        return released + guarded.finish(), guarded

    def grounding_score(self, text: str, context: str) -> GroundednessScore:
        assert self._embedder is not None
        return score_groundedness([text], [context], self._embedder)[0]

    def _acted_on(self, text: str) -> list[Finding]:
        """The findings in `text` the policy does something with, in order, none overlapping (a value the
        redactor found wins over an unsafe phrase around it)."""
        found = (
            [finding for finding in self._redactor.findings(text) if self.action(finding) is not GuardAction.off]
            if self.reads_values
            else []
        )
        if self.unsafe is GuardAction.off:
            return found
        for start, end, category in unsafe_spans(text):
            if not any(start < taken.end and taken.start < end for taken in found):
                # Marked secret: redacted to its label, like a key, never hashed.
                found.append(Finding(start, end, f"{UNSAFE_PREFIX}{category.upper()}", True))
        return sorted(found, key=lambda finding: finding.start)

    def _judge(self, settled: list[Finding], verdict: GuardVerdict) -> None:
        """Record settled findings on the verdict; ContentBlocked when one of them is blocked."""
        if not settled:
            return
        verdict.labels.update(finding.label for finding in settled)
        blocked = {finding.label for finding in settled if self.action(finding) is GuardAction.block}
        if blocked:
            verdict.outcome = GuardOutcome.blocked
            raise ContentBlocked(self.check, tuple(sorted(blocked)), verdict, self.policy)
        if any(self.action(finding) is GuardAction.redact for finding in settled):
            verdict.outcome = GuardOutcome.redacted
        elif verdict.outcome is GuardOutcome.passed:
            verdict.outcome = GuardOutcome.flagged

    def _replaced(self, text: str, findings: list[Finding]) -> str:
        return self._redactor.replaced(
            text, [finding for finding in findings if self.action(finding) is GuardAction.redact]
        )


@dataclass(frozen=True)
class GuardPolicy:
    """What guards one call: a registry policy version (`label` is `name:vN`) or the gateway's own
    settings (`label` None): a guard for each side of the call, and how the response cache may be used."""

    label: str | None
    input: ContentGuard
    output: ContentGuard
    cache_shared: bool = False
    semantic_threshold: float | None = None

    @classmethod
    def of(
        cls, spec: GuardPolicySpec, label: str | None, detector: InjectionDetector, embedder: Embedder
    ) -> GuardPolicy:
        """The guards `spec` declares; `detector` and `embedder` (MiniLM) are shared by every policy. The
        denied topics read the request with the detector's MiniLM, so that its text is embedded once."""
        screens = spec.input_injection is not GuardAction.off
        topics = (
            TopicMatcher(spec.denied_topics, spec.denied_topic_threshold, detector.embedder)
            if spec.input_denied_topics is not GuardAction.off
            else None
        )
        return cls(
            label=label,
            input=ContentGuard(
                check="input",
                secrets=spec.input_secrets,
                personal=spec.input_personal,
                injection=spec.input_injection,
                detector=detector if screens else None,
                topics=spec.input_denied_topics,
                topic_matcher=topics,
                policy=label,
            ),
            output=ContentGuard(
                check="output",
                secrets=spec.output_secrets,
                personal=spec.output_personal,
                unsafe=spec.output_unsafe,
                json_schema=spec.output_json_schema,
                grounding=spec.output_groundedness,
                grounding_floor=spec.groundedness_floor,
                embedder=embedder,
                policy=label,
            ),
            cache_shared=spec.cache_shared,
            semantic_threshold=spec.cache_semantic_threshold,
        )

    @property
    def needs_meaning(self) -> bool:
        """Whether it uses MiniLM: the injection screen, the groundedness check, or the semantic cache."""
        return self.input.screens or self.output.grounding is not GuardAction.off or self.semantic_threshold is not None


def answer_structure(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    """The JSON Schema a chat answer must satisfy, from its request's response_format (None: no structure
    asked for); SchemaRefused when the schema is not one the gateway runs on model output.

    The schema comes from the caller and runs on every answer: a `pattern` is a regular expression Python
    would backtrack on (a ReDoS against the gateway) and a `$ref` outside the schema could name a URL, so
    both are refused, as are invalid schemas and ones over SCHEMA_MAX_BYTES."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object" or response_format.json_schema is None:
        return {"type": "object"}
    schema = response_format.json_schema.json_schema or {}
    schema_json = json.dumps(schema, sort_keys=True)
    if len(schema_json) > SCHEMA_MAX_BYTES:
        raise SchemaRefused(f"response_format's schema is over {SCHEMA_MAX_BYTES} bytes")
    return _runnable(schema_json)


@functools.lru_cache(maxsize=256)
def _runnable(schema_json: str) -> dict[str, Any]:
    """The schema, once it is one the gateway runs (see answer_structure). Remembered: the checks take
    about 0.4 ms, and a structured route sends the same schema with every request. Callers only read it."""
    schema: dict[str, Any] = json.loads(schema_json)
    for key, value in _walk(schema):
        if key in ("pattern", "patternProperties"):
            raise SchemaRefused(f"response_format's schema may not use {key} (regular expressions are refused)")
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise SchemaRefused("response_format's schema may $ref only within itself (#/...)")
    import jsonschema
    from referencing.exceptions import Unresolvable

    try:
        validator = checked_validator(schema_json)
        # A $ref cycle that consumes nothing of the document ({"$ref": "#"}) never ends on any answer.
        for probe in ({}, [], "", 0, None):
            any(validator(schema).iter_errors(probe))
    except jsonschema.SchemaError as error:
        raise SchemaRefused(f"response_format's schema is invalid: {error.message}") from None
    except (RecursionError, Unresolvable) as error:
        raise SchemaRefused(f"response_format's schema cannot be applied: {type(error).__name__}") from None
    return schema


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every key of a JSON document with its value, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


class SchemaRefused(ValueError):
    """A response_format schema the gateway will not run."""


class GuardedText:
    """One answer's text as it is decoded: `feed` each piece, and get back what may go out now."""

    def __init__(
        self, guard: ContentGuard, structure: dict[str, Any] | None = None, context: str | None = None
    ) -> None:
        self._guard = guard
        self._structure = structure
        self._context = context
        # Only a whole answer can be judged JSON, or grounded: a blocking check holds it all back until then.
        self._hold_all = (structure is not None and guard.json_schema is GuardAction.block) or (
            context is not None and guard.grounding is GuardAction.block
        )
        self._text = ""  # everything decoded so far
        self._released = 0  # how much of it went out
        self.verdict = GuardVerdict()

    def feed(self, piece: str) -> str:
        self._text += piece
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if not self._text:
            return ""
        started = time.perf_counter_ns()
        self.verdict.started_ns = self.verdict.started_ns or time.time_ns()
        try:
            return self._settle(final)
        finally:
            self.verdict.checked_ms += (time.perf_counter_ns() - started) / 1e6
            self.verdict.ended_ns = time.time_ns()

    @property
    def grounds_after_release(self) -> bool:
        """Whether the groundedness check only flags: the answer then goes out without waiting for MiniLM,
        and `ground` runs after it has gone (only the call's record waits for the score)."""
        return self._context is not None and self._guard.grounding is GuardAction.flag

    async def ground(self) -> None:
        """Judge the whole answer's groundedness in its context (once it is whole: before `finish` when
        the policy blocks, after the answer has gone out when it only flags); ContentBlocked when the
        policy blocks an ungrounded answer."""
        if self._context is None:
            return
        started = time.perf_counter_ns()
        self.verdict.started_ns = self.verdict.started_ns or time.time_ns()
        score = await asyncio.to_thread(self._guard.grounding_score, self._text, self._context)
        self.verdict.checked_ms += (time.perf_counter_ns() - started) / 1e6
        self.verdict.ended_ns = time.time_ns()
        self.verdict.groundedness = score.score
        floor = self._guard.grounding_floor
        if score.score >= floor and not score.unsupported_numbers:
            return
        self.verdict.labels.add(UNGROUNDED)
        if self._guard.grounding is GuardAction.block:
            self.verdict.outcome = GuardOutcome.blocked
            why = (
                f"groundedness {score.score:.2f} is under the floor {floor:.2f}"
                if score.score < floor
                # Counted, not named: an invented number may be a card's digits, and the error is logged.
                else f"it states {len(score.unsupported_numbers)} number(s) the context does not have"
            )
            raise ContentBlocked("output", (UNGROUNDED,), self.verdict, self._guard.policy, why)
        if self.verdict.outcome is GuardOutcome.passed:
            self.verdict.outcome = GuardOutcome.flagged

    def _judge_structure(self, schema: dict[str, Any]) -> None:
        try:
            check = json_validity(self._text, schema)
        except RecursionError:  # a $ref cycle the probes did not reach, or a document nested beyond reason
            check = FormatCheck(False, "the answer could not be checked: it or the schema nests without end")
        if check.valid:
            return
        self.verdict.labels.add(INVALID_JSON)
        if self._guard.json_schema is GuardAction.block:
            self.verdict.outcome = GuardOutcome.blocked
            # The keyword, not the validator's message: that quotes the answer's values, and the error is logged.
            why = f"{check.path}: fails {check.keyword}" if check.keyword else check.problem
            raise ContentBlocked("output", (INVALID_JSON,), self.verdict, self._guard.policy, why)
        if self.verdict.outcome is GuardOutcome.passed:
            self.verdict.outcome = GuardOutcome.flagged

    def _settle(self, final: bool) -> str:
        if not final and self._hold_all:
            return ""
        if final and self._structure is not None:
            self._judge_structure(self._structure)
        # The whole text is searched each time: a value's context (what precedes it) decides some matches.
        findings = self._guard._acted_on(self._text)  # noqa: SLF001 - the guard's own helper
        upto = len(self._text) if final else max(self._released, len(self._text) - HOLD_CHARS)
        if not final:
            for finding in findings:
                # A finding that reaches the end may still grow; one across the cut must go out whole.
                if finding.end >= len(self._text) or finding.start < upto < finding.end:
                    upto = max(self._released, min(upto, finding.start))
        if upto <= self._released:
            return ""
        # Only what goes out now is judged: a value still held may yet turn out another (twelve digits of a
        # card read as a phone number) or none at all. Clipped to the window: a value that began in text
        # already released (longer than the hold) still has its remaining part replaced.
        window = [
            Finding(
                max(finding.start, self._released) - self._released,
                min(finding.end, upto) - self._released,
                finding.label,
                finding.secret,
            )
            for finding in findings
            if finding.start < upto and finding.end > self._released
        ]
        self._guard._judge(window, self.verdict)  # noqa: SLF001
        out = self._guard._replaced(self._text[self._released : upto], window)  # noqa: SLF001
        self._released = upto
        return out
