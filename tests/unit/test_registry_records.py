"""Dataset record validation: chat and instruction records, with a message a person can act on."""

from __future__ import annotations

import pytest

from services.registry.datasets import validate_record

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, ("chat", None)),
        ({"instruction": "sum 1+1", "output": "2"}, ("instruction", None)),
        ({"instruction": "sum", "input": "1+1", "output": "2"}, ("instruction", None)),
        ({"messages": []}, ("chat", "messages must be a non-empty list")),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            ("chat", "messages[0].role must be one of assistant, system, user"),
        ),
        ({"messages": [{"role": "user", "content": 3}]}, ("chat", "messages[0].content must be a string")),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            ("chat", "the last message must be the assistant's (the target)"),
        ),
        ({"instruction": "x", "output": " "}, ("instruction", "output must be a non-empty string")),
        ([1, 2], ("", "a record must be a JSON object")),
        (
            {"text": "x"},
            ("", 'unknown record: expected {"messages": [...]} (chat) or {"instruction": ..., "output": ...}'),
        ),
    ],
)
def test_records(record: object, expected: tuple[str, str | None]) -> None:
    assert validate_record(record) == expected
