"""A small golden-set scorer: greedy answers to the golden prompts, token F1 and exact match against the references.

It is the trainer's own check that a job learned something (the learning test, `flywheel train
local`); the evaluator service owns the metric suites and the promotion gate.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.runtime.peft_compat import ignore_peft_deprecation
from services.trainer.data import read_chat_jsonl
from services.trainer.model import load_model, load_tokenizer, pick_device

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> list[str]:
    return _PUNCTUATION.sub(" ", text.lower()).split()


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction), normalize(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or common == 0:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class GoldenScore:
    token_f1: float
    exact_match: float
    examples: int
    answers: list[tuple[str, str, str]]  # question, reference, prediction


def score_golden(
    model_path: Path,
    golden_path: Path,
    *,
    adapter_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 40,
) -> GoldenScore:
    """Score the base model, or the base model with a LoRA adapter, on the golden split."""
    device = pick_device()
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, device)
    if adapter_dir is not None:
        from peft import PeftModel

        ignore_peft_deprecation()
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    conversations = read_chat_jsonl(golden_path)[:limit]
    prompts = [conversation[:-1] for conversation in conversations]
    references = [conversation[-1]["content"] for conversation in conversations]
    predictions = []
    for start in range(0, len(prompts), batch_size):
        predictions += _generate(model, tokenizer, prompts[start : start + batch_size], device, max_new_tokens)
    f1 = [token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
    exact = [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references, strict=True)]
    questions = [prompt[-1]["content"] for prompt in prompts]
    return GoldenScore(
        token_f1=sum(f1) / len(f1),
        exact_match=sum(exact) / len(exact),
        examples=len(f1),
        answers=list(zip(questions, references, predictions, strict=True)),
    )


@torch.inference_mode()
def _generate(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], device: torch.device, max_new_tokens: int
) -> list[str]:
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    output = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
