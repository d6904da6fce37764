"""Dataset record validation: chat, instruction and preference records, with a message a person can act on."""

from __future__ import annotations

import json

import pytest

from services.registry.datasets import validate_jsonl, validate_record
from services.registry.errors import Invalid

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
            (
                "",
                'unknown record: expected {"messages": [...]} (chat), {"instruction": ..., "output": ...} (instruction) '
                'or {"prompt": [...], "chosen": ..., "rejected": ...} (preference)',
            ),
        ),
    ],
)
def test_records(record: object, expected: tuple[str, str | None]) -> None:
    assert validate_record(record) == expected


PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Refund window?"}]


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"prompt": PROMPT, "chosen": "30 days.", "rejected": "90 days."}, None),
        ({"prompt": PROMPT, "chosen": "30 days.", "rejected": "90 days.", "provenance": {"kind": "thumbs"}}, None),
        (
            {"prompt": PROMPT, "chosen": "30 days."},
            "a preference record needs prompt, chosen, rejected; missing rejected",
        ),
        ({"chosen": "a", "rejected": "b"}, "a preference record needs prompt, chosen, rejected; missing prompt"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt must be a non-empty list"),
        ({"prompt": "Refund window?", "chosen": "a", "rejected": "b"}, "prompt must be a non-empty list"),
        (
            {"prompt": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"},
            "prompt[0].role must be one of assistant, system, user",
        ),
        (
            {"prompt": [*PROMPT, {"role": "assistant", "content": "90 days."}], "chosen": "a", "rejected": "b"},
            "the last prompt message must be the user's (the turn both answers reply to)",
        ),
        ({"prompt": PROMPT, "chosen": " ", "rejected": "b"}, "chosen must be a non-empty string"),
        ({"prompt": PROMPT, "chosen": "a", "rejected": 3}, "rejected must be a non-empty string"),
        (
            {"prompt": PROMPT, "chosen": "30 days.", "rejected": "30 days. "},
            "chosen and rejected are the same text: there is nothing to prefer",
        ),
        ({"prompt": PROMPT, "chosen": "a", "rejected": "b", "provenance": "thumbs"}, "provenance must be an object"),
    ],
)
def test_preference_records(record: dict, problem: str | None) -> None:
    assert validate_record(record) == ("preference", problem)


def test_a_preference_upload_names_its_bad_lines_and_refuses_mixed_formats() -> None:
    good = json.dumps({"prompt": PROMPT, "chosen": "30 days.", "rejected": "90 days."})
    assert validate_jsonl(f"{good}\n\n{good}\n".encode()) == ("preference", 2)

    same = json.dumps({"prompt": PROMPT, "chosen": "x", "rejected": "x"})
    with pytest.raises(Invalid) as invalid:
        validate_jsonl(f"{good}\n{same}\n".encode())
    assert (
        str(invalid.value)
        == "1 invalid line(s): line 2: chosen and rejected are the same text: there is nothing to prefer"
    )

    chat = json.dumps({"messages": [*PROMPT, {"role": "assistant", "content": "30 days."}]})
    with pytest.raises(Invalid) as mixed:
        validate_jsonl(f"{good}\n{chat}\n".encode())
    assert "records mix chat and preference formats; use one per dataset" in str(mixed.value)
