"""The anchors' math (llmreg/losses/anchor.py) against hand values and closed forms."""

import pytest
import torch

from llmreg.losses.anchor import (
    accumulate_fisher,
    anchor_gradients,
    anchor_penalty,
    lora_anchor_gradients,
    lora_delta,
)


def test_l2sp_and_ewc_penalties_and_gradients_by_hand():
    delta = [torch.tensor([1.0, 2.0]), torch.tensor([[-1.0]])]
    assert anchor_penalty(delta, [None, None], lam=2.0).item() == pytest.approx(1 + 4 + 1)  # (2/2)·(1 + 4 + 1)
    fisher = [torch.tensor([0.5, 2.0]), torch.tensor([[3.0]])]
    assert anchor_penalty(delta, fisher, lam=2.0).item() == pytest.approx(0.5 + 8 + 3)
    grads = anchor_gradients(delta, fisher, lam=2.0)
    torch.testing.assert_close(grads[0], torch.tensor([1.0, 8.0]))  # λ·F·Δ
    torch.testing.assert_close(grads[1], torch.tensor([[-6.0]]))
    torch.testing.assert_close(anchor_gradients(delta, [None, None], lam=0.5)[0], torch.tensor([0.5, 1.0]))


def test_lora_gradients_by_hand():
    # A = [[1, 0]] (r = 1, in = 2), B = [[2], [0]] (out = 2), s = 0.5: ΔW = [[1, 0], [0, 0]]; λ = 1, F = 1: P = ΔW,
    # ∂/∂B = s·P·Aᵀ = [[0.5], [0]], ∂/∂A = s·Bᵀ·P = [[1, 0]].
    lora_a, lora_b = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])
    torch.testing.assert_close(lora_delta(lora_a, lora_b, 0.5), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    grad_a, grad_b, squared = lora_anchor_gradients(lora_a, lora_b, 0.5, None, lam=1.0)
    torch.testing.assert_close(grad_a, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(grad_b, torch.tensor([[0.5], [0.0]]))
    assert squared.item() == pytest.approx(1.0)  # ‖ΔW‖²
    # With F = 2 everywhere (the ΔW path): twice the gradients and the weighted squares.
    grad_a, grad_b, squared = lora_anchor_gradients(lora_a, lora_b, 0.5, torch.full((2, 2), 2.0), lam=1.0)
    torch.testing.assert_close(grad_a, torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(grad_b, torch.tensor([[1.0], [0.0]]))
    assert squared.item() == pytest.approx(2.0)


@pytest.mark.parametrize("weighted", [True, False])
def test_lora_gradients_are_those_of_the_penalty_on_delta_w(weighted):
    generator = torch.Generator().manual_seed(0)
    lora_a = torch.randn(3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    fisher = torch.rand(4, 5, generator=generator, dtype=torch.float64) if weighted else None
    penalty = 0.7 / 2 * ((1.0 if fisher is None else fisher) * (2.5 * lora_b @ lora_a) ** 2).sum()
    expected_a, expected_b = torch.autograd.grad(penalty, (lora_a, lora_b))
    grad_a, grad_b, squared = lora_anchor_gradients(lora_a, lora_b, 2.5, fisher, lam=0.7)
    torch.testing.assert_close(grad_a, expected_a)
    torch.testing.assert_close(grad_b, expected_b)
    assert 0.7 / 2 * squared.item() == pytest.approx(penalty.item())
    assert anchor_penalty([lora_delta(lora_a, lora_b, 2.5)], [fisher], 0.7).item() == pytest.approx(penalty.item())


@pytest.mark.parametrize("chunk_elements", [1, 5, 20, 40, 2 ** 22],
                         ids=["a-row", "rows", "a-layer", "layers", "whole"])
def test_a_stack_of_layers_in_chunks_gives_each_layers_gradients(chunk_elements):
    # 3 layers of (out, in) = (4, 5): chunks of 1 and 5 elements split each layer into rows, 20 is one layer, 40 is
    # two (the last chunk one), 2²² all three at once. Each must be autograd's gradient of the summed penalty.
    generator = torch.Generator().manual_seed(1)
    lora_a = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(3, 4, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    fisher = torch.rand(3, 4, 5, generator=generator, dtype=torch.float64)
    penalty = 0.3 / 2 * (fisher * (1.5 * lora_b @ lora_a) ** 2).sum()
    expected_a, expected_b = torch.autograd.grad(penalty, (lora_a, lora_b))
    grad_a, grad_b, squared = lora_anchor_gradients(lora_a, lora_b, 1.5, fisher, lam=0.3,
                                                    chunk_elements=chunk_elements)
    torch.testing.assert_close(grad_a, expected_a)
    torch.testing.assert_close(grad_b, expected_b)
    assert 0.3 / 2 * squared.item() == pytest.approx(penalty.item())


def test_the_fisher_of_a_categorical_is_its_closed_form():
    # log p(y) = z_y − logsumexp(z): ∂/∂z = e_y − p. With p = (0.5, 0.3, 0.2) and data y = 0, 0, 2:
    # F = mean (e_y − p)² = ((0.25·3)/3, (0.09·3)/3, (0.04 + 0.04 + 0.64)/3) = (0.25, 0.09, 0.24).
    logits = torch.tensor([0.5, 0.3, 0.2]).log().requires_grad_(True)
    fisher = None
    for label in (0, 0, 2):
        (grad,) = torch.autograd.grad(logits.log_softmax(-1)[label], logits)
        fisher = accumulate_fisher(fisher, [grad], num_examples=3)
    torch.testing.assert_close(fisher[0], torch.tensor([0.25, 0.09, 0.24]))
