"""Dynamic loss-based sample reweighting, on tensors (Sow et al., ICLR 2025, arXiv 2502.06733, §3 and its code).

Each sample's weight is a function of its own loss ℓ_i, over the samples of one (global) batch:

    x_i = 2δ·ℓ_i/(ℓmax − ℓmin) − δ·(ℓmax + ℓmin)/(ℓmax − ℓmin)       min–max to [−δ, δ] (denominator ≥ 1e-6)
    f_i = min(x_i + δ, δ)            linupper  (low losses get low scores; the paper's main method)
        = 1 − x_i²/δ²                quadratic (favours medium losses; "mid" in the code)
        = |x_i|                      extremes  (favours both ends)
    w_i = exp((f_i − max f)/r) / Σ_j exp((f_j − max f)/r)                Eq. (4): softmax with temperature r

Eq. (4) is the closed form of max_{w ∈ Δ} Σ w_i·f_i − r·KL(w‖uniform): r → ∞ gives uniform weights, r → 0 the
argmax. ``uniform`` gives 1/n. Weights are detached: they reweight the gradient, they do not receive one.
"""

import torch
import torch.nn.functional as F


STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")


def normalized_losses(losses: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Min–max normalization of a loss vector to [−δ, δ]; all-equal losses give 0."""
    low, high = losses.min(), losses.max()
    spread = torch.clamp_min(high - low, 1e-6)
    return 2 * delta * losses / spread - delta * (high + low) / spread


def strategy_scores(x: torch.Tensor, strategy: str, delta: float = 1.0) -> torch.Tensor:
    """f(x) of a strategy, for normalized losses x in [−δ, δ]."""
    if strategy == "linupper":
        return torch.clamp_max(x + delta, delta)
    if strategy == "quadratic":
        return 1 - x.square() / delta**2
    if strategy == "extremes":
        return x.abs()
    if strategy == "uniform":
        return torch.zeros_like(x)
    raise ValueError(f"Unknown reweighting strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}.")


@torch.no_grad()
def sample_weights(losses: torch.Tensor, strategy: str, *, r: float = 1.0, delta: float = 1.0) -> torch.Tensor:
    """The weights of a 1-D vector of per-sample losses: non-negative, summing to 1, detached."""
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"sample_weights needs a non-empty 1-D loss vector, got shape {tuple(losses.shape)}.")
    if r <= 0 or delta <= 0:
        raise ValueError(f"r and delta must be > 0, got r={r} and delta={delta}.")
    scores = strategy_scores(normalized_losses(losses.double(), delta), strategy, delta)
    return torch.softmax((scores - scores.max()) / r, dim=0).to(losses.dtype)


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted next-token cross-entropy (B, T−1) and its mask (labels ≠ −100)."""
    targets = labels[:, 1:]
    mask = targets != -100
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.clamp(min=0).flatten(), reduction="none")
    return losses.view_as(targets) * mask, mask


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor,
                      segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean cross-entropy over its valid tokens, and its token count.

    A sample is a row of the batch, or, with ``segment_ids`` (B, T) (padding-free packing: several documents in one
    row), each segment: the loss of the token at t + 1 belongs to the segment of position t + 1. Samples with no valid
    token get loss 0 and count 0."""
    token_losses, mask = per_token_losses(logits, labels)
    if segment_ids is None:
        counts = mask.sum(-1)
        return token_losses.sum(-1) / counts.clamp(min=1), counts
    segments = segment_ids[:, 1:].flatten()
    num_segments = int(segment_ids.max()) + 1
    sums = torch.zeros(num_segments, dtype=token_losses.dtype, device=logits.device).index_add_(
        0, segments, token_losses.flatten())
    counts = torch.zeros(num_segments, dtype=torch.long, device=logits.device).index_add_(
        0, segments, mask.flatten().long())
    return sums / counts.clamp(min=1), counts
