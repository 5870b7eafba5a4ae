"""Losses of LLM unlearning (Dontsov et al. 2025, "CLEAR", arXiv 2410.18057), on tensors.

So far: the ℓ1 penalty of CLEAR's §3 on the trainable parameters (the entries of an unlearning LoRA's A and B):

    L_total = L_unlearn + λ1·Σ_θ |θ|,    ∂/∂θ = λ1·sign(θ)   (sign(0) = 0)

The penalty is on the entries, not on ΔW = B·A, and is not normalized per module.
"""

import torch


def l1_penalty(tensors: list[torch.Tensor], lam: float) -> torch.Tensor:
    """λ·Σ|θ| over every entry of ``tensors`` (float32 or wider); differentiable, with gradient λ·sign(θ)."""
    if not tensors:
        raise ValueError("l1_penalty needs at least one tensor: are any parameters trainable?")
    if len({t.dtype for t in tensors}) == 1:  # one concatenation: a few kernels instead of two per tensor
        return lam * torch.cat([t.reshape(-1) for t in tensors]).abs().sum(dtype=torch.float32)
    return lam * sum(t.abs().sum(dtype=torch.float32) for t in tensors)
