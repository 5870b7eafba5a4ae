"""Self-play preference losses: SPPO, RSPO's reference regularizers, SPIN and α-SPIN with fictitious play.

Everything here works on **sequence-level** log-probs ℓ_M(y) = Σ_k log M(y_k | x, y_<k), the sum (not the mean) over
completion tokens (``sequence_logps``), as all the reference implementations do. Notation (see docs/rspo.md and
docs/spin.md):

- π_θ the policy being trained, π_t the frozen iterate it starts from, μ the fixed base model (π_ref);
- Δ^M(y) = ℓ_θ(y) − ℓ_M(y);
- η the SPPO step size (η = 1/β in TRL's naming; the papers use β = 1e-3, η = 1000).

Every loss returns one value per pair or per sample, shape (B,); the trainer takes the batch mean.
"""

import math

import torch
import torch.nn.functional as F

from llmreg.losses.options import check_option


SPPO_VARIANTS = ("soft", "single", "hard")
REGULARIZERS = ("reverse_kl", "reverse_kl_noent", "forward_kl_is", "forward_kl_samples", "chi2", "chi2_smooth",
                "entropy")
SPIN_LOSSES = ("sigmoid", "hinge")
OPPONENT_MIXTURES = ("data", "arith", "geom")


def sequence_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """ℓ(y): the sum of per-token log-probs over completion tokens only, (B, T) → (B,). Prompt and padding count 0."""
    return (per_token_logps * completion_mask.to(per_token_logps.dtype)).sum(dim=-1)


def win_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """SPPO's estimate of P(y_i ≻ π_t | x) from K scored samples of one prompt, (..., K) → (..., K).

    With Bradley–Terry pairwise probabilities P_ij = σ(s_i − s_j) (P_ii = ½), p_i = (1/K) Σ_j P_ij, the average
    **including j = i**, as SPPO's ``compute_prob.py`` does. Then mean_i p_i = ½ exactly and, for K samples,
    p_i ∈ [1/(2K), 1 − 1/(2K)].
    """
    pairwise = torch.sigmoid(scores.unsqueeze(-1) - scores.unsqueeze(-2))
    return pairwise.mean(dim=-1)


def sppo_loss(policy_logps_w: torch.Tensor, policy_logps_l: torch.Tensor, iter_logps_w: torch.Tensor,
              iter_logps_l: torch.Tensor, p_win: torch.Tensor, p_lose: torch.Tensor | None = None, *, eta: float,
              variant: str = "soft") -> torch.Tensor:
    """The SPPO regression loss per pair (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7), shape (B,).

    The population loss E_{y~π_t}[(Δ^{π_t}(y) − η(P(y ≻ π_t) − ½))²] is minimized by the multiplicative-weights step
    π_{t+1} ∝ π_t · exp(η P(y ≻ π_t)) to first order in η (log Z ≈ η/2). Per pair (winner w, loser l):

    - ``"soft"`` (SPPO's code): ½[(Δ_w − η(p_win − ½))² + (Δ_l − η(p_lose − ½))²], p = win probabilities
      against π_t (``win_probabilities``);
    - ``"single"``: only P(y_w ≻ y_l) = ``p_win``: ½[(Δ_w − η(p_win − ½))² + (Δ_l + η(p_win − ½))²];
    - ``"hard"`` (TRL's ``sppo_hard``): p_win = 1, p_lose = 0 and no ½: (Δ_w − η/2)² + (Δ_l + η/2)².

    Δ = ``policy_logps`` − ``iter_logps`` (π_t's log-probs of the same responses).
    """
    check_option("SPPO variant", variant, SPPO_VARIANTS)
    delta_w = policy_logps_w - iter_logps_w
    delta_l = policy_logps_l - iter_logps_l
    if variant == "hard":
        return (delta_w - eta / 2).square() + (delta_l + eta / 2).square()
    target_w = eta * (p_win - 0.5)
    if variant == "single":
        target_l = -target_w
    else:
        if p_lose is None:
            raise ValueError("The 'soft' SPPO variant needs p_lose, the loser's win probability against π_t.")
        target_l = eta * (p_lose - 0.5)
    return 0.5 * ((delta_w - target_w).square() + (delta_l - target_l).square())


