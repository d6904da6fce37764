"""Chat records to training tensors: validation, chat-template tokenization with prompt masking, packing.

Rows longer than `max_seq_length` are rejected, not truncated: cutting a row drops either the end
of the answer (the model would learn to stop mid-sentence) or part of the prompt (it would learn
to answer questions it never saw). The job fails with the offending line numbers instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100
ROLES = {"system", "user", "assistant"}


class InvalidDataset(ValueError):
    """The dataset cannot be trained on; the message says which rows and why."""


@dataclass(frozen=True)
class Example:
    """One tokenized conversation; `labels` is IGNORE on every token that is not assistant output."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def read_chat_jsonl(path: Path) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file of `{"messages": [{"role", "content"}, ...]}` records."""
    if not path.is_file():
        raise InvalidDataset(f"dataset file {path} does not exist")
    conversations: list[list[dict[str, str]]] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                conversations.append(_messages(json.loads(line)))
            except (ValueError, TypeError) as error:
                problems.append(f"line {number}: {error}")
    if problems:
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise InvalidDataset(f"{len(problems)} malformed record(s) in {path.name}: {shown}")
    if not conversations:
        raise InvalidDataset(f"dataset {path.name} is empty: no records to train on")
    return conversations


def _messages(record: Any) -> list[dict[str, str]]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected {"messages": [...]} with at least one message')
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(f"each message needs a role in {sorted(ROLES)} and a string content, got {message!r:.80}")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant message: nothing to learn from this record")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def tokenize_conversation(tokenizer: Any, messages: Sequence[dict[str, str]]) -> Example:
    """Tokenize with the model's chat template; only assistant turns (with their end-of-turn token) carry labels.

    The rendering is split at each assistant turn and each segment tokenized on its own, so the
    prompt part is exactly what `apply_chat_template(..., add_generation_prompt=True)` gives at
    inference time, and the boundary between prompt and answer is known in tokens, not guessed.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(list(messages[:index]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(messages[: index + 1]), tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise InvalidDataset(
                "the chat template does not render conversations as a growing prefix; cannot mask prompts"
            )
        prompt_ids = _encode(tokenizer, prompt[len(rendered) :])
        answer_ids = _encode(tokenizer, full[len(prompt) :])
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE] * len(prompt_ids) + answer_ids
        rendered = full
    return Example(input_ids=input_ids, labels=labels)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_dataset(
    tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], max_seq_length: int
) -> list[Example]:
    """Every conversation tokenized; any row over `max_seq_length` tokens fails the whole dataset."""
    examples = [tokenize_conversation(tokenizer, messages) for messages in conversations]
    too_long = [
        (number, len(example.input_ids))
        for number, example in enumerate(examples, start=1)
        if len(example.input_ids) > max_seq_length
    ]
    if too_long:
        shown = ", ".join(f"row {number} ({length} tokens)" for number, length in too_long[:5])
        raise InvalidDataset(
            f"{len(too_long)} row(s) exceed max_seq_length={max_seq_length} and are rejected, not truncated: {shown}"
            f"{' ...' if len(too_long) > 5 else ''}; raise max_seq_length or shorten those rows"
        )
    return examples


@dataclass(frozen=True)
class PackedBatch:
    """Rows of whole conversations laid end to end; position ids restart at 0 for each conversation.

    With no attention mask and restarting position ids, transformers builds a block-diagonal causal
    mask, so no token attends across conversations and no compute is spent on padding except the
    tail of the shorter rows.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    trained_tokens: int
    tokens: int


def pack(examples: Sequence[Example], max_seq_length: int, pad_token_id: int) -> PackedBatch:
    """Pack conversations into as few rows of at most `max_seq_length` tokens as first-fit-decreasing finds."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        length = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= length), None)
        if slot is None:
            rows.append([example])
            room.append(max_seq_length - length)
        else:
            rows[slot].append(example)
            room[slot] -= length
    width = max(max_seq_length - free for free in room)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    # Padding continues the count of the last conversation, so it never looks like the start of a new one.
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            # The first token of a conversation must not be predicted from the end of the previous one.
            labels[r, at : at + n] = torch.tensor([IGNORE, *example.labels[1:]])
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(position_ids[r, at - 1] + 1, position_ids[r, at - 1] + 1 + width - at)
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        trained_tokens=sum(e.trained_tokens for e in examples),
        tokens=sum(len(e.input_ids) for e in examples),
    )


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of seed and epoch only, so a resumed job sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()
