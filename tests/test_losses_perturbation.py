"""The weight-perturbation rules (llmreg/losses/perturbation.py) against hand values and closed forms.

The quadratic L(w) = ½wᵀAw with A = [[2, 1], [1, 3]] at w = (1, 1): g = Aw = (3, 4), ‖g‖ = 5, ĝ = (0.6, 0.8).
"""

import math

import pytest
import torch

from llmreg.losses.perturbation import (
    adaptive_step,
    combine,
    global_norm,
    gradient_norm_coefficients,
    gradient_scaled,
    layerwise_step,
    normalized_step,
)


A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)


def quadratic_grad(w: torch.Tensor) -> torch.Tensor:
    """∇L by autograd, not by the closed form the tests compare with."""
    w = w.detach().clone().requires_grad_(True)
    (0.5 * w @ A @ w).backward()
    return w.grad


def test_sam_on_the_quadratic_is_its_closed_form_by_hand():
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    g = quadratic_grad(w)
    torch.testing.assert_close(g, torch.tensor([3.0, 4.0], dtype=torch.float64))
    (delta,) = normalized_step([g], radius=0.5)
    torch.testing.assert_close(delta, torch.tensor([0.3, 0.4], dtype=torch.float64))  # ρ·ĝ
    (update,) = combine([g], [quadratic_grad(w + delta)], a=0.0, b=1.0)
    # A(w + ρĝ) = A(1.3, 1.4) = (2·1.3 + 1.4, 1.3 + 3·1.4)
    torch.testing.assert_close(update, torch.tensor([4.0, 5.5], dtype=torch.float64))


@pytest.mark.parametrize("epsilon", [0.25, 0.5, 1e-3, 3.0])
def test_gradient_norm_regularization_is_exact_on_the_quadratic_for_every_step(epsilon):
    # ∇(L + (γ/2)‖∇L‖²) = g + γ·A·g = (3, 4) + 0.1·(10, 15) = (4, 5.5), whatever the difference step ε.
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    g = quadratic_grad(w)
    (delta,) = normalized_step([g], radius=epsilon)
    a, b = gradient_norm_coefficients(float(global_norm([g])), gamma=0.1, epsilon=epsilon)
    assert (a, b) == pytest.approx((1 - 0.5 / epsilon, 0.5 / epsilon))  # c = γ‖g‖/ε = 0.1·5/ε
    (update,) = combine([g], [quadratic_grad(w + delta)], a, b)
    torch.testing.assert_close(update, torch.tensor([4.0, 5.5], dtype=torch.float64))


def test_gradient_norm_regularization_matches_double_backprop_up_to_a_first_order_bias():
    # L(w) = Σ w⁴/4 + w₁w₂: the Hessian varies, so the forward difference is off by O(ε) (its third derivative).
    def loss(w):
        return (w ** 4).sum() / 4 + w[0] * w[1]

    w0 = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    gamma = 0.05

    def grad(w):
        w = w.detach().clone().requires_grad_(True)
        return torch.autograd.grad(loss(w), w)[0]

    w = w0.clone().requires_grad_(True)
    g = torch.autograd.grad(loss(w), w, create_graph=True)[0]
    exact = torch.autograd.grad(loss(w) + gamma / 2 * g.square().sum(), w)[0]

    def error(epsilon):
        g = grad(w0)
        (delta,) = normalized_step([g], radius=epsilon)
        a, b = gradient_norm_coefficients(float(global_norm([g])), gamma, epsilon)
        return float((combine([g], [grad(w0 + delta)], a, b)[0] - exact).norm())

    errors = [error(e) for e in (0.1, 0.05, 0.025)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert errors[0] / errors[1] == pytest.approx(2.0, rel=0.1)  # first order in ε
    assert errors[1] / errors[2] == pytest.approx(2.0, rel=0.05)


def test_sam_normalizes_over_all_tensors_together():
    grads = [torch.tensor([3.0]), torch.tensor([[4.0, 0.0]])]
    steps = normalized_step(grads, radius=2.0)
    torch.testing.assert_close(steps[0], torch.tensor([1.2]))  # 2·3/5
    torch.testing.assert_close(steps[1], torch.tensor([[1.6, 0.0]]))
    assert [s.dtype for s in steps] == [torch.float32, torch.float32]
    zero = normalized_step([torch.zeros(3)], radius=1.0)[0]
    assert torch.equal(zero, torch.zeros(3))  # no division by zero at a stationary point


def test_asam_by_hand():
    # T = |w| + η = (2, 0.5) with η = 0: Tg = (2, 0.5), ‖Tg‖ = √4.25, T²g = (4, 0.25); the unscaled tensor has T = 1.
    params = [torch.tensor([2.0, -0.5]), torch.tensor([10.0])]
    grads = [torch.tensor([1.0, 1.0]), torch.tensor([2.0])]
    steps = adaptive_step(grads, params, radius=0.1, eta=0.0, scaled=[True, False])
    norm = math.sqrt(4.0 + 0.25 + 4.0)  # ‖(Tg, g_unscaled)‖ = ‖(2, 0.5, 2)‖
    torch.testing.assert_close(steps[0], torch.tensor([0.4, 0.025]) / norm)
    torch.testing.assert_close(steps[1], torch.tensor([0.2]) / norm)


def test_asam_with_uniform_scale_is_sam_times_the_scale():
    # |w| + η = c everywhere: T²g/‖Tg‖ = c·g/‖g‖, SAM's step times c.
    params = [torch.tensor([0.5, -0.5]), torch.tensor([[0.5]])]
    grads = [torch.tensor([0.3, -1.1]), torch.tensor([[2.0]])]
    adaptive = adaptive_step(grads, params, radius=0.05, eta=0.25, scaled=[True, True])
    for a, s in zip(adaptive, normalized_step(grads, radius=0.05 * 0.75), strict=True):
        torch.testing.assert_close(a, s)


def test_awp_moves_each_weight_tensor_relative_to_its_own_norm():
    weight = torch.tensor([[0.0, 2.0], [0.0, 0.0]])  # ‖W‖ = 2
    grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ‖g‖ = 5
    bias, bias_grad = torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0])
    other, other_grad = torch.tensor([[3.0]]), torch.tensor([[-0.5]])  # ‖W‖ = 3, ‖g‖ = 0.5
    steps = layerwise_step([grad, bias_grad, other_grad], [weight, bias, other], gamma=0.01)
    torch.testing.assert_close(steps[0], 0.01 * 2 * grad / 5)
    assert torch.equal(steps[1], torch.zeros(2))  # biases and norms are not moved
    torch.testing.assert_close(steps[2], torch.tensor([[-0.03]]))  # 0.01·3·(−1)
    assert torch.linalg.norm(steps[0]) == pytest.approx(0.01 * 2)  # γ‖W‖


def test_combine_by_hand():
    out = combine([torch.tensor([1.0, 2.0])], [torch.tensor([10.0, 20.0])], a=-1.0, b=0.5)
    torch.testing.assert_close(out[0], torch.tensor([4.0, 8.0]))


@pytest.mark.parametrize("scale", [0.0, 0.37, 2.5])
def test_gradient_scaled_keeps_the_value_and_scales_the_gradient(scale):
    # L = ½wᵀAw at w = (1, 1): value 3.5, gradient Aw = (3, 4).
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * w @ A @ w
    scaled = gradient_scaled(loss, scale)
    assert scaled.item() == loss.item() == 3.5
    scaled.backward()
    torch.testing.assert_close(w.grad, scale * torch.tensor([3.0, 4.0], dtype=torch.float64), rtol=0, atol=1e-15)
