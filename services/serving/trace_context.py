"""W3C Trace Context at the gateway: where a call sits in its caller's trace, and the gateway's own span.

A caller that sends `traceparent` (an OpenTelemetry-instrumented httpx or openai client does) gets
the gateway's spans as children of its own span; one that sends none, or one the W3C rules make
invalid, starts a new trace with the gateway's span as its root. An invalid header never fails
the request: the W3C spec says a receiver that cannot parse `traceparent` restarts the trace.

Parsing is OpenTelemetry's own TraceContextTextMapPropagator (opentelemetry-api, already pinned in
requirements.lock, which FastAPI itself requires), so the gateway reads the header exactly as the
SDKs that write it: version 00 with exactly four fields, a future version's extra fields ignored,
version ff, all-zero ids, uppercase or wrong-length hex refused, and `tracestate` dropped whole when
any member is malformed or the header is too long. The propagator takes the first of repeated
headers; the spec's test suite treats a repeated `traceparent` as invalid, so this module does.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from contracts.ids import INFERENCE_ID_MAX_LENGTH, INFERENCE_ID_PATTERN

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
SESSION_HEADER = "x-flywheel-session-id"
"""The conversation a call belongs to (SessionId's form); stored on the gateway's spans and inference."""

SAMPLED = 0x01
_PROPAGATOR = TraceContextTextMapPropagator()
_SESSION = re.compile(INFERENCE_ID_PATTERN)


def new_trace_id() -> str:
    return _random_hex(16)


def new_span_id() -> str:
    return _random_hex(8)


def _random_hex(size: int) -> str:
    while True:  # an all-zero id is invalid (W3C); one in 2**64 draws at worst
        value = secrets.token_hex(size)
        if value.strip("0"):
            return value


@dataclass(frozen=True)
class CallerSpan:
    """The caller's span, as its valid `traceparent` named it, and the `tracestate` that came with it."""

    trace_id: str
    span_id: str
    flags: int
    tracestate: str | None


def caller_span(traceparent: Sequence[str], tracestate: Sequence[str] = ()) -> CallerSpan | None:
    """The caller's span from the values of the request's `traceparent` and `tracestate` headers, or
    None (start a new trace) when there is none or it is not valid trace context."""
    if len(traceparent) != 1:
        return None
    carrier = (
        {TRACEPARENT: list(traceparent), TRACESTATE: list(tracestate)}
        if tracestate
        else {TRACEPARENT: list(traceparent)}
    )
    context = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
    if not context.is_valid:
        return None
    state = context.trace_state.to_header() if context.trace_state else None
    return CallerSpan(
        trace_id=trace.format_trace_id(context.trace_id),
        span_id=trace.format_span_id(context.span_id),
        flags=int(context.trace_flags),
        tracestate=state or None,
    )


def valid_session_id(value: str | None) -> str | None:
    """`value` when it has SessionId's form, else None."""
    if value and len(value) <= INFERENCE_ID_MAX_LENGTH and _SESSION.fullmatch(value):
        return value
    return None


@dataclass(frozen=True)
class CallTrace:
    """One gateway call's place in a trace: its trace, its server span, and that span's parent (the
    caller's span, or None when the call opened the trace)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    flags: int = SAMPLED
    tracestate: str | None = None
    session_id: str | None = None

    @classmethod
    def start(cls, caller: CallerSpan | None = None, session_id: str | None = None) -> CallTrace:
        """The server span of a new call: a child of `caller`'s span, or the root of a new trace."""
        if caller is None:
            return cls(new_trace_id(), new_span_id(), session_id=session_id)
        # The gateway records every call, so its span is sampled whatever the caller decided; other
        # flags (Trace Context Level 2's random-trace-id) are the caller's and pass through.
        return cls(
            caller.trace_id,
            new_span_id(),
            parent_span_id=caller.span_id,
            flags=caller.flags | SAMPLED,
            tracestate=caller.tracestate,
            session_id=session_id,
        )

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def response_headers(self) -> dict[str, str]:
        """What the response carries so the caller can link to the gateway's span (and its tracestate, unchanged)."""
        headers = {TRACEPARENT: self.traceparent}
        if self.tracestate:
            headers[TRACESTATE] = self.tracestate
        return headers