def rspo_regularizer(policy_logps: torch.Tensor, base_logps: torch.Tensor, *, kind: str,
                     is_clip: float = 10.0) -> torch.Tensor:
    """One RSPO reference regularizer R̂ per sample (Tang et al. 2025, arXiv 2503.00030, §4; official code), (B,).

    ``policy_logps`` = ℓ_θ(y), ``base_logps`` = ℓ_μ(y), D = ℓ_θ − ℓ_μ. For y ~ π_t, at θ = θ_t, the expected gradient
    of each estimator relates to a divergence to the base as follows (exact on a tabular policy, tested):

    - ``"reverse_kl"``:        D²                      → 2 × ∇KL(π_θ‖μ)
    - ``"reverse_kl_noent"``:  −ℓ_θ·ℓ_μ                 → ∇CE(π_θ, μ) = ∇[KL(π_θ‖μ) + H(π_θ)]
    - ``"forward_kl_is"``:     exp(min(−D, R))          → 1 × ∇KL(μ‖π_θ)   (importance-sampled; no gradient where
      the ratio μ/π_θ is clipped at e^R)
    - ``"chi2"``:              exp(min(D, R))           → ½ × ∇χ²(π_θ‖μ)
    - ``"chi2_smooth"``:       r/(1+r), r = exp(min(D, R))   (bounded χ²)
    - ``"entropy"``:           ℓ_θ²                     → 2 × ∇(−H(π_θ)), so minimizing it raises entropy

    ``"forward_kl_samples"`` is for y ~ μ instead (responses sampled from the base model): ℓ_μ − ℓ_θ, an unbiased
    estimate of KL(μ‖π_θ) whose gradient is exactly ∇KL(μ‖π_θ) (SFT on the base model's samples). The clips use
    ``is_clip`` = R for the sequence-level ratios, which overflow without it.
    """
    check_option("RSPO regularizer", kind, REGULARIZERS)
    log_ratio = policy_logps - base_logps
    if kind == "reverse_kl":
        return log_ratio.square()
    if kind == "reverse_kl_noent":
        return -policy_logps * base_logps
    if kind == "forward_kl_is":
        return torch.clamp(-log_ratio, max=is_clip).exp()
    if kind == "forward_kl_samples":
        return -log_ratio
    if kind == "chi2":
        return torch.clamp(log_ratio, max=is_clip).exp()
    if kind == "chi2_smooth":
        return torch.sigmoid(torch.clamp(log_ratio, max=is_clip))
    return policy_logps.square()  # "entropy"


def rspo_regularizer_sum(weights: dict[str, float], policy_logps: torch.Tensor, base_logps: torch.Tensor, *,
                         is_clip: float = 10.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_k λ_k R̂_k per sample for the regularizers in ``weights`` (kind → λ), and each unweighted term by kind.

    E.g. RSPO's "IS-For.+Rev." is ``{"forward_kl_is": λ, "reverse_kl": k·λ}``. ``"forward_kl_samples"`` needs
    log-probs on the base model's samples and is not summed here (see ``rspo_regularizer``).
    """
    if "forward_kl_samples" in weights:
        raise ValueError("forward_kl_samples is evaluated on responses sampled from the base model, not on the pair: "
                         "call rspo_regularizer(kind='forward_kl_samples') on those log-probs.")
    terms = {kind: rspo_regularizer(policy_logps, base_logps, kind=kind, is_clip=is_clip) for kind in weights}
    total = sum((weights[kind] * term for kind, term in terms.items()), torch.zeros_like(policy_logps))
    return total, terms


def opponent_logps(iterate_logps: torch.Tensor, mixture: str) -> torch.Tensor:
    """Log-probs of the fictitious-play opponent that mixes h iterates, (h, B) → (B,) (Alami et al. 2024).

    - ``"arith"``: the arithmetic mixture (1/h) Σ_k π_k, log = logsumexp_k ℓ_k − log h;
    - ``"geom"``: the (unnormalized) geometric mean, (1/h) Σ_k ℓ_k; its normalizer depends only on the prompt and
      cancels in the SPIN loss;
    - ``"data"`` mixes at the dataset level (negatives drawn from the last h generators) and scores against the
      last iterate alone: the first row.
    """
    check_option("opponent mixture", mixture, OPPONENT_MIXTURES)
    if mixture == "data":
        return iterate_logps[0]
    if mixture == "arith":
        return torch.logsumexp(iterate_logps, dim=0) - math.log(iterate_logps.shape[0])
    return iterate_logps.mean(dim=0)


def spin_loss(policy_real: torch.Tensor, policy_gen: torch.Tensor, opp_real: torch.Tensor, opp_gen: torch.Tensor, *,
              beta: float, loss: str = "sigmoid", base_real: torch.Tensor | None = None,
              base_gen: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """SPIN (Chen et al. 2024, arXiv 2401.01335, Eq. 4.7) and α-SPIN (Alami et al. 2024, arXiv 2404.04291), (B,).

    Real = the human response y, gen = the opponent's generation y'. With a KL to the base model of weight α the
    opponent becomes the geometric mixture π̃ ∝ π_t^{1−α} μ^α (its normalizer cancels), so with
    m(y) = (1−α)·ℓ_opp(y) + α·ℓ_μ(y) the logit is z = β[(ℓ_θ(y) − m(y)) − (ℓ_θ(y') − m(y'))] and the loss is
    ℓ(z): ``"sigmoid"`` −log σ(z), ``"hinge"`` relu(1 − z). α = 0 is SPIN; α = 1 is DPO against the base with
    self-generated negatives; in general z = (1−α)·z_SPIN + α·z_DPO. The mixture is over whole sequences, never per
    token (a per-token geometric mixture renormalizes at every prefix and is a different model).
    """
    check_option("SPIN loss", loss, SPIN_LOSSES)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the weight on the base model in the opponent mixture and must lie in [0, 1], got "
                         f"{alpha}.")
    if alpha > 0.0 and (base_real is None or base_gen is None):
        raise ValueError("alpha > 0 mixes the base model into the opponent: pass base_real and base_gen.")
    if alpha > 0.0:
        opp_real = (1.0 - alpha) * opp_real + alpha * base_real
        opp_gen = (1.0 - alpha) * opp_gen + alpha * base_gen
    logits = beta * ((policy_real - opp_real) - (policy_gen - opp_gen))
    if loss == "sigmoid":
        return -F.logsigmoid(logits)
    return torch.relu(1.0 - logits)
