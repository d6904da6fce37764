"""Training records to tensors: validation, chat-template tokenization with prompt masking, packing, padding.

Two record kinds: chat records (`{"messages": [...]}`) for SFT, preference records (`{"prompt": [...],
"chosen", "rejected"}`) for DPO. Both go through the same reader and the same prompt masking.

Rows longer than `max_seq_length` are rejected, not truncated: cutting a row drops either the end
of the answer (the model would learn to stop mid-sentence) or part of the prompt (it would learn
to answer questions it never saw). The job fails with the offending line numbers instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

IGNORE = -100
ROLES = {"system", "user", "assistant"}
T = TypeVar("T")


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
    return _read_jsonl(path, _messages)


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt (ending with a user turn) and two answers to it, the better one first."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def read_preference_jsonl(path: Path) -> list[PreferenceRecord]:
    """The records of a JSONL file of `{"prompt": [...], "chosen": str, "rejected": str, "provenance": {...}}`.

    `provenance` (where a pair came from: feedback ids, reviewers) is allowed and not read: training needs
    only the text.
    """
    return _read_jsonl(path, _preference)


def _read_jsonl(path: Path, parse: Callable[[Any], T]) -> list[T]:
    if not path.is_file():
        raise InvalidDataset(f"dataset file {path} does not exist")
    records: list[T] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse(json.loads(line)))
            except (ValueError, TypeError) as error:
                problems.append(f"line {number}: {error}")
    if problems:
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise InvalidDataset(f"{len(problems)} malformed record(s) in {path.name}: {shown}")
    if not records:
        raise InvalidDataset(f"dataset {path.name} is empty: no records to train on")
    return records


def _messages(record: Any) -> list[dict[str, str]]:
    if isinstance(record, dict) and "chosen" in record and "messages" not in record:
        raise ValueError(
            "a preference record where a chat record is expected: preference records train with method dpo"
        )
    messages = _message_list(record.get("messages") if isinstance(record, dict) else None, "messages")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant message: nothing to learn from this record")
    return messages


def _preference(record: Any) -> PreferenceRecord:
    if not isinstance(record, dict):
        raise ValueError('expected {"prompt": [...], "chosen": "...", "rejected": "..."}')
    if "messages" in record and "prompt" not in record:
        raise ValueError("a chat record where a preference record is expected: chat records train with method sft")
    prompt = _message_list(record.get("prompt"), "prompt")
    if prompt[-1]["role"] != "user":
        raise ValueError(f"the prompt must end with a user turn, not {prompt[-1]['role']}: the answers reply to it")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{name} must be a non-empty string, got {answer!r:.80}")
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same answer: the pair prefers nothing")
    return PreferenceRecord(prompt=prompt, chosen=str(chosen), rejected=str(rejected))


def _message_list(messages: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'expected {{"{key}": [...]}} with at least one message')
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(f"each message needs a role in {sorted(ROLES)} and a string content, got {message!r:.80}")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def tokenize_conversation(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, only_last_answer: bool = False
) -> Example:
    """Tokenize with the model's chat template; only assistant turns (with their end-of-turn token) carry labels.

    The rendering is split at each assistant turn and each segment tokenized on its own, so the
    prompt part is exactly what `apply_chat_template(..., add_generation_prompt=True)` gives at
    inference time, and the boundary between prompt and answer is known in tokens, not guessed.
    With `only_last_answer`, earlier assistant turns are context, as in a preference record's prompt.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    last = len(messages) - 1
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
        learned = answer_ids if index == last or not only_last_answer else [IGNORE] * len(answer_ids)
        labels += [IGNORE] * len(prompt_ids) + learned
        rendered = full
    return Example(input_ids=input_ids, labels=labels)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_dataset(
    tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], max_seq_length: int
) -> list[Example]:
    """Every conversation tokenized; any row over `max_seq_length` tokens fails the whole dataset."""
    examples = [tokenize_conversation(tokenizer, messages) for messages in conversations]
    _reject_long_rows([len(example.input_ids) for example in examples], max_seq_length)
    return examples


@dataclass(frozen=True)
class PreferencePair:
    """One preference record as two tokenized sequences sharing the prompt; labels only on each answer."""

    chosen: Example
    rejected: Example


def tokenize_preferences(
    tokenizer: Any, records: Sequence[PreferenceRecord], max_seq_length: int
) -> list[PreferencePair]:
    """Every record as prompt + chosen and prompt + rejected; a record whose longer side exceeds `max_seq_length` fails the dataset."""
    pairs = [
        PreferencePair(
            chosen=tokenize_conversation(
                tokenizer, [*record.prompt, {"role": "assistant", "content": record.chosen}], only_last_answer=True
            ),
            rejected=tokenize_conversation(
                tokenizer, [*record.prompt, {"role": "assistant", "content": record.rejected}], only_last_answer=True
            ),
        )
        for record in records
    ]
    _reject_long_rows([max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) for pair in pairs], max_seq_length)
    return pairs


def _reject_long_rows(lengths: Sequence[int], max_seq_length: int) -> None:
    too_long = [(number, length) for number, length in enumerate(lengths, start=1) if length > max_seq_length]
    if too_long:
        shown = ", ".join(f"row {number} ({length} tokens)" for number, length in too_long[:5])
        raise InvalidDataset(
            f"{len(too_long)} row(s) exceed max_seq_length={max_seq_length} and are rejected, not truncated: {shown}"
            f"{' ...' if len(too_long) > 5 else ''}; raise max_seq_length or shorten those rows"
        )


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


@dataclass(frozen=True)
class PaddedBatch:
    """One sequence a row, right-padded; `attention_mask` hides the padding."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    tokens: int


def pad(examples: Sequence[Example], pad_token_id: int) -> PaddedBatch:
    """One row per example, as wide as the longest: each row's answer log-probability stays its own."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[r, :n] = torch.tensor(example.input_ids)
        labels[r, :n] = torch.tensor(example.labels)
        attention_mask[r, :n] = 1
    return PaddedBatch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        tokens=sum(len(example.input_ids) for example in examples),
    )


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a function of seed and epoch only, so a resumed job sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()
