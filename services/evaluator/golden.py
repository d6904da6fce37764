"""Golden records: what a prompt is, what its reference answer is, and the optional checks it asks for.

A record is the registry's chat format (`{"messages": [...]}`, the last message the assistant's
reference answer) or its instruction format (`{"instruction", "input"?, "output"}`). Optional keys:
`id`; `context` (the passage an answer must be grounded in; default: the reference); `schema` (a
JSON Schema the answer must satisfy, for tasks that ask for JSON); `variables` (the values a prompt
version under evaluation is rendered with, as an app would pass them in `prompt_ref`). A record without a reference
makes the whole golden set invalid: scoring it against nothing would pass silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class GoldenSetError(ValueError):
    """The golden set cannot be evaluated; the message names the records at fault."""


@dataclass(frozen=True)
class GoldenExample:
    example_id: str
    messages: tuple[dict[str, str], ...]  # the prompt, without the reference answer
    reference: str
    context: str
    schema: dict[str, Any] | None = None
    variables: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


def parse_golden(jsonl: str | bytes, *, max_problems: int = 5) -> list[GoldenExample]:
    text = jsonl.decode("utf-8") if isinstance(jsonl, bytes) else jsonl
    examples: list[GoldenExample] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(_example(json.loads(line), number))
        except (ValueError, TypeError, KeyError) as error:
            problems.append(f"line {number}: {error}")
    if problems:
        shown = "; ".join(problems[:max_problems])
        more = f" (and {len(problems) - max_problems} more)" if len(problems) > max_problems else ""
        raise GoldenSetError(f"{len(problems)} golden record(s) cannot be evaluated: {shown}{more}")
    if not examples:
        raise GoldenSetError("the golden set is empty: there is nothing to evaluate")
    ids = [example.example_id for example in examples]
    if len(set(ids)) != len(ids):
        raise GoldenSetError("golden record ids must be unique")
    return examples


def _example(record: Any, number: int) -> GoldenExample:
    if not isinstance(record, dict):
        raise ValueError("a record is a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        ):
            raise ValueError("messages must be a non-empty list of {role, content}")
        *prompt, last = messages
        if last.get("role") != "assistant" or not last["content"].strip():
            raise ValueError("no reference: the last message must be the assistant's (non-empty) answer")
        if not any(m.get("role") == "user" for m in prompt):
            raise ValueError("no user message before the reference answer")
        reference = last["content"]
        prompt_messages = tuple({"role": m["role"], "content": m["content"]} for m in prompt)
    elif "instruction" in record:
        reference = record.get("output")
        if not isinstance(reference, str) or not reference.strip():
            raise ValueError("no reference: `output` is missing or empty")
        content = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        prompt_messages = ({"role": "user", "content": content},)
    else:
        raise ValueError("neither chat (`messages`) nor instruction (`instruction`, `output`) format")
    schema = record.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise ValueError("`schema` must be a JSON Schema object")
    variables = record.get("variables", {})
    if not isinstance(variables, dict):
        raise ValueError("`variables` must be an object of prompt variable values")
    context = record.get("context") or reference
    return GoldenExample(str(record.get("id", number)), prompt_messages, reference, str(context), schema, variables)
