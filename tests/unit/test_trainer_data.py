"""Records to tensors: prompt masking, rejection of long rows, packing that changes no token's loss, preference pairs."""

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
    pad,
    read_chat_jsonl,
    read_preference_jsonl,
    tokenize_conversation,
    tokenize_dataset,
    tokenize_preferences,
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


PREFERENCE = {
    "prompt": CONVERSATION[:4],
    "chosen": "The hub lost its Wi-Fi connection.",
    "rejected": "No idea, sorry.",
    "provenance": {"feedback_ids": ["f-1"], "source": "review"},
}


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


def test_preference_records_are_read_with_their_prompt_and_answers_and_provenance_ignored(tmp_path: Path) -> None:
    (record,) = read_preference_jsonl(write_jsonl(tmp_path / "pairs.jsonl", [PREFERENCE, ""]))
    assert record.prompt == CONVERSATION[:4]
    assert (record.chosen, record.rejected) == ("The hub lost its Wi-Fi connection.", "No idea, sorry.")


def test_malformed_preference_records_are_named_by_line_and_reason(tmp_path: Path) -> None:
    user_only = [{"role": "user", "content": "And E-101?"}]
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            PREFERENCE,
            "{not json",
            {"prompt": CONVERSATION[:3], "chosen": "a", "rejected": "b"},
            {"prompt": user_only, "chosen": "same", "rejected": "same"},
            {"prompt": user_only, "chosen": " ", "rejected": "b"},
            {"prompt": [], "chosen": "a", "rejected": "b"},
            {"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"},
            {"messages": CONVERSATION},
        ],
    )
    with pytest.raises(InvalidDataset) as raised:
        read_preference_jsonl(bad)
    message = str(raised.value)
    assert message.startswith("7 malformed record(s) in bad.jsonl: line 2: ")
    assert "line 3: the prompt must end with a user turn, not assistant" in message
    assert "line 4: chosen and rejected are the same answer" in message
    assert "line 5: chosen must be a non-empty string" in message
    assert 'line 6: expected {"prompt": [...]} with at least one message' in message
    assert "(and 2 more)" in message
    with pytest.raises(InvalidDataset, match="line 1: a chat record where a preference record is expected"):
        read_preference_jsonl(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]))
    with pytest.raises(InvalidDataset, match="line 1: a preference record where a chat record is expected"):
        read_chat_jsonl(write_jsonl(tmp_path / "pairs.jsonl", [PREFERENCE]))
    with pytest.raises(InvalidDataset, match="empty"):
        read_preference_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_a_pair_shares_the_inference_prompt_and_labels_only_its_own_answer(tokenizer, tmp_path: Path) -> None:
    records = read_preference_jsonl(write_jsonl(tmp_path / "pairs.jsonl", [PREFERENCE]))
    (pair,) = tokenize_preferences(tokenizer, records, 256)
    prompt = tokenizer.apply_chat_template(PREFERENCE["prompt"], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for example, answer in ((pair.chosen, PREFERENCE["chosen"]), (pair.rejected, PREFERENCE["rejected"])):
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        # The earlier assistant turn of the prompt is context: only the answer and its end of turn are learned.
        labelled = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
        assert tokenizer.decode(labelled) == f"{answer}<|im_end|>\n"
        assert example.labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    batch = pad([pair.chosen, pair.rejected], tokenizer.pad_token_id)
    assert batch.attention_mask.sum(dim=1).tolist() == [len(pair.chosen.input_ids), len(pair.rejected.input_ids)]
    assert batch.tokens == len(pair.chosen.input_ids) + len(pair.rejected.input_ids)


def test_pairs_longer_than_max_length_are_rejected_with_their_numbers(tokenizer, tmp_path: Path) -> None:
    long = {**PREFERENCE, "rejected": "hub " * 300}
    records = read_preference_jsonl(write_jsonl(tmp_path / "pairs.jsonl", [PREFERENCE, long]))
    with pytest.raises(
        InvalidDataset, match=r"1 row\(s\) exceed max_seq_length=128 and are rejected, not truncated: row 2"
    ):
        tokenize_preferences(tokenizer, records, 128)
