"""RPG: KL-regularized policy-gradient surrogates, every variant with the gradient its objective says.

Zhang, Liu, Yuan, Gu, Yao, "On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning",
ICLR 2026, https://huggingface.co/papers/2505.17508.

Per completion token: ℓ = log π_θ (with gradient), ℓ_old = log π_old (the sampling policy), ℓ_ref = log π_ref;
w = π_θ/π_old, ρ = π_ref/π_old; A the advantage. Tokens are sampled from π_old. The objective is
J = E_{π_θ}[R] − β·D with D one of

    fkl  = KL(π_ref‖π_θ)      ufkl = UKL(π_ref‖π_θ)      (forward)
    rkl  = KL(π_θ‖π_ref)      urkl = UKL(π_θ‖π_ref)      (reverse)

UKL(p‖q) = Σ p log(p/q) + Σ (q − p), the unnormalized KL (paper §3, App. D, E). With ``ref_logps=None`` the reference
is the old policy itself (the paper's iterative reference, ρ = 1); otherwise a fixed reference (paper §2.2, general
forms). Each surrogate's per-token gradient is −g·∇ℓ with the gradient coefficient (paper Table 1, Prop. 4.1)

    g = w·A + g_KL,   g_KL:  fkl  βρ                     value ρ·log(π_ref/π_θ)
                             ufkl −β(w − ρ)              value ρ·k3(π_θ/π_ref)
                             rkl  −βw(log(π_θ/π_ref) + 1) value w·log(π_θ/π_ref)
                             urkl −βw·log(π_θ/π_ref)      value w·k3(π_ref/π_θ)

so that E_{x~π_old}[g(x)∇ℓ(x)] = ∇J exactly. "value" is the importance-weighted per-token estimate of D whose
gradient gives g_KL; its mean is the divergence estimate reported as the ``kl`` metric. For normalized policies
fkl and ufkl (rkl and urkl) have the same expected gradient and differ only in per-sample variance.

Estimators:
- ``full`` (paper Table 1, "fully differentiable"): loss = −w·A + β·value, differentiated through w;
- ``reinforce`` (paper Table 2, Alg. 2): loss = −SG(g)·ℓ, the same expected gradient from a stop-gradient weight.

Clipping (``epsilon_low``, ``epsilon_high``, ``dual_clip_c``): a token is *active* when
(A > 0 and w < 1 + ε_h) or (A ≤ 0 and 1 − ε_l ≤ w < c): the tokens whose gradient dual-clip PPO keeps.
- ``dual``: dual-clip PPO on the reward part only; the KL part is never clipped (the released RPG code's choice).
- ``rpg``: the paper's RPG-style clip for the REINFORCE estimator (§4.2, Alg. 2): the whole weight
  w·A + g_KL(w̄), with the KL coefficient evaluated at w̄ = clip(w, 1 − ε_l, 1 + ε_h), on active tokens; nothing
  on the others.
- ``none``: no clipping.

``kl_in_advantage=True`` (full estimator; paper §3.3, Alg. 1): the KL enters the advantage,
Â = A + SG(g_KL)/SG(w), and the loss is the (dual-clipped) −w·Â. The paper writes Â_URKL = A − β log w without the
stop-gradient; differentiating that literally gives the RKL coefficient, not the URKL one, so the KL part of Â is
detached here, which makes the unclipped gradient exactly g.

Caveat (paper; Tang & Munos 2025): per-token surrogates give, for sequences, the gradient of Σ_t KL at the states
π_old visits, without future-KL cross terms. With the old policy as reference the KL gradient is 0 at θ = θ_old.
"""

import torch

from llmreg.losses.kl import k3_of_log
from llmreg.losses.options import check_option


DIVERGENCES = ("fkl", "ufkl", "rkl", "urkl")
ESTIMATORS = ("full", "reinforce")
CLIPS = ("dual", "rpg", "none")


def check_rpg_options(divergence: str, estimator: str, clip: str, beta: float, epsilon_low: float,
                      epsilon_high: float, dual_clip_c: float, kl_in_advantage: bool) -> None:
    """Raise a clear error for an unknown name or an incompatible combination (also run by RPGConfig)."""
    check_option("divergence", divergence, DIVERGENCES)
    check_option("estimator", estimator, ESTIMATORS)
    check_option("clip", clip, CLIPS)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}.")
    if not 0.0 <= epsilon_low < 1.0 or epsilon_high < 0.0:
        raise ValueError(f"Need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {epsilon_low} and {epsilon_high}.")
    if dual_clip_c <= 1.0 + epsilon_high:
        raise ValueError(f"dual_clip_c must exceed 1 + epsilon_high = {1.0 + epsilon_high}, got {dual_clip_c}.")
    if clip == "rpg" and estimator != "reinforce":
        raise ValueError("clip='rpg' is the RPG-style clip of the REINFORCE estimator; with estimator='full' use "
                         "clip='dual' or 'none' (or kl_in_advantage=True for the paper's Alg. 1).")
    if kl_in_advantage and estimator != "full":
        raise ValueError("kl_in_advantage=True is the full estimator's Alg. 1 variant; the REINFORCE estimator "
                         "already puts the KL into its weight. Use estimator='full' or kl_in_advantage=False.")


