"""Masked aggregation: the global token-mean is invariant to how a batch is split; the KL estimator vocabulary."""

import math

import pytest
import torch

from llmreg.losses.aggregation import AGGREGATION_MODES, aggregate
from llmreg.losses.kl import kl_estimate


def ragged_batch(seed=0, rows=8, length=6):
    generator = torch.Generator().manual_seed(seed)
    per_token = torch.randn(rows, length, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).to(torch.float64)
    return per_token, mask


def test_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(per_token, mask, "token-mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate(per_token, mask, "token-mean", num_items=7).item() == pytest.approx(1.0)
    assert aggregate(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate(per_token, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    assert aggregate(per_token, torch.zeros_like(mask), "token-mean").item() == 0.0  # no tokens: 0, not NaN


def test_one_micro_batch_of_8_equals_8_micro_batches_of_1_with_the_global_token_count():
    per_token, mask = ragged_batch()
    full = aggregate(per_token, mask, "token-mean")
    num_items = mask.sum()
    accumulated = sum(aggregate(per_token[i : i + 1], mask[i : i + 1], "token-mean", num_items=num_items)
                      for i in range(8))
    torch.testing.assert_close(accumulated, full, rtol=0, atol=1e-12)
    # The local count weighs a short sequence's tokens more: not the full-batch mean.
    local = sum(aggregate(per_token[i : i + 1], mask[i : i + 1], "token-mean") for i in range(8)) / 8
    assert not math.isclose(local.item(), full.item(), rel_tol=1e-6)


def test_two_ranks_equal_one_rank_on_the_same_global_batch():
    # Each rank scales its loss by the world size (TRL does when it passes the global count); DDP averages gradients.
    per_token, mask = ragged_batch(seed=1)
    weights = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def gradient(rows, world_size):
        loss = world_size * aggregate(per_token[rows] * weights, mask[rows], "token-mean", num_items=mask.sum())
        return torch.autograd.grad(loss, weights)[0]

    averaged = (gradient(slice(0, 4), 2) + gradient(slice(4, 8), 2)) / 2
    torch.testing.assert_close(averaged, gradient(slice(0, 8), 1), rtol=0, atol=1e-12)


def test_bad_input_is_a_clear_error():
    per_token, mask = ragged_batch()
    with pytest.raises(ValueError, match="valid modes: " + ", ".join(AGGREGATION_MODES)):
        aggregate(per_token, mask, "token-sum")
    with pytest.raises(ValueError, match="shape"):
        aggregate(per_token, mask[:, :3])
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(per_token, mask, "seq-mean-token-mean", num_items=10)


def test_kl_estimators_by_enumeration():
    # Exact expectations under p: k1 and k3 are unbiased for KL(p‖q); k3 is non-negative per sample.
    log_p = torch.tensor([0.1, 0.5, -0.3, 0.0], dtype=torch.float64).log_softmax(-1)
    log_q = torch.tensor([0.4, -0.2, 0.0, 0.3], dtype=torch.float64).log_softmax(-1)
    exact = (log_p.exp() * (log_p - log_q)).sum()
    for estimator in ("k1", "k3"):
        expected = (log_p.exp() * kl_estimate(log_p, log_q, estimator)).sum()
        torch.testing.assert_close(expected, exact, rtol=0, atol=1e-12)
    assert (kl_estimate(log_p, log_q, "k3") >= 0).all() and (kl_estimate(log_p, log_q, "k2") >= 0).all()
    assert (kl_estimate(log_p, log_q, "k1") < 0).any()
    with pytest.raises(ValueError, match="valid estimators: k1, k2, k3"):
        kl_estimate(log_p, log_q, "k4")
