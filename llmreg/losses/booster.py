"""Booster's harmful-perturbation regularizer (Huang et al. 2025, arXiv 2409.01586, Eq. 1 and the update of Eq. 2).

    min_w  f(w) + λ · ( h(w) − h(w − α·∇h(w)/‖∇h(w)‖) )

f is the alignment loss, h the loss on harmful data. Following the paper (first order, as MAML), the direction
u = ∇h(w)/‖∇h(w)‖ is a constant, so the regularizer's gradient is λ·(∇h(w) − ∇h(w̃)) with w̃ = w − α·u. ‖·‖ is the
global L2 norm over all trainable parameters together (every LoRA A and B, or every weight), plus ε.

These functions work on lists of per-parameter tensors (gradients, parameters); the trainer computes the gradients.
Booster is one of the weight-perturbation rules of ``llmreg.losses.perturbation`` (SAM's step, taken downhill on h).
"""

import torch

from llmreg.losses.perturbation import global_norm, normalized_step


__all__ = ["global_norm", "perturbation", "regularizer_gradient"]


def perturbation(harmful_grads: list[torch.Tensor], alpha: float, eps: float = 1e-7) -> list[torch.Tensor]:
    """The step w̃ − w = −α·∇h/(‖∇h‖ + ε), per parameter (ε = 1e-7 as the official code)."""
    return normalized_step(harmful_grads, -alpha, eps)


def regularizer_gradient(harmful_grads: list[torch.Tensor], perturbed_harmful_grads: list[torch.Tensor],
                         lam: float) -> list[torch.Tensor]:
    """λ·(∇h(w) − ∇h(w̃)), the gradient of λ·(h(w) − h(w̃)) with the direction held constant."""
    return [lam * (g - g_tilde) for g, g_tilde in zip(harmful_grads, perturbed_harmful_grads, strict=True)]
