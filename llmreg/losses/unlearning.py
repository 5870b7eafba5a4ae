"""Losses of LLM unlearning, on tensors (the objectives CLEAR compares, Dontsov et al. 2025, arXiv 2410.18057 §2 and
its code; NPO and DPO in their standard forms, which the reference code does not implement).

Notation: F is the forget batch, R the retain batch; π the model being unlearned, π0 the frozen original (the
"teacher": in llmreg, the same model with the unlearning adapter disabled). CE is the token-mean cross-entropy of the
answers (``nll``); sequence log-probs are sums over each answer's tokens (``llmreg.losses.selfplay.sequence_logps``).

    GA     −CE_F                                              (gradient ascent)
    GD     −β·CE_F + CE_R                                     (gradient difference)
    KL     −CE_F + KL_R(π0‖π)                                 (token-wise over the vocabulary)
    IDK    CE_R + CE(forget question → "I don't know" answer)
    NPO    (2/β)·mean_F log(1 + (π(y|x)/π0(y|x))^β)           (Zhang et al. 2024, sequence likelihoods)
    DPO    −log σ(β·[(log π(y_idk) − log π(y_f)) − (log π0(y_idk) − log π0(y_f))]), preferred = the IDK answer
    SCRUB  −β·KL_F(π‖π0) + KL_R(π‖π0) + CE_R                 (one combined step; reverse KL, as SCRUB)
    RMU    β·MSE(mean_t h_F, u) + MSE(h_R, h_R^{π0})           (hidden states of one layer; u a fixed random vector)

and the ℓ1 penalty of CLEAR §3 on the trainable parameters (the entries of an unlearning LoRA's A and B):

    L_total = L_unlearn + λ1·Σ_θ |θ|,    ∂/∂θ = λ1·sign(θ)   (sign(0) = 0)

The penalty is on the entries, not on ΔW = B·A, and is not normalized per module.
"""

import torch
import torch.nn.functional as F

from llmreg.losses.aggregation import aggregate


def nll(token_logps: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | float | None = None) -> torch.Tensor:
    """CE: the token mean of −log π over the answer tokens (``mask``), normalized by ``num_items`` when given."""
    return aggregate(-token_logps, mask, "token-mean", num_items)


def ga_loss(forget_nll: torch.Tensor) -> torch.Tensor:
    return -forget_nll


def gd_loss(forget_nll: torch.Tensor, retain_nll: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    return -beta * forget_nll + retain_nll


def kl_loss(forget_nll: torch.Tensor, retain_kl_teacher_to_model: torch.Tensor) -> torch.Tensor:
    """−CE_F + KL_R(π0‖π): pass ``vocab_kl(teacher_logits, model_logits, retain_mask)``."""
    return -forget_nll + retain_kl_teacher_to_model


def idk_loss(idk_nll: torch.Tensor, retain_nll: torch.Tensor) -> torch.Tensor:
    return idk_nll + retain_nll


def _sequence_mean(values: torch.Tensor, num_sequences: torch.Tensor | float | None) -> torch.Tensor:
    """The mean of per-sequence ``values``, or their sum / ``num_sequences`` (a global count) when given."""
    if num_sequences is None:
        return values.mean()
    return values.sum() / torch.clamp_min(torch.as_tensor(num_sequences, dtype=values.dtype), 1.0)


def npo_loss(forget_logps: torch.Tensor, teacher_forget_logps: torch.Tensor, beta: float = 0.1,
             num_sequences: torch.Tensor | float | None = None) -> torch.Tensor:
    """(2/β)·mean log(1 + (π/π0)^β) over the forget sequences = (2/β)·mean softplus(β·(log π − log π0)). Its
    gradient is GA's, −∇log π, weighted by 2σ(β·(log π − log π0)): it fades as π falls below π0."""
    return (2.0 / beta) * _sequence_mean(F.softplus(beta * (forget_logps - teacher_forget_logps)), num_sequences)


def dpo_unlearning_loss(idk_logps: torch.Tensor, forget_logps: torch.Tensor, teacher_idk_logps: torch.Tensor,
                        teacher_forget_logps: torch.Tensor, beta: float = 0.1,
                        num_sequences: torch.Tensor | float | None = None) -> torch.Tensor:
    """The real DPO loss with the IDK answer preferred over the true forget answer (sequence log-probs)."""
    margin = (idk_logps - forget_logps) - (teacher_idk_logps - teacher_forget_logps)
    return _sequence_mean(-F.logsigmoid(beta * margin), num_sequences)


def scrub_loss(forget_kl_model_to_teacher: torch.Tensor, retain_kl_model_to_teacher: torch.Tensor,
               retain_nll: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """−β·KL_F(π‖π0) + KL_R(π‖π0) + CE_R: pass ``vocab_kl(model_logits, teacher_logits, mask)`` for both KLs."""
    return -beta * forget_kl_model_to_teacher + retain_kl_model_to_teacher + retain_nll


def rmu_loss(forget_hidden: torch.Tensor, forget_mask: torch.Tensor, control: torch.Tensor,
             retain_hidden: torch.Tensor, teacher_retain_hidden: torch.Tensor, retain_mask: torch.Tensor,
             beta: float = 1.0, num_forget_sequences: torch.Tensor | float | None = None,
             num_retain_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """β·MSE(mean_t h_F, u) + MSE(h_R, h_R^{π0}), as CLEAR's code: the forget term averages each sequence's hidden
    states over its tokens first, then the squared error to the control vector u (mean over sequences and
    dimensions); the retain term is the token mean over ``retain_mask`` of the mean squared difference. The two
    normalizers, when given, replace the local sequence and token counts (global means, as ``aggregate``'s)."""
    weights = forget_mask.unsqueeze(-1).to(forget_hidden.dtype)
    mean_forget = (forget_hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    per_sequence = (mean_forget - control).square().mean(-1)
    num_forget = len(per_sequence) if num_forget_sequences is None else num_forget_sequences
    forget_term = per_sequence.sum() / torch.clamp_min(torch.as_tensor(num_forget, dtype=per_sequence.dtype), 1.0)
    retain_term = aggregate((retain_hidden - teacher_retain_hidden).square().mean(-1), retain_mask, "token-mean",
                            num_retain_tokens)
    return beta * forget_term + retain_term


def l1_penalty(tensors: list[torch.Tensor], lam: float) -> torch.Tensor:
    """λ·Σ|θ| over every entry of ``tensors`` (float32 or wider); differentiable, with gradient λ·sign(θ)."""
    if not tensors:
        raise ValueError("l1_penalty needs at least one tensor: are any parameters trainable?")
    if len({t.dtype for t in tensors}) == 1:  # one concatenation: a few kernels instead of two per tensor
        return lam * torch.cat([t.reshape(-1) for t in tensors]).abs().sum(dtype=torch.float32)
    return lam * sum(t.abs().sum(dtype=torch.float32) for t in tensors)