def kl_value(divergence: str, log_w: torch.Tensor, log_rho: torch.Tensor) -> torch.Tensor:
    """Per-token importance-weighted estimate of D whose gradient in ℓ is −g_KL/β (see the module docstring).

    ``log_w`` = ℓ − ℓ_old carries the gradient; ``log_rho`` = ℓ_ref − ℓ_old is a constant (zeros for the old policy
    as reference). log(π_θ/π_ref) = log_w − log_rho.
    """
    log_theta_over_ref = log_w - log_rho
    if divergence == "fkl":
        return -log_rho.exp() * log_theta_over_ref
    if divergence == "ufkl":
        return log_rho.exp() * k3_of_log(log_theta_over_ref)
    if divergence == "rkl":
        return log_w.exp() * log_theta_over_ref
    if divergence == "urkl":
        return log_w.exp() * k3_of_log(-log_theta_over_ref)
    raise ValueError(f"Unknown divergence {divergence!r}; valid values: {', '.join(DIVERGENCES)}.")


def kl_coefficient(divergence: str, w: torch.Tensor, log_rho: torch.Tensor, beta: float) -> torch.Tensor:
    """g_KL as a function of the ratio w (so it can be evaluated at a clipped ratio), with log_rho constant."""
    rho = log_rho.exp()
    if divergence == "fkl":
        return beta * rho.expand_as(w)
    if divergence == "ufkl":
        return -beta * (w - rho)
    log_theta_over_ref = w.log() - log_rho
    if divergence == "rkl":
        return -beta * w * (log_theta_over_ref + 1.0)
    if divergence == "urkl":
        return -beta * w * log_theta_over_ref
    raise ValueError(f"Unknown divergence {divergence!r}; valid values: {', '.join(DIVERGENCES)}.")


def dual_clip_loss(w: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float,
                   dual_clip_c: float) -> torch.Tensor:
    """Dual-clip PPO per-token loss: max(−wA, −w̄A), and for A < 0 at most −cA (Ye et al. 2020)."""
    loss = torch.maximum(-advantages * w, -advantages * w.clamp(1.0 - epsilon_low, 1.0 + epsilon_high))
    return torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip_c), loss)


def active_tokens(w: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float,
                  dual_clip_c: float) -> torch.Tensor:
    """Tokens whose gradient dual-clip PPO keeps: (A > 0, w < 1 + ε_h) or (A ≤ 0, 1 − ε_l ≤ w < c)."""
    positive = (advantages > 0) & (w < 1.0 + epsilon_high)
    non_positive = (advantages <= 0) & (w >= 1.0 - epsilon_low) & (w < dual_clip_c)
    return positive | non_positive


def rpg_per_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    divergence: str,
    estimator: str = "full",
    beta: float,
    ref_logps: torch.Tensor | None = None,
    clip: str = "dual",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    dual_clip_c: float = 10.0,
    kl_in_advantage: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token RPG loss, shape (B, T) like ``logps``, before masking and aggregation.

    Args:
        logps: log π_θ of the sampled tokens, (B, T), with gradient.
        old_logps: log π_old, the policy that sampled them, (B, T); treated as a constant.
        advantages: (B,) per sequence, broadcast over tokens, or (B, T) per token.
        divergence: one of ``fkl``, ``ufkl``, ``rkl``, ``urkl``.
        estimator: ``full`` (differentiable surrogate) or ``reinforce`` (stop-gradient weight × log-prob).
        beta: KL coefficient β ≥ 0.
        ref_logps: log π_ref of a fixed reference, (B, T); None makes the old policy the reference.
        clip: ``dual``, ``rpg`` (REINFORCE only) or ``none``; see the module docstring.
        epsilon_low, epsilon_high, dual_clip_c: the clip range [1 − ε_l, 1 + ε_h] and the dual-clip bound c > 1.
        kl_in_advantage: put the KL into the advantage (paper Alg. 1; full estimator only).

    Returns:
        The per-token loss and detached per-token metrics (same shape; mask and aggregate them like the loss):
        ``kl`` (the β-free divergence estimate), ``ratio`` (w) and ``clipped`` (1.0 where the clip cut the gradient).
    """
    check_rpg_options(divergence, estimator, clip, beta, epsilon_low, epsilon_high, dual_clip_c, kl_in_advantage)
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if tensor is not None and tensor.shape != logps.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but logps has {tuple(logps.shape)}.")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logps).detach()

    log_w = logps - old_logps.detach()
    w = log_w.exp()
    w_detached = w.detach()
    log_rho = torch.zeros_like(log_w) if ref_logps is None else (ref_logps - old_logps).detach()
    kl = kl_value(divergence, log_w, log_rho)

    active = active_tokens(w_detached, advantages, epsilon_low, epsilon_high, dual_clip_c)
    if clip == "none":
        clipped = torch.zeros_like(w_detached)
    elif clip == "dual":
        clipped = (~active & (advantages != 0)).to(w_detached.dtype)
    else:
        clipped = (~active).to(w_detached.dtype)

    if estimator == "full" and kl_in_advantage:
        shaped = advantages + kl_coefficient(divergence, w_detached, log_rho, beta) / w_detached
        loss = -shaped * w if clip == "none" else dual_clip_loss(w, shaped, epsilon_low, epsilon_high, dual_clip_c)
        if clip == "dual":
            clipped = (~active_tokens(w_detached, shaped, epsilon_low, epsilon_high, dual_clip_c)).to(w.dtype)
    elif estimator == "full":
        reward = -advantages * w if clip == "none" else dual_clip_loss(w, advantages, epsilon_low, epsilon_high,
                                                                        dual_clip_c)
        loss = reward + beta * kl
    else:
        reward_weight = advantages * w_detached
        if clip == "rpg":
            w_clipped = w_detached.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
            weight = (reward_weight + kl_coefficient(divergence, w_clipped, log_rho, beta)) * active
        else:
            if clip == "dual":
                reward_weight = reward_weight * active
            weight = reward_weight + kl_coefficient(divergence, w_detached, log_rho, beta)
        loss = -weight * logps

    metrics = {"kl": kl.detach(), "ratio": w_detached, "clipped": clipped}
    return loss, metrics
