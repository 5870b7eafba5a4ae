"""RPG surrogates against exact gradients on a tabular softmax policy (one state, K tokens), by enumeration.

Every token x is one row of the batch with ℓ = log_softmax(θ)[x]; weighting row x by π_old(x) and summing turns the
per-token loss into its exact expectation under the sampling policy, so −∇ of that sum must equal ∇J, with
J = E_{π_θ}[R] − β·D computed in closed form. The hand values were derived apart from this code.
"""

import itertools

import pytest
import torch

from llmreg.losses.aggregation import aggregate
from llmreg.losses.rpg import CLIPS, DIVERGENCES, ESTIMATORS, rpg_per_token_loss


DTYPE = torch.float64
THETA = torch.tensor([0.2, -0.1, 0.5, 0.0], dtype=DTYPE)
OLD_LOGITS = torch.tensor([0.0, 0.0, 0.3, -0.2], dtype=DTYPE)
REF_LOGITS = torch.tensor([0.1, -0.3, 0.0, 0.2], dtype=DTYPE)
REWARDS = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=DTYPE)
TOKENS = torch.arange(4)


def surrogate_gradient(divergence, estimator, reference, *, rewards=REWARDS, baseline=0.25, beta=1.0, clip="none",
                       theta=THETA, kl_in_advantage=False, per_token=False):
    """−∇θ of E_{x~π_old}[per-token loss(x)] (per_token: the rows' gradients before weighting, shape (K, K))."""
    theta = theta.clone().requires_grad_(True)
    logps = theta.log_softmax(-1)[TOKENS].unsqueeze(0)
    old = OLD_LOGITS.log_softmax(-1)[TOKENS].unsqueeze(0)
    ref = REF_LOGITS.log_softmax(-1)[TOKENS].unsqueeze(0) if reference == "fixed" else None
    loss, _ = rpg_per_token_loss(logps, old, (rewards - baseline).unsqueeze(0), divergence=divergence,
                                 estimator=estimator, beta=beta, ref_logps=ref, clip=clip,
                                 kl_in_advantage=kl_in_advantage)
    if per_token:
        return torch.stack([-torch.autograd.grad(loss[0, x], theta, retain_graph=True)[0] for x in TOKENS])
    (loss[0] * OLD_LOGITS.softmax(-1)).sum().backward()
    return -theta.grad


def objective_gradient(divergence, reference, *, rewards=REWARDS, beta=1.0, theta=THETA):
    """∇θ J, J = E_{π_θ}[R] − β D(π_θ, π_ref) in closed form (unnormalized KLs equal normalized ones here)."""
    theta = theta.clone().requires_grad_(True)
    log_pi = theta.log_softmax(-1)
    log_ref = (OLD_LOGITS if reference == "old" else REF_LOGITS).log_softmax(-1)
    if divergence in ("fkl", "ufkl"):
        kl = (log_ref.exp() * (log_ref - log_pi)).sum()
    else:
        kl = (log_pi.exp() * (log_pi - log_ref)).sum()
    objective = (log_pi.exp() * rewards).sum() - beta * kl
    objective.backward()
    return theta.grad


VARIANTS = list(itertools.product(DIVERGENCES, ESTIMATORS, ("old", "fixed")))


