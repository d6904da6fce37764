"""Chat records to tensors: prompt masking, rejection of long rows, packing that changes no token's loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.trainer.data import (
    IGNORE,
    InvalidDataset,
    epoch_order,
    pack,
    read_chat_jsonl,
    tokenize_conversation,
    tokenize_dataset,
)
from services.trainer.model import load_model, load_tokenizer
from tests.fixtures.trainer_model import DEMO_DATA, base_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "You are Acme Nimbus hub support."},
    {"role": "user", "content": "What does E-214 mean?"},
    {"role": "assistant", "content": "A Zigbee device stopped responding."},
    {"role": "user", "content": "And E-101?"},
    {"role": "assistant", "content": "The hub lost its Wi-Fi connection."},
]


@pytest.fixture(scope="module")
def tokenizer(base_model_dir: Path):  # noqa: F811
    return load_tokenizer(base_model_dir)


def test_only_assistant_turns_and_their_end_of_turn_carry_labels(tokenizer) -> None:
    example = tokenize_conversation(tokenizer, CONVERSATION)
    labelled = tokenizer.decode(
        [token for token, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    )
    assert labelled == "A Zigbee device stopped responding.<|im_end|>\nThe hub lost its Wi-Fi connection.<|im_end|>\n"
    assert all(label in (IGNORE, token) for token, label in zip(example.input_ids, example.labels, strict=True))
    # The prompt part is exactly what inference feeds the model.
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(example.labels[: len(prompt_ids)]) == {IGNORE}


def test_rows_longer_than_max_length_are_rejected_with_their_numbers(tokenizer) -> None:
    long = [{"role": "user", "content": "hub " * 300}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(
        InvalidDataset, match=r"1 row\(s\) exceed max_seq_length=128 and are rejected, not truncated: row 2"
    ):
        tokenize_dataset(tokenizer, [CONVERSATION, long], 128)


def test_empty_and_malformed_datasets_are_named_clearly(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InvalidDataset, match="empty"):
        read_chat_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": CONVERSATION})
        + "\n{not json\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    with pytest.raises(InvalidDataset, match=r"2 malformed record\(s\).*line 2.*line 3: no assistant message"):
        read_chat_jsonl(bad)


def test_packing_keeps_every_token_and_restarts_positions(tokenizer) -> None:
    examples = tokenize_dataset(tokenizer, read_chat_jsonl(DEMO_DATA / "train.jsonl")[:10], 256)
    batch = pack(examples, 256, tokenizer.pad_token_id)
    assert batch.input_ids.shape[1] <= 256
    assert batch.input_ids.shape[0] < len(examples)  # packed, not one row each
    starts = int((batch.position_ids == 0).sum())
    assert starts == len(examples)
    assert batch.tokens == sum(len(e.input_ids) for e in examples)
    assert int((batch.labels != IGNORE).sum()) == sum(e.trained_tokens for e in examples)


def test_packed_rows_give_each_conversation_the_loss_it_has_alone(tokenizer, base_model_dir: Path) -> None:  # noqa: F811
    model = load_model(base_model_dir, torch.device("cpu")).eval()
    examples = tokenize_dataset(tokenizer, read_chat_jsonl(DEMO_DATA / "train.jsonl")[:4], 256)
    with torch.no_grad():
        alone = [
            model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss * e.trained_tokens
            for e in examples
        ]
        batch = pack(examples, 256, tokenizer.pad_token_id)
        packed = model(
            input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids, use_cache=False
        ).loss
    expected = torch.stack(alone).sum() / sum(e.trained_tokens for e in examples)
    assert batch.input_ids.shape[0] == 1
    assert torch.allclose(packed, expected, atol=1e-4)


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    assert epoch_order(50, 3, 1) == epoch_order(50, 3, 1)
    assert epoch_order(50, 3, 1) != epoch_order(50, 3, 2)
    assert sorted(epoch_order(50, 3, 1)) == list(range(50))
