"""Weight-perturbation update rules: the gradient is taken at perturbed weights w + δ, δ built from g = ∇L(w).

All of them are two gradient passes: g at w, then g̃ = ∇L(w + δ) at the moved weights, and the update direction is a
combination a·g + b·g̃ (``combine``). They differ in δ and in (a, b):

- SAM (Foret et al. 2021, arXiv 2010.01412, ε̂ of Eq. 2 with p = 2, and the first-order gradient of Eq. 3):
  δ = ρ·g/‖g‖, update g̃ (a = 0, b = 1).
- ASAM (Kwon et al. 2021, arXiv 2102.11600, Algorithm 1 with T_w = diag(|w| + η)): δ = ρ·T²g/‖Tg‖, the
  ascent step in the parameter-scaled geometry; the paper's code scales weight tensors and leaves biases unscaled
  (T = 1 there). Update g̃.
- Gradient-norm regularization by a forward difference (Karakida et al. 2023, arXiv 2210.02720, their "F-GR": an
  ascent step, then the descent gradient there, with the step ε/‖g‖ along g): the gradient of
  L(w) + (γ/2)·‖∇L(w)‖² is g + γ·H·g, and H·g = ‖g‖·H·ĝ ≈ ‖g‖·(∇L(w + ε·ĝ) − g)/ε with ĝ = g/‖g‖. So δ = ε·ĝ and the
  update is (1 − c)·g + c·g̃ with c = γ‖g‖/ε. On a quadratic the difference is exact (H is constant); otherwise its
  error is O(ε) (the third derivative along ĝ).
- AWP (Wu et al. 2020, arXiv 2004.05884, the layer-wise update of §4 with one ascent step): per weight tensor l,
  δ_l = γ·‖w_l‖·g_l/‖g_l‖ (each layer moved relative to its own size); tensors of one dimension (biases, norms) are
  not moved, as in the paper's code. Update g̃.

Norms are global over all the tensors given (every trainable parameter together) unless said otherwise, computed in
float64; ``eps`` keeps a zero gradient from dividing by zero. These functions work on lists of per-parameter tensors;
the trainer computes the gradients, moves the weights and applies the combination.
"""

import torch


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, …, t_n)‖₂ over all entries of all tensors: each tensor's norm in its own precision (one fused kernel),
    combined in float64."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return torch.stack([n.double() for n in norms]).square().sum().sqrt()


def normalized_step(grads: list[torch.Tensor], radius: float, eps: float = 1e-12) -> list[torch.Tensor]:
    """radius·g/(‖g‖ + eps) per tensor: SAM's δ (radius ρ), gradient-norm regularization's (radius ε); Booster's
    descent step with radius −α."""
    scale = radius / (global_norm(grads) + eps)
    return [(scale * g.double()).to(g.dtype) for g in grads]


def adaptive_step(grads: list[torch.Tensor], params: list[torch.Tensor], radius: float, eta: float,
                  scaled: list[bool], eps: float = 1e-12) -> list[torch.Tensor]:
    """ASAM's δ = radius·T²g/(‖Tg‖ + eps), T = |w| + eta on the tensors marked ``scaled`` and 1 elsewhere."""
    factors = [(p.detach().double().abs() + eta) if s else torch.ones((), dtype=torch.float64)
               for p, s in zip(params, scaled, strict=True)]
    scaled_grads = [t * g.double() for t, g in zip(factors, grads, strict=True)]
    scale = radius / (global_norm(scaled_grads) + eps)
    return [(scale * t * sg).to(g.dtype) for t, sg, g in zip(factors, scaled_grads, grads, strict=True)]


def layerwise_step(grads: list[torch.Tensor], params: list[torch.Tensor], gamma: float,
                   eps: float = 1e-12) -> list[torch.Tensor]:
    """AWP's δ_l = gamma·‖w_l‖·g_l/(‖g_l‖ + eps) for each tensor of two or more dimensions; 0 for the others."""
    steps = []
    for g, p in zip(grads, params, strict=True):
        if p.dim() < 2:
            steps.append(torch.zeros_like(g))
            continue
        scale = gamma * global_norm([p]) / (global_norm([g]) + eps)
        steps.append((scale * g.double()).to(g.dtype))
    return steps


def gradient_norm_coefficients(grad_norm: float, gamma: float, epsilon: float) -> tuple[float, float]:
    """(a, b) of the forward-difference gradient of L + (γ/2)‖∇L‖²: a·g + b·∇L(w + ε·ĝ) with c = γ‖g‖/ε,
    a = 1 − c, b = c."""
    c = gamma * grad_norm / epsilon
    return 1.0 - c, c


def gradient_scaled(loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``loss`` with its value unchanged (bit for bit, when finite) and its gradient multiplied by ``scale``: a
    backward of it gives scale·∇loss, as hooks scaling every parameter's gradient would, with no hook."""
    return loss.detach() + scale * (loss - loss.detach())


def combine(grads: list[torch.Tensor], perturbed_grads: list[torch.Tensor], a: float,
            b: float) -> list[torch.Tensor]:
    """a·g + b·g̃ per tensor: the update direction of every rule above."""
    return [a * g + b * g_tilde for g, g_tilde in zip(grads, perturbed_grads, strict=True)]
