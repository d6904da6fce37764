"""W3C Trace Context at the gateway: which `traceparent` values continue the caller's trace, which start a
new one (never a refused request), and the `traceparent` the gateway answers with."""

from __future__ import annotations

import re

import pytest

from services.serving.trace_context import CallerSpan, CallTrace, caller_span, valid_session_id

pytestmark = pytest.mark.unit

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def test_a_valid_traceparent_names_the_callers_span_and_keeps_its_tracestate() -> None:
    caller = caller_span([f"00-{TRACE}-{SPAN}-01"], ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"])
    assert caller == CallerSpan(TRACE, SPAN, 0x01, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    assert caller_span([f"00-{TRACE}-{SPAN}-00"]) == CallerSpan(TRACE, SPAN, 0x00, None)


@pytest.mark.parametrize(
    "traceparent",
    [
        pytest.param(f"00-{TRACE.upper()}-{SPAN}-01", id="uppercase-trace-id"),
        pytest.param(f"00-{TRACE}-{SPAN.upper()}-01", id="uppercase-span-id"),
        pytest.param(f"00-{'0' * 32}-{SPAN}-01", id="all-zero-trace-id"),
        pytest.param(f"00-{TRACE}-{'0' * 16}-01", id="all-zero-span-id"),
        pytest.param(f"00-{TRACE[:-1]}-{SPAN}-01", id="trace-id-too-short"),
        pytest.param(f"00-{TRACE}0-{SPAN}-01", id="trace-id-too-long"),
        pytest.param(f"00-{TRACE}-{SPAN[:-1]}-01", id="span-id-too-short"),
        pytest.param(f"00-{TRACE}-{SPAN}-1", id="flags-too-short"),
        pytest.param(f"0-{TRACE}-{SPAN}-01", id="version-too-short"),
        pytest.param(f"00-{TRACE}-{SPAN}-0g", id="flags-not-hex"),
        pytest.param(f"ff-{TRACE}-{SPAN}-01", id="version-ff-is-forbidden"),
        pytest.param(f"00-{TRACE}-{SPAN}-01-extra", id="version-00-with-a-fifth-field"),
        pytest.param(f"cc-{TRACE}-{SPAN}-01.more", id="future-version-flags-not-followed-by-a-dash"),
        pytest.param(f"00_{TRACE}_{SPAN}_01", id="wrong-separators"),
        pytest.param("", id="empty"),
        pytest.param("garbage", id="garbage"),
        pytest.param(f"00-{TRACE}-{SPAN}-01" + " " * 600, id="longer-than-512"),
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(traceparent: str) -> None:
    assert caller_span([traceparent]) is None
    trace = CallTrace.start(caller_span([traceparent]))
    assert trace.parent_span_id is None and trace.trace_id != TRACE


def test_a_future_version_is_read_by_its_first_four_fields() -> None:
    # The spec: a receiver that knows version 00 parses a higher version's first four fields and ignores the rest.
    assert caller_span([f"cc-{TRACE}-{SPAN}-01-what-the-future-holds"]) == CallerSpan(TRACE, SPAN, 0x01, None)
    assert caller_span([f"01-{TRACE}-{SPAN}-09"]) == CallerSpan(TRACE, SPAN, 0x09, None)


def test_repeated_traceparent_headers_start_a_new_trace() -> None:
    assert caller_span([f"00-{TRACE}-{SPAN}-01", f"00-{TRACE}-{SPAN}-01"]) is None
    assert caller_span([]) is None


def test_a_malformed_tracestate_is_dropped_but_the_traceparent_still_counts() -> None:
    assert caller_span([f"00-{TRACE}-{SPAN}-01"], ["no spaces=allowed"]) == CallerSpan(TRACE, SPAN, 0x01, None)


def test_the_server_span_is_a_child_of_the_callers_and_sampled() -> None:
    caller = caller_span([f"00-{TRACE}-{SPAN}-00"], ["rojo=00f067aa0ba902b7"])
    trace = CallTrace.start(caller, session_id="chat-42")
    assert trace.trace_id == TRACE and trace.parent_span_id == SPAN and trace.span_id != SPAN
    assert trace.session_id == "chat-42"
    # The gateway records every call, so the span it names is sampled whatever the caller chose.
    assert trace.traceparent == f"00-{TRACE}-{trace.span_id}-01"
    assert trace.response_headers() == {"traceparent": trace.traceparent, "tracestate": "rojo=00f067aa0ba902b7"}
    assert caller_span([trace.traceparent]) == CallerSpan(TRACE, trace.span_id, 0x01, None)


def test_a_new_trace_has_fresh_valid_ids() -> None:
    first, second = CallTrace.start(), CallTrace.start()
    for trace in (first, second):
        assert re.fullmatch(r"[0-9a-f]{32}", trace.trace_id) and trace.trace_id.strip("0")
        assert re.fullmatch(r"[0-9a-f]{16}", trace.span_id) and trace.span_id.strip("0")
        assert trace.parent_span_id is None and trace.response_headers() == {"traceparent": trace.traceparent}
    assert first.trace_id != second.trace_id and first.span_id != second.span_id


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("chat-42", "chat-42"),
        ("a/b:c.d_e", "a/b:c.d_e"),
        ("", None),
        (None, None),
        ("-leading", None),
        ("x" * 129, None),
        ("sp ace", None),
    ],
)
def test_session_ids_take_the_contracts_form(value: str | None, expected: str | None) -> None:
    assert valid_session_id(value) == expected
