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

Decoupled (applied after the optimizer's step, as AdamW applies weight decay, not through Adam's normalization and
gradient clipping): the step −η·∇ of the penalty's Moreau envelope with the step's learning rate η, whose gradient is
λ·F/(1 + η·λ·F) ⊙ Δ. In full fine-tuning this step is exactly the penalty's proximal step,
θ ← argmin_x (1/2η)‖x − θ‖² + (λ/2)·Σ F·(x − θ₀)² = θ₀ + Δ/(1 + η·λ·F), stable for any η·λ·F (the plain step
−η·λ·F·Δ overshoots θ₀ once η·λ·F > 1, and diverges past 2). With LoRA the proximal step is taken on ΔW and
projected, by least squares, on what a change of B can do (A unchanged): for L2-SP that is the exact prox
ΔW/(1 + η·λ) (B scaled by 1/(1 + η·λ)); for EWC the prox's change seen through A's row space, which never moves ΔW
farther from 0 (a gradient step on A and B, even of the envelope, diverges where η·λ·F is large once s²·‖B‖² or
s²·‖A‖² passes about 2).

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


def anchor_gradients(deltas: list[torch.Tensor], fishers: list[torch.Tensor | None], lam: float,
                     proximal_lr: float = 0.0) -> list[torch.Tensor]:
    """∂/∂θ of the penalty: λ·F·(θ − θ₀) per tensor. With ``proximal_lr`` η > 0, of its Moreau envelope:
    λ·F/(1 + η·λ·F)·(θ − θ₀), so that θ − η·(this) is the proximal step θ₀ + Δ/(1 + η·λ·F)."""
    gradients = []
    for delta, fisher in zip(deltas, fishers, strict=True):
        weight = lam if fisher is None else lam * fisher.to(delta.dtype)
        if proximal_lr > 0:
            weight = weight / (1 + proximal_lr * weight)
        gradients.append((weight * delta).detach())
    return gradients


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s·B·A: (out, r) × (r, in) → (out, in), or a stack of them: (L, out, r) × (L, r, in) → (L, out, in)."""
    return scaling * (lora_b @ lora_a)


# EWC's F ⊙ ΔW is made a chunk of at most this many elements at a time (16 MiB in float32): whole, it is as large as
# the adapted weights (hundreds of MiB for a 135M model), and each step would allocate and page it in again.
FISHER_CHUNK_ELEMENTS = 2 ** 22


def lora_anchor_gradients(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fisher: torch.Tensor | None,
                          lam: float, chunk_elements: int = FISHER_CHUNK_ELEMENTS, proximal_lr: float = 0.0,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂/∂A, ∂/∂B, Σ F·ΔW²) of (λ/2)·Σ F·(s·B·A)²: with P = λ·F ⊙ ΔW, ∂/∂A = s·Bᵀ·P and ∂/∂B = s·P·Aᵀ.

    With ``proximal_lr`` η > 0, the gradients of the penalty's Moreau envelope in ΔW (the decoupled step's):
    P = λ·F/(1 + η·λ·F) ⊙ ΔW. Σ F·ΔW² is the penalty's distance either way.

    Without F (L2-SP) ΔW is never formed: with the r × r Gram matrices G_A = A·Aᵀ and G_B = Bᵀ·B, ‖ΔW‖² =
    s²·tr(G_B·G_A), ∂/∂A = λ·s²·G_B·A and ∂/∂B = λ·s²·B·G_A, O(r²·(in + out)) instead of O(r·in·out).

    A stack of L layers of one shape, (L, r, in) and (L, out, r) with F (L, out, in), gives stacked gradients and the
    sum over the stack."""
    lora_a, lora_b = lora_a.detach(), lora_b.detach()
    if fisher is None:
        gram_a, gram_b = lora_a @ lora_a.mT, lora_b.mT @ lora_b
        squared = scaling ** 2 * (gram_b * gram_a).sum()  # tr(G_B·G_A), both symmetric
        weight = lam / (1 + proximal_lr * lam) * scaling ** 2
        return weight * gram_b @ lora_a, weight * lora_b @ gram_a, squared
    if lora_a.dim() == 2:
        grad_a, grad_b, squared = lora_anchor_gradients(lora_a[None], lora_b[None], scaling, fisher[None], lam,
                                                        chunk_elements, proximal_lr)
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
            if proximal_lr > 0:  # F/(1 + η·λ·F) in P: F ⊙ ΔW divided by 1 + η·λ·F, and the products again
                weighted.div_(fisher[layers, rows].to(lora_a.dtype).mul(proximal_lr * lam).add_(1))
                weighted_a = weighted @ lora_a[layers].mT
            grad_b[layers, rows] = weighted_a
            grad_a[layers] += b_rows.mT @ weighted
    return grad_a.mul_(lam * scaling), grad_b.mul_(lam * scaling), scaling * squared


def lora_proximal_update(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fisher: torch.Tensor | None,
                         lam: float, lr: float, chunk_elements: int = FISHER_CHUNK_ELEMENTS,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the decoupled anchor subtracts from B, Σ F·ΔW²): the proximal step's change of ΔW,
    η·P̃ = η·λ·F/(1 + η·λ·F) ⊙ ΔW, made by B alone as nearly as it can be, by least squares:
    δB = argmin ‖s·δB·A − η·P̃‖ = (η/s)·P̃·Aᵀ·(A·Aᵀ)⁺. For L2-SP (F = 1) that is η·λ/(1 + η·λ)·B, the exact prox of
    ΔW. As ΔW = s·B·A lies in A's row space, ΔW − s·δB·A = proj_A((1 − η·λ·F/(1 + η·λ·F)) ⊙ ΔW): never larger than
    ΔW, at any λ and η. Shapes as ``lora_anchor_gradients``; a stack gives a stack."""
    # The envelope's ∂/∂B is s·P̃·Aᵀ: δB = η·(s·P̃·Aᵀ)·(s²·A·Aᵀ)⁺.
    _, grad_b, squared = lora_anchor_gradients(lora_a, lora_b, scaling, fisher, lam, chunk_elements, proximal_lr=lr)
    lora_a = lora_a.detach()
    return lr * grad_b @ torch.linalg.pinv(scaling ** 2 * (lora_a @ lora_a.mT), hermitian=True), squared


def accumulate_fisher(fisher: list[torch.Tensor] | None, example_grads: list[torch.Tensor],
                      num_examples: int) -> list[torch.Tensor]:
    """Add one example's squared log-likelihood gradients / N to the running diagonal Fisher (float32)."""
    squares = [g.detach().float().square() / num_examples for g in example_grads]
    return squares if fisher is None else [f + s for f, s in zip(fisher, squares, strict=True)]
