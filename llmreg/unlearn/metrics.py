"""TOFU-style unlearning metrics (Maini et al. 2024, as CLEAR computes them: arXiv 2410.18057 §5 and its code).

- ROUGE-L recall of a greedy answer against the true one: the longest common subsequence of words / the true
  answer's length.
- Answer probability: exp(−mean token NLL) of the true answer (a length-normalized likelihood).
- Truth ratio TR = exp(mean loss of the perturbed (wrong) answers − loss of the paraphrased (right) answer), with
  length-normalized losses: above 1 when the model prefers the right answer. Reported on the forget set as
  mean min(TR, 1/TR) and elsewhere as mean max(0, 1 − 1/TR).
- Forget quality: the p-value of a two-sample Kolmogorov–Smirnov test between the forget-set truth ratios of the
  unlearned model and of a model never trained on the forget set (the "gold" model): 1 means indistinguishable.
- Model utility: the harmonic mean of the retain-side scores (ROUGE, probability, truth ratio on each set).
"""

import math
import re

import torch


_WORD = re.compile(r"\w+")


def rouge_l_recall(prediction: str, reference: str) -> float:
    """LCS(prediction words, reference words) / number of reference words (case-insensitive)."""
    predicted, expected = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not expected:
        raise ValueError("rouge_l_recall needs a reference with at least one word.")
    previous = [0] * (len(predicted) + 1)
    for word in expected:
        current = [0]
        for j, other in enumerate(predicted):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(expected)


def answer_probability(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(mean log π) over each sequence's answer tokens: (B, T) → (B,)."""
    mask = mask.to(token_logps.dtype)
    return torch.exp((token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1))


def truth_ratio(paraphrased_loss: torch.Tensor, perturbed_losses: torch.Tensor) -> torch.Tensor:
    """TR = exp(mean over the perturbed answers of their loss − the paraphrased answer's loss): (B,), (B, K) → (B,).
    Losses are each answer's mean token NLL."""
    return torch.exp(perturbed_losses.mean(-1) - paraphrased_loss)


def truth_ratio_score(ratios: torch.Tensor, forget: bool) -> float:
    """The reported score: mean min(TR, 1/TR) on the forget set, mean max(0, 1 − 1/TR) elsewhere."""
    if forget:
        return float(torch.minimum(ratios, 1 / ratios).mean())
    return float(torch.clamp(1 - 1 / ratios, min=0).mean())


def forget_quality(unlearned_ratios, gold_ratios) -> float:
    """The KS test's p-value between the two models' forget-set truth ratios (report log of it; 0 is best)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(torch.as_tensor(unlearned_ratios).tolist(), torch.as_tensor(gold_ratios).tolist()).pvalue)


def model_utility(scores: list[float]) -> float:
    """The harmonic mean of the retain-side scores; 0 when any of them is 0."""
    if not scores or any(s < 0 for s in scores):
        raise ValueError(f"model_utility needs non-negative scores, got {scores}.")
    if any(s == 0 for s in scores):
        return 0.0
    return len(scores) / math.fsum(1 / s for s in scores)
