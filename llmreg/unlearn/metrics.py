"""TOFU-style unlearning metrics (Maini et al. 2024, as CLEAR computes them: arXiv 2410.18057 §5 and its code).

- ROUGE-L recall of a greedy answer against the true one, as TOFU computes it (``rouge-score``'s ``rougeL`` with the
  Porter stemmer): the longest common subsequence of stemmed words / the true answer's length in words.
- Answer probability: exp(−mean token NLL) of the true answer (a length-normalized likelihood).
- Truth ratio TR = exp(mean loss of the perturbed (wrong) answers − loss of the paraphrased (right) answer), with
  length-normalized losses: above 1 when the model prefers the right answer. Reported on the forget set as
  mean min(TR, 1/TR) and elsewhere as mean max(0, 1 − 1/TR).
- Forget quality: the p-value of a two-sample Kolmogorov–Smirnov test between the forget-set truth ratios of the
  unlearned model and of a model never trained on the forget set (the "gold" model): 1 means indistinguishable.
- Model utility: the harmonic mean of the retain-side scores (ROUGE, probability, truth ratio on each set).
"""

import functools
import math
import re

import torch


# What the evaluation stages record of the ROUGE they computed: a row scored another way is not reused.
ROUGE_L = "rouge-score rougeL recall, Porter stemmer"
# rouge-score's tokenizer lowercases and keeps the runs of [a-z0-9]; everything else separates words.
_ROUGE_WORD = re.compile(r"[a-z0-9]")


@functools.cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """TOFU's ROUGE-L recall: LCS(prediction words, reference words) / number of reference words, words lowercased,
    split on anything but [a-z0-9] and Porter-stemmed (words of more than 3 letters), by ``rouge-score``."""
    if not _ROUGE_WORD.search(reference.lower()):
        raise ValueError(f"rouge_l_recall needs a reference with at least one word of [a-z0-9]; got {reference!r}.")
    return _rouge_l_scorer().score(reference, prediction)["rougeL"].recall


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