@pytest.mark.parametrize(("divergence", "estimator", "reference"), VARIANTS)
def test_expected_gradient_is_the_objective_gradient(divergence, estimator, reference):
    torch.testing.assert_close(surrogate_gradient(divergence, estimator, reference),
                               objective_gradient(divergence, reference), rtol=0, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reference", ["old", "fixed"])
def test_kl_in_advantage_unclipped_has_the_objective_gradient(divergence, reference):
    torch.testing.assert_close(surrogate_gradient(divergence, "full", reference, kl_in_advantage=True),
                               objective_gradient(divergence, reference), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("variant", "reference", "rewards", "expected"), [
    # Hand case 1: pure KL (R = 0, β = 1).
    ("fkl", "old", torch.zeros(4, dtype=DTYPE), [-0.015904, 0.050393, -0.021468, -0.013021]),
    ("rkl", "old", torch.zeros(4, dtype=DTYPE), [-0.014542, 0.046076, -0.019629, -0.011906]),
    ("urkl", "fixed", torch.zeros(4, dtype=DTYPE), [0.024105, -0.001092, -0.105576, 0.082563]),
    ("ufkl", "fixed", torch.zeros(4, dtype=DTYPE), [0.015922, -0.007360, -0.099427, 0.090866]),
    # Hand case 2: reward + KL.
    ("ufkl", "old", REWARDS, [0.235996, 0.047509, -0.372008, 0.088504]),
    ("urkl", "old", REWARDS, [0.237358, 0.043192, -0.370169, 0.089620]),
    ("rkl", "fixed", REWARDS, [0.276005, -0.003977, -0.456116, 0.184088]),
    ("fkl", "fixed", REWARDS, [0.267821, -0.010245, -0.449967, 0.192391]),
])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_hand_values_from_the_spec(variant, reference, rewards, expected, estimator):
    gradient = surrogate_gradient(variant, estimator, reference, rewards=rewards)
    torch.testing.assert_close(gradient, torch.tensor(expected, dtype=DTYPE), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("divergence", "estimator", "reference"), VARIANTS)
def test_advantage_baseline_does_not_change_the_expected_gradient(divergence, estimator, reference):
    gradients = [surrogate_gradient(divergence, estimator, reference, baseline=b) for b in (-3.0, 0.0, 0.25, 7.0)]
    for gradient in gradients[1:]:
        torch.testing.assert_close(gradient, gradients[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("normalized", "unnormalized"), [("fkl", "ufkl"), ("rkl", "urkl")])
@pytest.mark.parametrize("reference", ["old", "fixed"])
def test_unnormalized_kl_differs_per_sample_but_agrees_in_expectation(normalized, unnormalized, reference):
    zero = torch.zeros(4, dtype=DTYPE)  # pure KL, so the difference is the KL term's
    per_token = [surrogate_gradient(d, "full", reference, rewards=zero, baseline=0.0, per_token=True)
                 for d in (normalized, unnormalized)]
    assert (per_token[0] - per_token[1]).abs().max() > 1e-3
    expected = [surrogate_gradient(d, "full", reference, rewards=zero, baseline=0.0)
                for d in (normalized, unnormalized)]
    torch.testing.assert_close(expected[0], expected[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_on_policy_with_old_reference_the_kl_gradient_vanishes(divergence):
    # θ = θ_old: UFKL/URKL give an exactly zero KL gradient on every token, FKL/RKL a zero-mean one.
    zero = torch.zeros(4, dtype=DTYPE)
    per_token = surrogate_gradient(divergence, "full", "old", rewards=zero, baseline=0.0, theta=OLD_LOGITS,
                                   per_token=True)
    expected = surrogate_gradient(divergence, "full", "old", rewards=zero, baseline=0.0, theta=OLD_LOGITS)
    torch.testing.assert_close(expected, torch.zeros(4, dtype=DTYPE), rtol=0, atol=1e-12)
    if divergence.startswith("u"):
        torch.testing.assert_close(per_token, torch.zeros_like(per_token), rtol=0, atol=1e-12)
    else:
        assert per_token.abs().max() > 0.1


@pytest.mark.parametrize(("divergence", "estimator", "reference"), VARIANTS)
@pytest.mark.parametrize("clip", ["dual", "rpg"])
def test_clipping_changes_nothing_when_every_ratio_is_in_range(divergence, estimator, reference, clip):
    if clip == "rpg" and estimator == "full":
        return  # clip='rpg' is for the REINFORCE estimator (an error, tested below)
    near_old = OLD_LOGITS + torch.tensor([0.05, -0.05, 0.02, 0.0], dtype=DTYPE)  # all w within [0.8, 1.28)
    clipped = surrogate_gradient(divergence, estimator, reference, clip=clip, theta=near_old)
    unclipped = surrogate_gradient(divergence, estimator, reference, clip="none", theta=near_old)
    torch.testing.assert_close(clipped, unclipped, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("divergence", "expected"), [
    # Hand case 3: token 1 has A < 0 and w = 0.79 < 1 − ε_l, so it is inactive.
    ("fkl", [0.285240, -0.108526, -0.305536, 0.128822]),
    ("rkl", [0.188198, 0.198959, -0.436528, 0.049371]),
    ("ufkl", [0.236768, 0.045062, -0.370966, 0.089136]),
    ("urkl", [0.236670, 0.045372, -0.371098, 0.089056]),
])
def test_rpg_style_clip_hand_values(divergence, expected):
    gradient = surrogate_gradient(divergence, "reinforce", "old", clip="rpg")
    torch.testing.assert_close(gradient, torch.tensor(expected, dtype=DTYPE), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("divergence", "expected"), [
    ("fkl", [0.223878, 0.085905, -0.388366, 0.078583]),
    ("ufkl", [0.223878, 0.085905, -0.388366, 0.078583]),
    ("rkl", [0.225240, 0.081589, -0.386527, 0.079698]),
    ("urkl", [0.225240, 0.081589, -0.386527, 0.079698]),
])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dual_clip_hand_values(divergence, expected, estimator):
    gradient = surrogate_gradient(divergence, estimator, "old", clip="dual")
    torch.testing.assert_close(gradient, torch.tensor(expected, dtype=DTYPE), rtol=0, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_an_inactive_token_gets_exactly_the_gradient_the_clipping_rule_says(divergence):
    # Token 1: A = −0.25 < 0 and w ≈ 0.79 < 1 − ε_l. RPG-style clip: no gradient at all. Dual clip: the reward part
    # is cut and only the KL part remains, −g_KL ∇ℓ, the same as with zero advantage.
    rpg = surrogate_gradient(divergence, "reinforce", "old", clip="rpg", per_token=True)
    torch.testing.assert_close(rpg[1], torch.zeros(4, dtype=DTYPE), rtol=0, atol=0)
    kl_only = surrogate_gradient(divergence, "reinforce", "old", clip="none", rewards=torch.zeros(4, dtype=DTYPE),
                                 baseline=0.0, per_token=True)
    for estimator in ESTIMATORS:
        dual = surrogate_gradient(divergence, estimator, "old", clip="dual", per_token=True)
        torch.testing.assert_close(dual[1], kl_only[1], rtol=0, atol=1e-12)
    assert rpg[0].abs().max() > 0  # an active token keeps its gradient


@pytest.mark.parametrize(("divergence", "estimator"), [("ufkl", "full"), ("urkl", "reinforce"), ("rkl", "full")])
def test_monte_carlo_through_the_masked_aggregation_agrees_within_its_error_bar(divergence, estimator):
    generator = torch.Generator().manual_seed(0)
    num_sequences, length = 4000, 50  # 2e5 tokens from π_old, padded rows masked out
    tokens = torch.multinomial(OLD_LOGITS.softmax(-1), num_sequences * length, replacement=True,
                               generator=generator).view(num_sequences, length)
    mask = torch.ones(num_sequences, length, dtype=DTYPE)
    mask[::3, length // 2:] = 0  # some shorter sequences: the normalizer must count real tokens only
    theta = THETA.clone().requires_grad_(True)
    logps = theta.log_softmax(-1)[tokens]
    old = OLD_LOGITS.log_softmax(-1)[tokens]
    ref = REF_LOGITS.log_softmax(-1)[tokens]
    advantages = (REWARDS - 0.25)[tokens]
    loss, _ = rpg_per_token_loss(logps, old, advantages, divergence=divergence, estimator=estimator, beta=1.0,
                                 ref_logps=ref, clip="none")
    aggregate(loss, mask, "token-mean").backward()
    estimate = -theta.grad
    # Per-token gradient samples g(x)(e_x − π_θ) give the standard error of the mean.
    per_token = surrogate_gradient(divergence, estimator, "fixed", per_token=True)[tokens[mask.bool()]]
    stderr = per_token.std(dim=0) / per_token.shape[0] ** 0.5
    exact = objective_gradient(divergence, "fixed")
    assert ((estimate - exact).abs() <= 4 * stderr).all(), (estimate, exact, stderr)


def test_full_and_reinforce_losses_have_the_same_per_token_gradient():
    for divergence, reference in itertools.product(DIVERGENCES, ("old", "fixed")):
        full = surrogate_gradient(divergence, "full", reference, per_token=True)
        reinforce = surrogate_gradient(divergence, "reinforce", reference, per_token=True)
        torch.testing.assert_close(full, reinforce, rtol=0, atol=1e-12)


def test_metrics_are_detached_per_token_estimates():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.5, -0.5]])  # w = e^0.1, e^0.5, 1
    loss, metrics = rpg_per_token_loss(logps, old, torch.tensor([1.0]), divergence="urkl", beta=0.1)
    assert loss.shape == logps.shape and loss.requires_grad
    assert all(not value.requires_grad and value.shape == logps.shape for value in metrics.values())
    torch.testing.assert_close(metrics["ratio"], (logps - old).exp().detach())
    assert (metrics["kl"] >= 0).all()  # URKL's per-token estimate w·k3 is non-negative
    assert metrics["clipped"].tolist() == [[0.0, 1.0, 0.0]]  # A > 0: only w ≥ 1 + ε_h = 1.28 is cut


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"divergence": "kl"}, "valid values: fkl, ufkl, rkl, urkl"),
    ({"divergence": "fkl", "estimator": "ppo"}, "valid values: full, reinforce"),
    ({"divergence": "fkl", "clip": "hard"}, "valid values: " + ", ".join(CLIPS)),
    ({"divergence": "fkl", "beta": -0.1}, "beta must be >= 0"),
    ({"divergence": "fkl", "clip": "rpg"}, "REINFORCE estimator"),
    ({"divergence": "fkl", "estimator": "reinforce", "kl_in_advantage": True}, "kl_in_advantage"),
    ({"divergence": "fkl", "dual_clip_c": 1.1}, "dual_clip_c"),
])
def test_bad_options_are_clear_errors(kwargs, message):
    logps = torch.zeros(1, 3)
    options = {"beta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        rpg_per_token_loss(logps, logps, torch.zeros(1), **options)


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="ref_logps has shape"):
        rpg_per_token_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), divergence="rkl", beta=0.1,
                           ref_logps=torch.zeros(2, 4))
