"""The KL estimator vocabulary, shared by every method (the names verl, OpenRLHF and TRL use).

For samples x ~ p and the log-ratio r = log p(x) − log q(x), unbiased or low-variance estimates of KL(p‖q):

- ``k1`` = r                          unbiased, high variance, can be negative per sample;
- ``k2`` = r² / 2                     biased (exact to second order), non-negative;
- ``k3`` = exp(−r) − 1 + r            unbiased, non-negative (Schulman, "Approximating KL divergence", 2020).

``k3_of_log(log_y)`` = y − 1 − log y is the function under ``k3`` (k3 = k3_of_log(−r)); RPG's unnormalized KLs are
importance-weighted values of it (RPG paper, App. D).

``vocab_kl`` is the exact KL between two next-token distributions given as logits, summed over the vocabulary and
averaged over the masked tokens: for a model and a teacher or base model scored on the same tokens. ``top_k_kl`` is
the same KL with the base given by its k most likely tokens' log-probabilities (precomputed once): both distributions
coarse-grained to those k tokens and one bucket for the rest of the vocabulary.
"""

import torch

from llmreg.losses.aggregation import aggregate


KL_ESTIMATORS = ("k1", "k2", "k3")


def k3_of_log(log_y: torch.Tensor) -> torch.Tensor:
    """y − 1 − log y for y = exp(log_y): non-negative, zero at y = 1."""
    return torch.expm1(log_y) - log_y


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(p‖q) from tokens sampled from p, with ``logps`` = log p and ``ref_logps`` = log q."""
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return k3_of_log(-log_ratio)
    raise ValueError(f"Unknown KL estimator {estimator!r}; valid estimators: {', '.join(KL_ESTIMATORS)}.")


def vocab_kl_per_token(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p(v)·(log p(v) − log q(v)) at each token, exact over the vocabulary."""
    log_p, log_q = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def vocab_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor,
             num_items: torch.Tensor | float | None = None) -> torch.Tensor:
    """Token mean over ``mask`` of ``vocab_kl_per_token`` (normalized by ``num_items`` when given)."""
    return aggregate(vocab_kl_per_token(logits_p, logits_q), mask, "token-mean", num_items)


def with_rest(log_probs: torch.Tensor) -> torch.Tensor:
    """k log-probabilities extended by the log-probability of everything else, log(1 − Σ p): a distribution over
    k + 1 outcomes. The rest's mass is floored at 1e-30 (float32 rounding can leave it at or just below 0)."""
    rest = (1 - log_probs.exp().sum(-1, keepdim=True)).clamp(min=1e-30).log()
    return torch.cat([log_probs, rest], dim=-1)


def top_k_kl_per_token(logits: torch.Tensor, base_ids: torch.Tensor, base_logps: torch.Tensor,
                       direction: str = "forward") -> torch.Tensor:
    """The KL between the base's next-token distribution and the model's (``logits``) at each token, both
    coarse-grained to the base's k most likely tokens (``base_ids``, with log-probabilities ``base_logps``) and one
    outcome for the rest of the vocabulary.

    ``forward``: KL(base‖model) = Σ_{j ≤ k+1} p_j·(log p_j − log q_j); ``reverse``: KL(model‖base). Coarse-graining
    loses information, so each is at most the exact KL over the vocabulary (``vocab_kl_per_token``), and equal to it
    when the k tokens are the whole vocabulary (up to float32 rounding in the rest's mass). This is the exact KL of
    the partition {top-k tokens, rest}; the rest's internal distribution is what a precomputed top-k cannot know."""
    model = with_rest(logits.float().log_softmax(-1).gather(-1, base_ids))
    base = with_rest(base_logps.float())
    log_p, log_q = (base, model) if direction == "forward" else (model, base)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def top_k_kl(logits: torch.Tensor, base_ids: torch.Tensor, base_logps: torch.Tensor, mask: torch.Tensor,
             direction: str = "forward", num_items: torch.Tensor | float | None = None) -> torch.Tensor:
    """Token mean over ``mask`` of ``top_k_kl_per_token`` (normalized by ``num_items`` when given)."""
    return aggregate(top_k_kl_per_token(logits, base_ids, base_logps, direction), mask, "token-mean", num_items)
