"""Loss-based sample weights (llmreg/losses/reweighting.py) against hand values for every strategy and several r, and
their invariants: they sum to 1, ignore shifts and scalings of the losses, and become uniform as r grows."""

import math

import pytest
import torch

from llmreg.losses.reweighting import STRATEGIES, per_sample_losses, sample_weights


LOSSES = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)  # normalized: x = [−1, −0.5, 0, 0.5, 1]


def softmax_by_hand(scores, r):
    exps = [math.exp(s / r) for s in scores]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize(("strategy", "r", "expected"), [
    ("linupper", 1.0, [0.0926, 0.1526, 0.2516, 0.2516, 0.2516]),       # computed by hand
    ("linupper", 0.4, [0.0244, 0.0851, 0.2969, 0.2969, 0.2969]),
    ("quadratic", 1.0, [0.1117, 0.2365, 0.3036, 0.2365, 0.1117]),
    ("extremes", 1.0, [0.2793, 0.1694, 0.1027, 0.1694, 0.2793]),
    ("uniform", 1.0, [0.2] * 5),
])
def test_spec_values(strategy, r, expected):
    assert sample_weights(LOSSES, strategy, r=r).tolist() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("r", [0.25, 0.4, 1.0, 3.0])
def test_hand_values_for_every_strategy_and_r(r):
    x = [-1.0, -0.5, 0.0, 0.5, 1.0]
    scores = {"linupper": [min(v + 1, 1) for v in x], "quadratic": [1 - v * v for v in x],
              "extremes": [abs(v) for v in x], "uniform": [0.0] * 5}
    for strategy in STRATEGIES:
        assert sample_weights(LOSSES, strategy, r=r).tolist() == pytest.approx(softmax_by_hand(scores[strategy], r),
                                                                                rel=1e-12)


def test_delta_scales_the_scores():
    # δ = 2: x = [−2, −1, 0, 1, 2]; linupper f = min(x + 2, 2) = [0, 1, 2, 2, 2]
    assert sample_weights(LOSSES, "linupper", r=1.0, delta=2.0).tolist() == pytest.approx(
        softmax_by_hand([0, 1, 2, 2, 2], 1.0), rel=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invariants(strategy):
    losses = torch.tensor([0.3, 2.7, 1.1, 0.9, 4.2, 2.2], dtype=torch.float64)
    weights = sample_weights(losses, strategy, r=0.5)
    assert weights.sum().item() == pytest.approx(1.0) and (weights >= 0).all()
    assert torch.allclose(sample_weights(3.0 * losses + 7.0, strategy, r=0.5), weights, atol=1e-12)
    assert torch.allclose(sample_weights(losses, strategy, r=1e6), torch.full_like(losses, 1 / 6), atol=1e-5)
    assert torch.equal(sample_weights(torch.full((4,), 2.5), strategy), torch.full((4,), 0.25))


def test_linupper_deprioritizes_low_losses_and_r_sharpens():
    soft, sharp = sample_weights(LOSSES, "linupper", r=1.0), sample_weights(LOSSES, "linupper", r=0.1)
    assert soft[0] < soft[1] < soft[2] and sharp[0] < soft[0]


def test_bad_input():
    with pytest.raises(ValueError, match="valid strategies: uniform, linupper, quadratic, extremes"):
        sample_weights(LOSSES, "linear")
    with pytest.raises(ValueError, match="r and delta must be > 0"):
        sample_weights(LOSSES, "linupper", r=0.0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        sample_weights(LOSSES.view(1, -1), "linupper")


def test_per_sample_losses_rows_and_packed_segments():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :2] = -100  # a prompt
    labels[1, 4:] = -100  # padding
    losses, counts = per_sample_losses(logits, labels)
    for row in range(2):
        terms = [-logits[row, t - 1].log_softmax(-1)[labels[row, t]].item() for t in range(1, 6)
                 if labels[row, t] != -100]
        assert losses[row].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
        assert counts[row].item() == len(terms)
    # One padding-free row of two documents, [0, 1, 2] and [3, 4, 5]: document 2's first token is not predicted from
    # document 1 (its label is -100, as TRL's padding-free collator sets it), so each keeps its own tokens.
    flat_logits, flat_labels = logits[0:1], labels[0:1].clone()
    flat_labels[0, 3] = -100
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]])
    losses, counts = per_sample_losses(flat_logits, flat_labels, segments)
    first = [-flat_logits[0, 1].log_softmax(-1)[flat_labels[0, 2]].item()]
    second = [-flat_logits[0, t - 1].log_softmax(-1)[flat_labels[0, t]].item() for t in (4, 5)]
    assert counts.tolist() == [1, 2]
    assert losses.tolist() == pytest.approx([first[0], sum(second) / 2], rel=1e-5)
