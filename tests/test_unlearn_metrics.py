"""The TOFU-style unlearning metrics (llmreg/unlearn/metrics.py) against hand-computed values."""

import math

import pytest
import torch

from llmreg.unlearn.metrics import (
    answer_probability,
    forget_quality,
    model_utility,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)


def test_rouge_l_recall_by_hand():
    assert rouge_l_recall("The author was born in Paris", "born in Paris") == 1.0
    # LCS of "paris was where she was born" and "she was born in paris": she was born → 3 of 5 words
    assert rouge_l_recall("Paris was where she was born", "She was born in Paris.") == pytest.approx(3 / 5)
    assert rouge_l_recall("I don't know", "born in Paris") == 0.0
    with pytest.raises(ValueError, match="at least one word"):
        rouge_l_recall("x", "...")


def test_rouge_l_recall_stems_and_splits_as_tofu():
    # Porter stems: authors → author, novels → novel, so both reference words are matched (unstemmed: none).
    assert rouge_l_recall("The authors wrote novels", "author novel") == 1.0
    # "won't" splits at the apostrophe into won, t; "1984-born" into 1984, born: 3 of the reference's 4 words in order.
    assert rouge_l_recall("she won't say; 1984-born", "won t 1984 died") == pytest.approx(3 / 4)
    # Letters outside [a-z0-9] separate words, as in rouge-score: "São" is "s o".
    assert rouge_l_recall("Sao Paulo", "São Paulo") == pytest.approx(1 / 3)


def test_answer_probability_is_the_length_normalized_likelihood():
    logps = torch.tensor([[-1.0, -3.0, -50.0], [-0.5, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(answer_probability(logps, mask), torch.tensor([math.exp(-2.0), math.exp(-0.5)]))


def test_truth_ratio_and_its_scores():
    paraphrased = torch.tensor([1.0, 2.0])
    perturbed = torch.tensor([[2.0, 3.0], [1.0, 2.0]])  # means 2.5 and 1.5
    ratios = truth_ratio(paraphrased, perturbed)
    torch.testing.assert_close(ratios, torch.tensor([math.exp(1.5), math.exp(-0.5)]))
    assert truth_ratio_score(ratios, forget=True) == pytest.approx((math.exp(-1.5) + math.exp(-0.5)) / 2)
    assert truth_ratio_score(ratios, forget=False) == pytest.approx((1 - math.exp(-1.5) + 0.0) / 2)


def test_forget_quality_is_the_ks_p_value():
    same = forget_quality([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    apart = forget_quality([0.1, 0.2, 0.3, 0.4], [0.9, 1.0, 1.1, 1.2])
    assert same == pytest.approx(1.0)
    assert apart == pytest.approx(2 / 70)  # exact two-sided test, 4 vs 4, fully separated: 2 / C(8, 4)


def test_model_utility_is_the_harmonic_mean():
    assert model_utility([0.5, 1.0]) == pytest.approx(2 / (2 + 1))
    assert model_utility([0.5, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        model_utility([-0.1])
