"""The KL estimator vocabulary, shared by every method (the names verl, OpenRLHF and TRL use).

For samples x ~ p and the log-ratio r = log p(x) − log q(x), unbiased or low-variance estimates of KL(p‖q):

- ``k1`` = r                          unbiased, high variance, can be negative per sample;
- ``k2`` = r² / 2                     biased (exact to second order), non-negative;
- ``k3`` = exp(−r) − 1 + r            unbiased, non-negative (Schulman, "Approximating KL divergence", 2020).

``k3_of_log(log_y)`` = y − 1 − log y is the function under ``k3`` (k3 = k3_of_log(−r)); RPG's unnormalized KLs are
importance-weighted values of it (RPG paper, App. D).

``vocab_kl`` is the exact KL between two next-token distributions given as logits, summed over the vocabulary and
averaged over the masked tokens: for a model and a teacher or base model scored on the same tokens.
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


def vocab_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor,
             num_items: torch.Tensor | float | None = None) -> torch.Tensor:
    """Token mean over ``mask`` of KL(p‖q) = Σ_v p(v)·(log p(v) − log q(v)), exact over the vocabulary (normalized by
    ``num_items`` when given)."""
    log_p, log_q = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return aggregate(per_token, mask, "token-mean", num_items)
