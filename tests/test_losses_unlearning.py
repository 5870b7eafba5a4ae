"""The unlearning losses (llmreg/losses/unlearning.py) against hand-computed values, and NPO's and DPO's gradients
against their closed forms."""

import math

import pytest
import torch

from llmreg.losses.kl import vocab_kl
from llmreg.losses.unlearning import (
    dpo_unlearning_loss,
    ga_loss,
    gd_loss,
    idk_loss,
    kl_loss,
    nll,
    npo_loss,
    rmu_loss,
    scrub_loss,
)


def test_nll_is_the_token_mean_over_answer_tokens():
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert nll(logps, mask).item() == pytest.approx(3.5 / 3)
    assert nll(logps, mask, num_items=7).item() == pytest.approx(3.5 / 7)  # a share of a larger global batch


def test_vocab_kl_by_hand():
    p = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]))  # logits up to a constant
    q = torch.log(torch.tensor([[[0.5, 0.5], [0.1, 0.9]]]))
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # only the first token is in the mask
    assert vocab_kl(p, q, torch.tensor([[1, 0]])).item() == pytest.approx(expected, rel=1e-6)
    assert vocab_kl(p, p, torch.tensor([[1, 1]])).item() == pytest.approx(0.0, abs=1e-7)


def test_the_combinations_by_hand():
    assert ga_loss(torch.tensor(2.0)).item() == -2.0
    assert gd_loss(torch.tensor(2.0), torch.tensor(0.5), beta=0.5).item() == pytest.approx(-0.5)
    assert kl_loss(torch.tensor(2.0), torch.tensor(0.25)).item() == pytest.approx(-1.75)
    assert idk_loss(torch.tensor(1.5), torch.tensor(0.5)).item() == pytest.approx(2.0)
    assert scrub_loss(torch.tensor(0.3), torch.tensor(0.1), torch.tensor(2.0), beta=2.0).item() == pytest.approx(1.5)


def test_npo_value_and_its_fading_gradient_ascent_weight():
    logps = torch.tensor([-5.0, -7.0], requires_grad=True)
    teacher = torch.tensor([-5.0, -5.0])  # Δ = log π − log π0 = (0, −2)
    loss = npo_loss(logps, teacher, beta=0.5)
    softplus = [math.log(2.0), math.log1p(math.exp(-1.0))]
    assert loss.item() == pytest.approx(4.0 * sum(softplus) / 2)
    loss.backward()
    sigmoid = [0.5, 1 / (1 + math.e)]  # ∂/∂log π = 2σ(βΔ)/n: GA's −∇ weighted, fading as π drops below π0
    torch.testing.assert_close(logps.grad, torch.tensor([2 * s / 2 for s in sigmoid]))


def test_dpo_is_the_real_preference_loss():
    idk, forget = torch.tensor([-3.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    loss = dpo_unlearning_loss(idk, forget, torch.tensor([-4.0]), torch.tensor([-1.0]), beta=0.1)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))))  # margin = (−2) − (−3) = 1
    loss.backward()
    weight = 0.1 * (1 - 1 / (1 + math.exp(-0.1)))  # β·σ(−β·margin): raises the IDK answer, lowers the true one
    assert idk.grad.item() == pytest.approx(-weight) and forget.grad.item() == pytest.approx(weight)


def test_rmu_by_hand_ignoring_padding():
    forget = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # last token is padding
    loss = rmu_loss(forget, torch.tensor([[1, 1, 0]]), torch.tensor([0.0, 1.0]), torch.tensor([[[1.0, 1.0]]]),
                    torch.tensor([[[0.0, 3.0]]]), torch.tensor([[1]]), beta=0.5)
    # forget: mean over tokens (2, 3), squared error to u = (4, 4) → 4; retain: ((1)² + (−2)²) / 2 = 2.5
    assert loss.item() == pytest.approx(0.5 * 4.0 + 2.5)
