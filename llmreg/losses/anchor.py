"""Anchors toward the starting weights against forgetting: L2-SP and EWC.

- L2-SP (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
  arXiv 1802.01483, Ω of §3 without its term on new layers): (λ/2)·‖θ − θ₀‖².
- EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", arXiv 1612.00796, Eq. 3):
  (λ/2)·Σ_i F_i·(θ_i − θ₀_i)², F the diagonal Fisher information of the old behaviour at θ₀, estimated here from
  its data (the "empirical" Fisher): F_i = (1/N)·Σ_n (∂ log p(y_n | x_n)/∂θ_i)², one sequence log-likelihood per
  example (a sum over its answer tokens).

With LoRA the distance is the adapter's update of each base weight, ΔW = s·B·A (s = lora_alpha/r), not A and B
themselves (weight decay on A and B would pull toward BA = 0 only indirectly, and in a metric of the factorization):
(λ/2)·Σ_layers Σ_ij F_ij·ΔW_ij², F the Fisher of the base weight W (L2-SP: F = 1). Its gradients are, with
P = λ·F ⊙ ΔW, ∂/∂B = s·P·Aᵀ and ∂/∂A = s·Bᵀ·P.

Tensors in, tensors out; the trainer finds the tensors and adds the gradients once per optimizer step.
"""

import torch


def anchor_penalty(deltas: list[torch.Tensor], fishers: list[torch.Tensor | None], lam: float) -> torch.Tensor:
    """(λ/2)·Σ F·Δ² over all tensors (F None: 1, L2-SP), in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for delta, fisher in zip(deltas, fishers, strict=True):
        squares = delta.detach().double().square()
        total = total + (squares if fisher is None else fisher.double() * squares).sum().cpu()
    return lam / 2 * total


def anchor_gradients(deltas: list[torch.Tensor], fishers: list[torch.Tensor | None],
                     lam: float) -> list[torch.Tensor]:
    """∂/∂θ of the penalty: λ·F·(θ − θ₀) per tensor."""
    return [(lam * delta if fisher is None else lam * fisher.to(delta.dtype) * delta).detach()
            for delta, fisher in zip(deltas, fishers, strict=True)]


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s·B·A: (out, r) × (r, in) → (out, in), or a stack of them: (L, out, r) × (L, r, in) → (L, out, in)."""
    return scaling * (lora_b @ lora_a)


# EWC's F ⊙ ΔW is made a chunk of at most this many elements at a time (16 MiB in float32): whole, it is as large as
# the adapted weights (hundreds of MiB for a 135M model), and each step would allocate and page it in again.
FISHER_CHUNK_ELEMENTS = 2 ** 22


def lora_anchor_gradients(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fisher: torch.Tensor | None,
                          lam: float, chunk_elements: int = FISHER_CHUNK_ELEMENTS,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂/∂A, ∂/∂B, Σ F·ΔW²) of (λ/2)·Σ F·(s·B·A)²: with P = λ·F ⊙ ΔW, ∂/∂A = s·Bᵀ·P and ∂/∂B = s·P·Aᵀ.

    Without F (L2-SP) ΔW is never formed: with the r × r Gram matrices G_A = A·Aᵀ and G_B = Bᵀ·B, ‖ΔW‖² =
    s²·tr(G_B·G_A), ∂/∂A = λ·s²·G_B·A and ∂/∂B = λ·s²·B·G_A, O(r²·(in + out)) instead of O(r·in·out).

    A stack of L layers of one shape, (L, r, in) and (L, out, r) with F (L, out, in), gives stacked gradients and the
    sum over the stack."""
    lora_a, lora_b = lora_a.detach(), lora_b.detach()
    if fisher is None:
        gram_a, gram_b = lora_a @ lora_a.mT, lora_b.mT @ lora_b
        squared = scaling ** 2 * (gram_b * gram_a).sum()  # tr(G_B·G_A), both symmetric
        return lam * scaling ** 2 * gram_b @ lora_a, lam * scaling ** 2 * lora_b @ gram_a, squared
    if lora_a.dim() == 2:
        grad_a, grad_b, squared = lora_anchor_gradients(lora_a[None], lora_b[None], scaling, fisher[None], lam,
                                                        chunk_elements)
        return grad_a[0], grad_b[0], squared
    # F ⊙ ΔW is dense, (L, out, in): it is made a chunk at a time, whole layers of the stack or, for a layer larger
    # than a chunk, rows of it. For each chunk, three products of r·(its elements) and one pass over its F. The
    # scalings go on the small factors; Σ F·ΔW² comes from a product already made:
    # Σ (F ⊙ ΔW) ⊙ (s·B·A) = s·⟨B, (F ⊙ ΔW)·Aᵀ⟩.
    num_layers, num_rows, num_columns = fisher.shape
    layers_per_chunk = max(1, chunk_elements // (num_rows * num_columns))
    rows_per_chunk = num_rows if layers_per_chunk > 1 else max(1, chunk_elements // num_columns)
    grad_a, grad_b = torch.zeros_like(lora_a), torch.empty_like(lora_b)
    squared = lora_a.new_zeros(())
    for first in range(0, num_layers, layers_per_chunk):
        layers = slice(first, first + layers_per_chunk)
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            b_rows = lora_b[layers, rows]
            weighted = (b_rows @ (scaling * lora_a[layers])).mul_(fisher[layers, rows].to(lora_a.dtype))
            weighted_a = weighted @ lora_a[layers].mT
            squared += (b_rows * weighted_a).sum()
            grad_b[layers, rows] = weighted_a
            grad_a[layers] += b_rows.mT @ weighted
    return grad_a.mul_(lam * scaling), grad_b.mul_(lam * scaling), scaling * squared


def accumulate_fisher(fisher: list[torch.Tensor] | None, example_grads: list[torch.Tensor],
                      num_examples: int) -> list[torch.Tensor]:
    """Add one example's squared log-likelihood gradients / N to the running diagonal Fisher (float32)."""
    squares = [g.detach().float().square() / num_examples for g in example_grads]
    return squares if fisher is None else [f + s for f, s in zip(fisher, squares, strict=True)]
