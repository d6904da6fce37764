"""The trainer's objectives: next-token loss on answers (SFT) and direct preference optimisation (DPO).

DPO is written here rather than taken from TRL: TRL's DPOTrainer brings its own Trainer loop,
accelerate and datasets on top of ours, and would own checkpointing, resume and progress reporting,
which this trainer already does for SFT. The loss itself is a few lines over log-probabilities
that the SFT path already computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.trainer.data import IGNORE, PackedBatch, PaddedBatch, PreferencePair, pad
from services.trainer.model import base_dtype


@dataclass(frozen=True)
class StepLoss:
    """The loss of one optimiser step, the real tokens it read, and for DPO each pair's beta-scaled margin."""

    loss: torch.Tensor
    tokens: int
    margins: torch.Tensor | None = None


def assistant_loss(model: Any, batch: PackedBatch, device: torch.device) -> StepLoss:
    """Mean next-token loss over assistant tokens of packed rows."""
    logits, targets = _answer_logits(model, batch.input_ids, batch.labels, device, position_ids=batch.position_ids)
    return StepLoss(loss=torch.nn.functional.cross_entropy(logits.float(), targets), tokens=batch.tokens)


def sequence_logprobs(model: Any, batch: PaddedBatch, device: torch.device) -> torch.Tensor:
    """Each row's log-probability of its answer: the sum over its labelled tokens."""
    logits, targets = _answer_logits(model, batch.input_ids, batch.labels, device, attention_mask=batch.attention_mask)
    token_logprobs = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    rows = (batch.labels[:, 1:] != IGNORE).nonzero()[:, 0].to(device)
    return torch.zeros(batch.input_ids.shape[0], device=device).index_add(0, rows, token_logprobs)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's loss (mean over pairs) and each pair's margin, beta * ((pc - rc) - (pr - rr)), the implied reward gap."""
    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -torch.nn.functional.logsigmoid(margins).mean(), margins


@dataclass(frozen=True)
class ReferencedPair:
    """A preference pair with the reference model's log-probabilities of its two answers."""

    pair: PreferencePair
    chosen: float
    rejected: float


def reference_logprobs(
    model: Any, pairs: list[PreferencePair], batch_size: int, pad_token_id: int, device: torch.device
) -> list[ReferencedPair]:
    """Each pair scored by the model as it is before the first step, without dropout: DPO's reference.

    Computed once rather than at every step: the reference never changes, and when training starts from an
    adapter the reference is that adapter, which the policy's weights are about to leave (a base model's
    reference could be had by switching the adapter off; a starting adapter's could not)."""
    was_training = model.training
    model.eval()
    scored: list[ReferencedPair] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = pad([pair.chosen for pair in chunk] + [pair.rejected for pair in chunk], pad_token_id)
            logprobs = sequence_logprobs(model, batch, device).tolist()
            n = len(chunk)
            scored.extend(ReferencedPair(pair, logprobs[i], logprobs[n + i]) for i, pair in enumerate(chunk))
    model.train(was_training)
    return scored


def preference_loss(
    model: Any, pairs: list[ReferencedPair], beta: float, pad_token_id: int, device: torch.device
) -> StepLoss:
    """DPO on a batch of pairs: the policy is the LoRA model, the reference its log-probabilities before
    training (`reference_logprobs`). Chosen and rejected sequences share one padded batch: one forward a step."""
    batch = pad([item.pair.chosen for item in pairs] + [item.pair.rejected for item in pairs], pad_token_id)
    policy = sequence_logprobs(model, batch, device)
    reference = torch.tensor(
        [item.chosen for item in pairs] + [item.rejected for item in pairs], dtype=policy.dtype, device=device
    )
    n = len(pairs)
    loss, margins = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta)
    return StepLoss(loss=loss, tokens=batch.tokens, margins=margins.detach())


def _answer_logits(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, device: torch.device, **layout: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the labelled positions only, with their targets, in row-major order.

    `layout` says how sequences sit in the rows: `position_ids` for packed rows, `attention_mask` for padded ones.

    The LM head (vocabulary x hidden) is a large share of a small model's compute; prompt positions
    carry no loss, so their logits are never computed.
    """
    inner = model.get_base_model()
    # On a GPU the base weights are bf16 while peft keeps the adapter in float32: autocast runs both in
    # bf16 and the optimiser still updates float32 adapter weights. Off on the CPU, where bf16 is slower.
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=base_dtype(device) == torch.bfloat16):
        # No KV cache: with one, transformers skips packed-sequence detection and lets rows attend across conversations.
        hidden = inner.get_decoder()(
            input_ids=input_ids.to(device),
            use_cache=False,
            **{name: tensor.to(device) for name, tensor in layout.items()},
        ).last_hidden_state
        targets = labels[:, 1:].to(device)
        keep = targets != IGNORE
        logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    return logits, targets[keep]
