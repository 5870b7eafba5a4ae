"""The anchors' math (llmreg/losses/anchor.py) against hand values and closed forms."""

import pytest
import torch

from llmreg.losses.anchor import (
    accumulate_fisher,
    anchor_gradients,
    anchor_penalty,
    lora_anchor_gradients,
    lora_delta,
    lora_proximal_update,
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


def test_the_decoupled_step_of_full_fine_tuning_is_the_proximal_step_by_hand():
    # Δ = [1, -2], F = [0.5, 4], λ = 2, η = 0.5: η·λ·F = [0.5, 4], the prox θ₀ + Δ/(1 + η·λ·F) = θ₀ + [2/3, -0.4];
    # the step subtracts η·(λ·F/(1 + η·λ·F))·Δ = [1/3, -1.6]. The plain step η·λ·F·Δ = [0.5, -8] would put the second
    # coordinate at 6, three times farther from θ₀ on the other side.
    delta, fisher = [torch.tensor([1.0, -2.0])], [torch.tensor([0.5, 4.0])]
    (gradient,) = anchor_gradients(delta, fisher, lam=2.0, proximal_lr=0.5)
    torch.testing.assert_close(delta[0] - 0.5 * gradient, torch.tensor([2 / 3, -0.4]))
    # L2-SP (F = 1): Δ/(1 + η·λ) = Δ/2.
    (gradient,) = anchor_gradients(delta, [None], lam=2.0, proximal_lr=0.5)
    torch.testing.assert_close(delta[0] - 0.5 * gradient, delta[0] / 2)


def test_the_proximal_step_minimizes_the_penalty_plus_the_distance_to_the_stepped_weights():
    # argmin_x (1/2η)‖x − θ‖² + (λ/2)·Σ F·(x − θ₀)², found by gradient descent on that objective in float64.
    generator = torch.Generator().manual_seed(0)
    theta, origin = torch.randn(6, generator=generator, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    fisher, lam, lr = torch.rand(6, generator=generator, dtype=torch.float64) * 50, 3.0, 0.2
    x = theta.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16)

    def objective():
        optimizer.zero_grad()
        value = (x - theta).square().sum() / (2 * lr) + lam / 2 * (fisher * (x - origin).square()).sum()
        value.backward()
        return value

    optimizer.step(objective)
    (gradient,) = anchor_gradients([theta - origin], [fisher], lam, proximal_lr=lr)
    torch.testing.assert_close(theta - lr * gradient, x.detach())
    assert (lr * lam * fisher).max() > 2  # where the plain step would diverge


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("chunk_elements", [5, 2 ** 22], ids=["rows", "whole"])
def test_the_decoupled_lora_gradients_are_those_of_the_moreau_envelope_on_delta_w(weighted, chunk_elements):
    # The envelope's gradient in ΔW is λ·F/(1 + η·λ·F) ⊙ ΔW: the gradients of (1/2)·Σ G·(s·B·A)² with that weight
    # G = λ·F/(1 + η·λ·F) held fixed, by autograd. Σ F·ΔW² is still the penalty's distance.
    generator = torch.Generator().manual_seed(1)
    lora_a = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    fisher = torch.rand(2, 4, 5, generator=generator, dtype=torch.float64) * 10 if weighted else None
    lam, lr, scaling = 0.7, 0.3, 2.5
    f = torch.ones(2, 4, 5, dtype=torch.float64) if fisher is None else fisher
    weight = lam * f / (1 + lr * lam * f)
    envelope = 0.5 * (weight * (scaling * lora_b @ lora_a) ** 2).sum()
    expected_a, expected_b = torch.autograd.grad(envelope, (lora_a, lora_b))
    grad_a, grad_b, squared = lora_anchor_gradients(lora_a, lora_b, scaling, fisher, lam, chunk_elements,
                                                    proximal_lr=lr)
    torch.testing.assert_close(grad_a, expected_a)
    torch.testing.assert_close(grad_b, expected_b)
    assert squared.item() == pytest.approx((f * (scaling * lora_b @ lora_a) ** 2).sum().item())


def test_the_decoupled_lora_step_of_l2sp_is_the_exact_prox_of_delta_w():
    # F = 1: B ← B − η·λ/(1 + η·λ)·B, so ΔW ← ΔW/(1 + η·λ); here η·λ = 3, a quarter of ΔW stays.
    generator = torch.Generator().manual_seed(2)
    lora_a = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    lora_b = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    update_b, squared = lora_proximal_update(lora_a, lora_b, 2.0, None, lam=30.0, lr=0.1)
    torch.testing.assert_close(update_b, 0.75 * lora_b)
    torch.testing.assert_close(lora_delta(lora_a, lora_b - update_b, 2.0), lora_delta(lora_a, lora_b, 2.0) / 4)
    assert squared.item() == pytest.approx(lora_delta(lora_a, lora_b, 2.0).square().sum().item())


@pytest.mark.parametrize("chunk_elements", [7, 2 ** 22], ids=["rows", "whole"])
def test_the_decoupled_lora_step_of_ewc_is_the_least_squares_b_for_the_prox_and_never_grows_delta_w(chunk_elements):
    # δB = argmin ‖s·δB·A − η·λ·F/(1 + η·λ·F) ⊙ ΔW‖, by lstsq, on a stack of 2 layers; at λ = 1e6 (η·λ·F up to 1e5,
    # where a gradient step on A and B would diverge) ΔW shrinks and never grows.
    generator = torch.Generator().manual_seed(3)
    lora_a = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64)
    lora_b = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    fisher = torch.rand(2, 5, 7, generator=generator, dtype=torch.float64)
    for lam in (0.5, 1e6):
        update_b, _ = lora_proximal_update(lora_a, lora_b, 2.0, fisher, lam, 0.1, chunk_elements)
        for layer in range(2):
            delta = lora_delta(lora_a[layer], lora_b[layer], 2.0)
            change = 0.1 * lam * fisher[layer] / (1 + 0.1 * lam * fisher[layer]) * delta
            hand = torch.linalg.lstsq(2.0 * lora_a[layer].T, change.T).solution.T
            torch.testing.assert_close(update_b[layer], hand)
            after = lora_delta(lora_a[layer], lora_b[layer] - update_b[layer], 2.0)
            assert after.norm() < delta.norm()
