"""Self-play losses (llmreg.losses.selfplay) against exact oracles on tabular softmax policies, in float64.

A tabular policy is a logit vector θ over N whole responses, ℓ_θ = log_softmax(θ). Making every response (or every
pair of responses) one row of the batch and weighting the rows by their sampling probabilities turns a per-sample loss
into its exact population expectation, which is then compared with:

- SPPO: values computed by hand, and the multiplicative-weights step π_t·exp(η P(y ≻ π_t))/Z that the regression loss
  approximates (its exact minimizer, found by LBFGS);
- RSPO: the true gradients of KL(π‖μ), KL(μ‖π), χ²(π‖μ), CE(π, μ) and −H(π) at θ = θ_t, with the documented ratios;
- SPIN / α-SPIN: the logit identity (1−α)·z_SPIN + α·z_DPO, the two-KL opponent's closed form, and the population
  optimum π_t^{1−α} π_ref^α (p_data/π_t)^{1/β} with its fixed point (the logistic loss over all pairs of a tabular
  policy has an exact minimizer, so LBFGS on the library's loss must land on it);
- opponent mixtures and sequence log-probs: direct hand computations.

The hand values were derived independently of this code.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from llmreg.losses.selfplay import (
    REGULARIZERS,
    opponent_logps,
    rspo_regularizer,
    rspo_regularizer_sum,
    sequence_logps,
    spin_loss,
    sppo_loss,
    win_probabilities,
)


DTYPE = torch.float64
SCORES = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0], dtype=DTYPE)  # PairRM-style scores: winner first, loser last


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def minimize(objective, start):
    """argmin over logits of a scalar objective by LBFGS in float64, to a gradient below 1e-9 (asserted).

    A line search cannot resolve loss changes below float64's 1e-16, which stalls it at gradients of about 1e-9;
    a second pass of plain quasi-Newton steps (no line search) polishes the gradient down to about 1e-11.
    """
    theta = start.clone().requires_grad_(True)

    def run(**options):
        optimizer = torch.optim.LBFGS([theta], lr=1.0, tolerance_grad=1e-14, tolerance_change=0.0, history_size=50,
                                      **options)

        def closure():
            optimizer.zero_grad()
            loss = objective(theta)
            loss.backward()
            return loss

        optimizer.step(closure)

    run(max_iter=2000, line_search_fn="strong_wolfe")
    run(max_iter=50)
    gradient = torch.autograd.grad(objective(theta), theta)[0]
    assert gradient.abs().max() < 1e-9, gradient
    return theta.detach()


# ---------------------------------------------------------------------------------------------------------------
# win_probabilities (SPPO's PairRM estimate of P(y ≻ y'))


def test_win_probabilities_hand_values():
    p = win_probabilities(SCORES)
    torch.testing.assert_close(p, torch.tensor([0.809289, 0.666674, 0.5, 0.333326, 0.190711], dtype=DTYPE),
                               rtol=0, atol=1e-6)
    assert p.mean().item() == pytest.approx(0.5, abs=1e-15)
    assert torch.sigmoid(SCORES[0] - SCORES[-1]).item() == pytest.approx(0.982014, abs=1e-6)  # P_wl


@pytest.mark.parametrize("num_samples", [2, 3, 5, 8])
def test_win_probabilities_average_one_half_and_stay_within_the_bounds(num_samples):
    scores = 3.0 * randn(16, num_samples, seed=num_samples)
    p = win_probabilities(scores)
    assert p.shape == scores.shape
    torch.testing.assert_close(p.mean(dim=-1), torch.full((16,), 0.5, dtype=DTYPE), rtol=0, atol=1e-15)
    low, high = 1 / (2 * num_samples), 1 - 1 / (2 * num_samples)  # the diagonal P_ii = ½ is in the average
    assert (p >= low).all() and (p <= high).all()
    # Far-apart scores reach the bounds: the lowest score wins only its tie with itself, the highest all but that.
    p = win_probabilities(100.0 * torch.arange(num_samples, dtype=DTYPE))
    assert p[0].item() == pytest.approx(low, abs=1e-12) and p[-1].item() == pytest.approx(high, abs=1e-12)


def test_win_probabilities_are_bradley_terry_wins_against_the_uniform_sampler():
    scores = randn(6, seed=1)
    preference = torch.sigmoid(scores[:, None] - scores[None, :])
    torch.testing.assert_close(win_probabilities(scores), preference @ torch.full((6,), 1 / 6, dtype=DTYPE),
                               rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# sppo_loss (SPPO's regression loss, Wu et al.)


def test_sppo_loss_at_init_hand_values():
    p = win_probabilities(SCORES)
    p_win, p_lose = p[:1], p[-1:]
    logps = torch.tensor([-37.25], dtype=DTYPE)  # policy == π_t: Δ = 0
    loss = sppo_loss(logps, logps - 5, logps, logps - 5, p_win, p_lose, eta=1000.0)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(95659.509, rel=1e-6)
    by_hand = 0.5 * 1000.0**2 * ((p_win - 0.5).square() + (p_lose - 0.5).square())
    torch.testing.assert_close(loss, by_hand, rtol=1e-14, atol=0)
    hard = sppo_loss(logps, logps - 5, logps, logps - 5, p_win, p_lose, eta=1000.0, variant="hard")
    assert hard.item() == 500000.0  # TRL's sppo_hard at β = 1e-3 (SPPO issue #10)
    half = torch.tensor([0.5], dtype=DTYPE)
    assert sppo_loss(logps, logps, logps, logps, half, half, eta=1000.0).item() == 0.0


def test_sppo_loss_variants_against_the_hand_formulas():
    policy_w, policy_l, iter_w, iter_l = (randn(8, seed=seed) - 20 for seed in range(4))
    p_win, p_lose = torch.rand(2, 8, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    eta = 3.0
    delta_w, delta_l = policy_w - iter_w, policy_l - iter_l
    soft = 0.5 * ((delta_w - eta * (p_win - 0.5)).square() + (delta_l - eta * (p_lose - 0.5)).square())
    single = 0.5 * ((delta_w - eta * (p_win - 0.5)).square() + (delta_l + eta * (p_win - 0.5)).square())
    hard = (delta_w - eta / 2).square() + (delta_l + eta / 2).square()
    args = (policy_w, policy_l, iter_w, iter_l, p_win)
    torch.testing.assert_close(sppo_loss(*args, p_lose, eta=eta), soft, rtol=1e-14, atol=0)
    torch.testing.assert_close(sppo_loss(*args, p_lose, eta=eta, variant="single"), single, rtol=1e-14, atol=0)
    torch.testing.assert_close(sppo_loss(*args, None, eta=eta, variant="single"), single, rtol=1e-14, atol=0)
    torch.testing.assert_close(sppo_loss(*args, p_lose, eta=eta, variant="hard"), hard, rtol=1e-14, atol=0)
    assert (soft - single).abs().max() > 1e-2  # p_lose matters for "soft" only


def test_sppo_loss_bad_options():
    x = torch.zeros(2, dtype=DTYPE)
    with pytest.raises(ValueError, match="p_lose"):
        sppo_loss(x, x, x, x, x, eta=1.0, variant="soft")
    with pytest.raises(ValueError, match="Unknown SPPO variant 'sppo'; valid values: soft, single, hard"):
        sppo_loss(x, x, x, x, x, x, eta=1.0, variant="sppo")


# ---------------------------------------------------------------------------------------------------------------
# SPPO's minimizer vs the multiplicative-weights step (Wu et al.: the loss takes log Z ≈ η/2)

N_SPPO = 5
ITER_LOGPS = (1.5 * randn(N_SPPO, seed=10)).log_softmax(-1)


def antisymmetric_preferences(n, seed):
    """A random preference matrix with P + Pᵀ = 1 and P_ii = ½."""
    upper = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE).triu(1)
    return upper + (1 - upper.T).tril(-1) + 0.5 * torch.eye(n, dtype=DTYPE)


def sppo_population_minimizer(eta, wins):
    """argmin_θ E_{y~π_t}[(Δ(y) − η(P(y ≻ π_t) − ½))²], built from sppo_loss with each response as winner and loser."""
    weights = ITER_LOGPS.exp()

    def population_loss(theta):
        logps = theta.log_softmax(-1)
        return (weights * sppo_loss(logps, logps, ITER_LOGPS, ITER_LOGPS, wins, wins, eta=eta)).sum()

    return minimize(population_loss, ITER_LOGPS).softmax(-1)


def test_expected_win_probability_against_oneself_is_one_half():
    preferences = antisymmetric_preferences(N_SPPO, seed=11)
    torch.testing.assert_close(preferences + preferences.T, torch.ones(N_SPPO, N_SPPO, dtype=DTYPE), rtol=0,
                               atol=1e-15)
    pi_t = ITER_LOGPS.exp()
    assert (pi_t @ preferences @ pi_t).item() == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize(("eta", "tolerance"), [(0.1, 1e-6), (1.0, 1e-3)])
def test_sppo_minimizer_is_the_multiplicative_weights_step_for_small_eta(eta, tolerance):
    wins = antisymmetric_preferences(N_SPPO, seed=11) @ ITER_LOGPS.exp()  # P(y ≻ π_t)
    multiplicative_weights = (ITER_LOGPS + eta * wins).softmax(-1)
    minimizer = sppo_population_minimizer(eta, wins)
    assert total_variation(minimizer, multiplicative_weights) < tolerance
    assert total_variation(ITER_LOGPS.exp(), multiplicative_weights) > 10 * tolerance  # the step moved π


def test_sppo_minimizer_departs_from_multiplicative_weights_for_large_eta():
    # TV 0.017 with this draw (0.198 with another): log Z ≈ η/2 no longer holds.
    wins = antisymmetric_preferences(N_SPPO, seed=11) @ ITER_LOGPS.exp()
    multiplicative_weights = (ITER_LOGPS + 10.0 * wins).softmax(-1)
    assert total_variation(sppo_population_minimizer(10.0, wins), multiplicative_weights) > 5e-3


# ---------------------------------------------------------------------------------------------------------------
# rspo_regularizer: expected gradients at θ = θ_t (RSPO, Tang et al.: the estimators' expected gradients)

N_RSPO = 6
THETA_T = randn(N_RSPO, seed=20)
BASE_LOGPS = (1.3 * randn(N_RSPO, seed=21)).log_softmax(-1)


def reverse_kl(log_pi, log_mu):
    return (log_pi.exp() * (log_pi - log_mu)).sum()


def forward_kl(log_pi, log_mu):
    return (log_mu.exp() * (log_mu - log_pi)).sum()


def chi_squared(log_pi, log_mu):
    return ((2 * log_pi - log_mu).exp()).sum() - 1


def cross_entropy(log_pi, log_mu):
    return -(log_pi.exp() * log_mu).sum()


def negative_entropy(log_pi, log_mu):
    return (log_pi.exp() * log_pi).sum()


def divergence_gradient(divergence, theta=THETA_T, base_logps=BASE_LOGPS):
    theta = theta.clone().requires_grad_(True)
    divergence(theta.log_softmax(-1), base_logps).backward()
    return theta.grad


def regularizer_rows(kind, theta, base_logps=BASE_LOGPS, is_clip=50.0):
    """R̂ for each of the N responses as one row, with θ a leaf to differentiate against."""
    return rspo_regularizer(theta.log_softmax(-1), base_logps, kind=kind, is_clip=is_clip)


def expected_regularizer_gradient(kind, weights, theta=THETA_T, base_logps=BASE_LOGPS, is_clip=50.0):
    """∇θ E_{y~weights}[R̂(y)], the sampling weights detached."""
    theta = theta.clone().requires_grad_(True)
    (weights.detach() * regularizer_rows(kind, theta, base_logps, is_clip)).sum().backward()
    return theta.grad


def per_sample_gradients(kind, theta=THETA_T, is_clip=50.0):
    theta = theta.clone().requires_grad_(True)
    rows = regularizer_rows(kind, theta, is_clip=is_clip)
    return torch.stack([torch.autograd.grad(row, theta, retain_graph=True)[0] for row in rows])


@pytest.mark.parametrize(("kind", "ratio", "divergence"), [
    ("reverse_kl", 2.0, reverse_kl),
    ("forward_kl_is", 1.0, forward_kl),
    ("chi2", 0.5, chi_squared),
    ("reverse_kl_noent", 1.0, cross_entropy),
    ("entropy", 2.0, negative_entropy),
])
def test_expected_regularizer_gradient_is_a_fixed_multiple_of_the_divergence_gradient(kind, ratio, divergence):
    log_ratio = THETA_T.log_softmax(-1) - BASE_LOGPS
    assert log_ratio.abs().max() < 50.0  # the clip does not bind
    surrogate = expected_regularizer_gradient(kind, THETA_T.softmax(-1))
    exact = divergence_gradient(divergence)
    assert exact.abs().max() > 1e-2
    torch.testing.assert_close(surrogate, ratio * exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("theta", [THETA_T, randn(N_RSPO, seed=22)])
def test_forward_kl_on_base_samples_is_unbiased_in_value_and_gradient(theta):
    base_probs = BASE_LOGPS.exp()
    rows = rspo_regularizer(theta.log_softmax(-1), BASE_LOGPS, kind="forward_kl_samples")
    torch.testing.assert_close((base_probs * rows).sum(), forward_kl(theta.log_softmax(-1), BASE_LOGPS), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(expected_regularizer_gradient("forward_kl_samples", base_probs, theta=theta),
                               divergence_gradient(forward_kl, theta=theta), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("kind", "sign"), [("forward_kl_is", -1.0), ("chi2", 1.0)])
def test_clipped_samples_get_no_gradient(kind, sign):
    clipped_quantity = sign * (THETA_T.log_softmax(-1) - BASE_LOGPS)  # −D for forward_kl_is, D for chi2
    ordered = clipped_quantity.sort().values
    clip = (0.5 * (ordered[2] + ordered[3])).item()  # half the samples clipped
    is_clipped = clipped_quantity > clip
    assert 0 < is_clipped.sum() < N_RSPO and not (clipped_quantity == clip).any()
    values = regularizer_rows(kind, THETA_T, is_clip=clip)
    torch.testing.assert_close(values[is_clipped], torch.full_like(values[is_clipped], math.exp(clip)), rtol=1e-15,
                               atol=0)
    torch.testing.assert_close(values[~is_clipped], clipped_quantity[~is_clipped].exp(), rtol=1e-14, atol=0)
    clipped, unclipped = per_sample_gradients(kind, is_clip=clip), per_sample_gradients(kind)
    assert (clipped[is_clipped] == 0).all()
    torch.testing.assert_close(clipped[~is_clipped], unclipped[~is_clipped], rtol=0, atol=0)
    assert unclipped[is_clipped].abs().max() > 1e-3


def test_reverse_kl_to_the_iterate_itself_is_exactly_zero_at_the_start():
    # Iteration 1: μ = π_t, so D = 0 on every sample at θ = θ_t.
    iterate_logps = THETA_T.log_softmax(-1)
    values = regularizer_rows("reverse_kl", THETA_T, base_logps=iterate_logps)
    assert (values == 0).all()
    gradients = expected_regularizer_gradient("reverse_kl", THETA_T.softmax(-1), base_logps=iterate_logps)
    assert (gradients == 0).all()


def test_smoothed_chi2_by_hand():
    policy = torch.tensor([-3.0, -1.0, 0.5, 20.0, -40.0], dtype=DTYPE)
    base = torch.tensor([-2.0, -1.5, -1.0, -1.0, -1.0], dtype=DTYPE)
    ratio = (policy - base).clamp(max=10.0).exp()
    torch.testing.assert_close(rspo_regularizer(policy, base, kind="chi2_smooth"), ratio / (1 + ratio), rtol=1e-14,
                               atol=0)
    clipped = rspo_regularizer(policy, base, kind="chi2_smooth")[3].item()  # D = 21 > R = 10
    assert clipped == pytest.approx(math.exp(10) / (1 + math.exp(10)), rel=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# rspo_regularizer_sum


def test_regularizer_sum_is_the_weighted_sum_of_the_terms():
    policy, base = randn(7, seed=30) - 5, randn(7, seed=31) - 5
    weights = {"forward_kl_is": 0.01, "reverse_kl": 0.5, "chi2": 0.1, "entropy": 0.2}
    total, terms = rspo_regularizer_sum(weights, policy, base, is_clip=1.0)
    assert list(terms) == list(weights)
    for kind, term in terms.items():
        torch.testing.assert_close(term, rspo_regularizer(policy, base, kind=kind, is_clip=1.0), rtol=0, atol=0)
    expected = sum(weight * rspo_regularizer(policy, base, kind=kind, is_clip=1.0) for kind, weight in weights.items())
    torch.testing.assert_close(total, expected, rtol=1e-14, atol=0)
    assert (terms["forward_kl_is"] == math.exp(1.0)).any()  # is_clip reached the terms
    empty_total, empty_terms = rspo_regularizer_sum({}, policy, base)
    assert empty_terms == {} and (empty_total == 0).all() and empty_total.shape == policy.shape


def test_regularizer_bad_options():
    x = torch.zeros(3, dtype=DTYPE)
    with pytest.raises(ValueError, match="forward_kl_samples"):
        rspo_regularizer_sum({"reverse_kl": 1.0, "forward_kl_samples": 0.1}, x, x)
    valid = "valid values: " + ", ".join(REGULARIZERS)
    with pytest.raises(ValueError, match=f"Unknown RSPO regularizer 'kl'; {valid}"):
        rspo_regularizer_sum({"kl": 1.0}, x, x)
    with pytest.raises(ValueError, match=f"Unknown RSPO regularizer 'forward'; {valid}"):
        rspo_regularizer(x, x, kind="forward")


# ---------------------------------------------------------------------------------------------------------------
# spin_loss and α-SPIN (SPIN, Chen et al.; α-SPIN, Alami et al.)

BETA, ALPHA = 0.1, 0.3


def sequence_batch(seed, size=16):
    """Random sequence log-probs: policy, opponent and base on the real and the generated response."""
    policy_real, policy_gen, opp_real, opp_gen, base_real, base_gen = (-30 + 10 * randn(size, seed=seed + k)
                                                                       for k in range(6))
    return policy_real, policy_gen, opp_real, opp_gen, base_real, base_gen


def logit(policy_real, policy_gen, ref_real, ref_gen, beta=BETA):
    return beta * ((policy_real - ref_real) - (policy_gen - ref_gen))


def test_alpha_spin_logit_mixes_the_spin_and_dpo_logits():
    pr, pg, opr, opg, br, bg = sequence_batch(40)
    loss = spin_loss(pr, pg, opr, opg, beta=BETA, base_real=br, base_gen=bg, alpha=ALPHA)
    mixed = (1 - ALPHA) * logit(pr, pg, opr, opg) + ALPHA * logit(pr, pg, br, bg)
    assert loss.shape == (16,)
    assert (loss - (-F.logsigmoid(mixed))).abs().max() < 1e-12
    assert (loss - (-F.logsigmoid(logit(pr, pg, opr, opg)))).abs().max() > 1e-2  # the base model mattered


def test_alpha_spin_ignores_per_prompt_constants_in_the_references():
    pr, pg, opr, opg, br, bg = sequence_batch(50)
    c_opp, c_base = 100 * randn(16, seed=60), 100 * randn(16, seed=61)
    loss = spin_loss(pr, pg, opr, opg, beta=BETA, base_real=br, base_gen=bg, alpha=ALPHA)
    shifted = spin_loss(pr, pg, opr + c_opp, opg + c_opp, beta=BETA, base_real=br + c_base, base_gen=bg + c_base,
                        alpha=ALPHA)
    torch.testing.assert_close(shifted, loss, rtol=0, atol=1e-12)


def test_alpha_zero_is_spin_and_alpha_one_is_dpo_against_the_base():
    pr, pg, opr, opg, br, bg = sequence_batch(70)
    spin = -F.logsigmoid(logit(pr, pg, opr, opg))
    dpo = -F.logsigmoid(logit(pr, pg, br, bg))
    torch.testing.assert_close(spin_loss(pr, pg, opr, opg, beta=BETA), spin, rtol=0, atol=0)
    torch.testing.assert_close(spin_loss(pr, pg, opr, opg, beta=BETA, base_real=br, base_gen=bg, alpha=0.0), spin,
                               rtol=0, atol=0)
    for opponent in ((opr, opg), (opr + 7 * randn(16, seed=80), opg - 3.0)):
        torch.testing.assert_close(spin_loss(pr, pg, *opponent, beta=BETA, base_real=br, base_gen=bg, alpha=1.0),
                                   dpo, rtol=0, atol=1e-12)


def test_spin_loss_at_init_is_log_two():
    pr, pg, _, _, br, bg = sequence_batch(90)
    at_init = spin_loss(pr, pg, pr, pg, beta=BETA)
    torch.testing.assert_close(at_init, torch.full_like(at_init, math.log(2)), rtol=0, atol=1e-15)
    with_base = spin_loss(pr, pg, pr, pg, beta=BETA, base_real=br, base_gen=bg, alpha=ALPHA)
    assert (with_base - math.log(2)).abs().min() > 1e-6  # DPO(π_t vs π_ref) is not zero


def test_spin_hinge_loss():
    pr, pg, opr, opg, br, bg = sequence_batch(100)
    beta = 0.5
    mixed = (1 - ALPHA) * logit(pr, pg, opr, opg, beta) + ALPHA * logit(pr, pg, br, bg, beta)
    hinge = spin_loss(pr, pg, opr, opg, beta=beta, loss="hinge", base_real=br, base_gen=bg, alpha=ALPHA)
    torch.testing.assert_close(hinge, (1 - mixed).clamp(min=0), rtol=1e-14, atol=1e-14)
    assert (hinge == 0).any() and (hinge > 0.1).any()


def test_spin_loss_bad_options():
    x = torch.zeros(2, dtype=DTYPE)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            spin_loss(x, x, x, x, beta=BETA, base_real=x, base_gen=x, alpha=alpha)
    with pytest.raises(ValueError, match="base_real and base_gen"):
        spin_loss(x, x, x, x, beta=BETA, alpha=0.5)
    with pytest.raises(ValueError, match="base_real and base_gen"):
        spin_loss(x, x, x, x, beta=BETA, base_real=x, alpha=0.5)
    with pytest.raises(ValueError, match="Unknown SPIN loss 'ipo'; valid values: sigmoid, hinge"):
        spin_loss(x, x, x, x, beta=BETA, loss="ipo")


# ---------------------------------------------------------------------------------------------------------------
# α-SPIN's opponent and population optimum on a tabular policy over N = 3 responses (Alami et al.)

P_DATA = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE)
PI_T = torch.tensor([0.2, 0.3, 0.5], dtype=DTYPE)
PI_REF = torch.tensor([0.6, 0.1, 0.3], dtype=DTYPE)


def two_kl_opponent(payoff, lam, alpha, iterate_logps, ref_logps):
    """argmax_π E_π f − λ(1−α) KL(π‖π_t) − λα KL(π‖π_ref), by LBFGS over logits."""
    def negative_objective(theta):
        log_pi = theta.log_softmax(-1)
        kl_t, kl_ref = reverse_kl(log_pi, iterate_logps), reverse_kl(log_pi, ref_logps)
        return -((log_pi.exp() * payoff).sum() - lam * (1 - alpha) * kl_t - lam * alpha * kl_ref)

    return minimize(negative_objective, torch.zeros_like(payoff)).softmax(-1)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_two_kl_opponent_closed_form_and_spin_mixture(alpha):
    lam, payoff = 0.7, randn(5, seed=110)
    iterate_logps, ref_logps = randn(5, seed=111).log_softmax(-1), (2 * randn(5, seed=112)).log_softmax(-1)
    closed_form = ((1 - alpha) * iterate_logps + alpha * ref_logps + payoff / lam).softmax(-1)
    assert total_variation(two_kl_opponent(payoff, lam, alpha, iterate_logps, ref_logps), closed_form) < 1e-6
    # Without a payoff the best response is the normalized geometric mixture π̃ ∝ π_t^{1−α} π_ref^α: spin_loss with
    # α and the base must equal plain SPIN against log π̃, on every pair (y, y').
    mixture = two_kl_opponent(torch.zeros(5, dtype=DTYPE), lam, alpha, iterate_logps, ref_logps).log()
    real, gen = torch.cartesian_prod(torch.arange(5), torch.arange(5)).T
    policy = randn(5, seed=113).log_softmax(-1)
    mixed = spin_loss(policy[real], policy[gen], iterate_logps[real], iterate_logps[gen], beta=lam,
                      base_real=ref_logps[real], base_gen=ref_logps[gen], alpha=alpha)
    against_mixture = spin_loss(policy[real], policy[gen], mixture[real], mixture[gen], beta=lam)
    # The mixture comes from a numerical optimizer (LBFGS), converged to about 1e-7: compare at its accuracy.
    torch.testing.assert_close(mixed, against_mixture, rtol=0, atol=1e-6)


def alpha_spin_step(iterate, beta, alpha):
    """argmin over a tabular π_θ of E_{y~p_data, y'~π_t} α-SPIN(y, y'), every pair one row: the population step.

    Over all functions of y the logistic loss is minimized by logits z(y, y') = log(p_data/π_t)(y) − (same)(y'),
    which a tabular policy can represent, so the minimizer is π_t^{1−α} π_ref^α (p_data/π_t)^{1/β} (normalized).
    """
    real, gen = torch.cartesian_prod(torch.arange(3), torch.arange(3)).T
    weights = P_DATA[real] * iterate[gen]
    iterate_logps, ref_logps = iterate.log(), PI_REF.log()

    def population_loss(theta):
        logps = theta.log_softmax(-1)
        losses = spin_loss(logps[real], logps[gen], iterate_logps[real], iterate_logps[gen], beta=beta,
                           base_real=ref_logps[real], base_gen=ref_logps[gen], alpha=alpha)
        return (weights * losses).sum()

    return minimize(population_loss, iterate_logps).softmax(-1)


@pytest.mark.parametrize(("beta", "alpha", "expected"), [
    (1.0, 0.0, [0.5, 0.3, 0.2]),  # β = 1: SPIN reaches p_data in one step
    (2.0, 0.0, [0.3391, 0.3217, 0.3391]),
    (1.0, 0.4, [0.6853, 0.1707, 0.1440]),
    (2.0, 0.4, [0.5210, 0.2053, 0.2737]),
])
def test_population_step_hand_values(beta, alpha, expected):
    step = alpha_spin_step(PI_T, beta, alpha)
    torch.testing.assert_close(step, torch.tensor(expected, dtype=DTYPE), rtol=0, atol=1e-4)
    closed_form = PI_T ** (1 - alpha) * PI_REF**alpha * (P_DATA / PI_T) ** (1 / beta)
    torch.testing.assert_close(step, closed_form / closed_form.sum(), rtol=0, atol=1e-8)


def test_iterated_alpha_spin_reaches_the_geometric_interpolation_of_data_and_base():
    beta, alpha = 2.0, 0.4  # contraction factor |1 − α − 1/β| = 0.1
    iterate = PI_T
    for _ in range(10):
        iterate = alpha_spin_step(iterate, beta, alpha)
    torch.testing.assert_close(iterate, torch.tensor([0.561402, 0.190625, 0.247973], dtype=DTYPE), rtol=0,
                               atol=1e-6)
    fixed_point = P_DATA ** (1 / (1 + beta * alpha)) * PI_REF ** (beta * alpha / (1 + beta * alpha))
    torch.testing.assert_close(iterate, fixed_point / fixed_point.sum(), rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# opponent_logps (Alami et al.'s fictitious play)


def test_opponent_mixtures_by_hand():
    rows = -20 + 5 * randn(3, 8, seed=120)  # h = 3 iterates, the last one first
    arith = opponent_logps(rows, "arith")
    torch.testing.assert_close(arith, rows.exp().mean(dim=0).log(), rtol=1e-14, atol=0)
    torch.testing.assert_close(opponent_logps(rows, "geom"), rows.mean(dim=0), rtol=1e-14, atol=0)
    assert torch.equal(opponent_logps(rows, "data"), rows[0])
    assert (arith > opponent_logps(rows, "geom")).all()  # AM ≥ GM, strict for distinct rows
    permuted = rows[[2, 0, 1]]
    torch.testing.assert_close(opponent_logps(permuted, "arith"), arith, rtol=1e-14, atol=0)
    torch.testing.assert_close(opponent_logps(permuted, "geom"), opponent_logps(rows, "geom"), rtol=1e-14, atol=0)


@pytest.mark.parametrize("mixture", ["data", "arith", "geom"])
def test_one_iterate_or_identical_iterates_are_that_iterate(mixture):
    row = -20 + 5 * randn(8, seed=130)
    torch.testing.assert_close(opponent_logps(row[None], mixture), row, rtol=0, atol=1e-14)
    torch.testing.assert_close(opponent_logps(row.expand(4, 8), mixture), row, rtol=0, atol=1e-12)


def test_unknown_opponent_mixture():
    with pytest.raises(ValueError, match="Unknown opponent mixture 'mean'; valid values: data, arith, geom"):
        opponent_logps(torch.zeros(2, 3), "mean")


# ---------------------------------------------------------------------------------------------------------------
# sequence_logps (a sequence's log-prob is the sum of its completion tokens' log-probs)


def test_sequence_logps_sums_completion_tokens_only():
    batch, length, vocab = 3, 9, 11
    logits = 3 * randn(batch, length, vocab, seed=140)
    tokens = torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(141))
    per_token = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    spans = [(2, 9), (4, 6), (1, 5)]  # completion = [start, end): prompt before, right padding after
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, (start, end) in enumerate(spans):
        mask[row, start:end] = 1
    expected = torch.tensor([sum(torch.log_softmax(logits[row, k], -1)[tokens[row, k]].item() for k in range(*span))
                             for row, span in enumerate(spans)], dtype=DTYPE)
    torch.testing.assert_close(sequence_logps(per_token, mask), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(sequence_logps(per_token, mask.bool()), expected, rtol=1e-14, atol=0)
    assert (per_token.sum(-1) - expected).abs().min() > 0.1  # prompt and padding would have counted
