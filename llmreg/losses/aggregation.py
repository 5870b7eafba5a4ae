"""Masked aggregation of per-token losses: the one place where a loss becomes a scalar.

Modes (verl's names):

- ``token-mean``: Σ loss·mask / N. With ``num_items`` = N, the number of loss tokens in the whole optimizer step
  (every micro-batch of gradient accumulation, every data-parallel rank), each micro-batch's loss is its share of one
  global token mean: summing the micro-batch losses (gradient accumulation) and averaging gradients over R ranks
  after multiplying each rank's loss by R (as TRL does when it passes the global count) gives exactly the loss of the
  full batch in one piece. So 1 micro-batch of 8 equals 8 micro-batches of 1, and R ranks equal 1 rank on the same
  global batch. Without ``num_items`` the normalizer is the local token count, which weighs tokens differently
  whenever micro-batches hold different numbers of tokens.
- ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO's original); invariant only when
  every micro-batch holds the same number of sequences.
- ``seq-mean-token-sum``: mean over sequences of each sequence's token sum (Dr. GRPO-like, length-weighted).
"""

import torch


AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              num_items: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token tensor over the tokens where ``mask`` is 1.

    ``num_items`` (token-mean only) replaces the local token count as the normalizer; pass the global count of the
    optimizer step for gradient-accumulation and data-parallel invariance (see the module docstring).
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token has shape {tuple(per_token.shape)} but mask has {tuple(mask.shape)}.")
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        normalizer = mask.sum() if num_items is None else num_items
        return (per_token * mask).sum() / torch.clamp_min(torch.as_tensor(normalizer, dtype=per_token.dtype), 1.0)
    if num_items is not None:
        raise ValueError(f"num_items applies to mode 'token-mean' only, not {mode!r}.")
    token_sums = (per_token * mask).sum(dim=-1)
    if mode == "seq-mean-token-mean":
        return (token_sums / mask.sum(dim=-1).clamp_min(1.0)).mean()
    if mode == "seq-mean-token-sum":
        return token_sums.mean()
    raise ValueError(f"Unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATION_MODES)}.")
