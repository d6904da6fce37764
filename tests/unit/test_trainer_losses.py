"""DPO's loss against a hand computation on fixed sequence log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer.losses import dpo_loss

pytestmark = pytest.mark.unit


def test_dpo_loss_and_margins_match_a_hand_computation() -> None:
    policy_chosen = torch.tensor([-10.0, -20.0])
    policy_rejected = torch.tensor([-12.0, -18.0])
    reference_chosen = torch.tensor([-11.0, -19.0])
    reference_rejected = torch.tensor([-11.0, -19.0])
    loss, margins = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)
    # Pair 1: ((-10 + 11) - (-12 + 11)) * 0.5 = 1.0; pair 2: ((-20 + 19) - (-18 + 19)) * 0.5 = -1.0.
    assert margins.tolist() == [1.0, -1.0]
    by_hand = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_dpo_loss_is_log_2_when_policy_and_reference_agree() -> None:
    logprobs = torch.tensor([-3.0, -7.5, -1.25])
    loss, margins = dpo_loss(logprobs, logprobs - 2, logprobs, logprobs - 2, beta=0.1)
    assert margins.tolist() == [0.0, 0.0, 0.0]
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
