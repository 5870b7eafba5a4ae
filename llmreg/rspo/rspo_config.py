"""Configuration of the RSPO trainer: TRL's DPOConfig plus SPPO's win-probability targets and RSPO's regularizers."""

import json
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig

from llmreg.losses.options import check_option
from llmreg.losses.selfplay import REGULARIZERS, SPPO_VARIANTS
from llmreg.trainer_utils import changed_dpo_loss_options


def parse_regularizers(value: dict[str, float] | str | None) -> dict[str, float]:
    """``{"reverse_kl": 0.5}``, its JSON text, or ``"forward_kl_is=0.01,reverse_kl=0.5"`` → a checked dict."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            value = {}
            for item in text.split(","):
                kind, _, weight = item.partition("=")
                if not weight:
                    raise ValueError(f"regularizers={text!r}: write kind=weight pairs separated by commas, e.g. "
                                     "'forward_kl_is=0.01,reverse_kl=0.5'.")
                value[kind.strip()] = float(weight)
    for kind, weight in value.items():
        check_option("RSPO regularizer", kind, REGULARIZERS)
        if float(weight) < 0:
            raise ValueError(f"The weight of regularizer {kind!r} must be >= 0, got {weight}.")
    return {kind: float(weight) for kind, weight in value.items()}


@dataclass
class RSPOConfig(DPOConfig):
    r"""
    Configuration for [`RSPOTrainer`]: SPPO (Wu et al. 2024, https://huggingface.co/papers/2405.00675) with RSPO's
    reference regularizers (Tang et al. 2025, https://huggingface.co/papers/2503.00030). Everything of
    [`trl.DPOConfig`] applies except the DPO loss options. See `docs/rspo.md` for the math.

    > Parameters of the SPPO term

    beta (`float`, *optional*, defaults to `1e-3`):
        1/η, the inverse SPPO step size: targets are η(p − ½) (papers and SPPO code: β = 0.001, η = 1000).
    sppo_variant (`str`, *optional*, defaults to `"soft"`):
        `"soft"`: win probabilities of both responses against π_t (columns `chosen_probs_win`, `chosen_probs_lose`);
        `"single"`: P(y_w ≻ y_l) only (column `chosen_probs`); `"hard"`: TRL's `sppo_hard` (no column).

    > Parameters of the reference regularizer

    regularizers (`dict[str, float]` or `str`, *optional*):
        Regularizer kinds and their weights λ, e.g. `{"reverse_kl": 0.5}` or `"forward_kl_is=0.01,reverse_kl=0.5"`
        (RSPO's "IS-For.+Rev."). Kinds: `reverse_kl`, `reverse_kl_noent`, `forward_kl_is`, `forward_kl_samples`,
        `chi2`, `chi2_smooth`, `entropy`. Empty: plain SPPO. Each term is a batch mean over the chosen responses plus
        one over the rejected ones (the official code's reduction). `forward_kl_samples` needs a `base_completion`
        column: a response sampled from the base model for each prompt.
    is_clip (`float`, *optional*, defaults to `10.0`):
        R, the clip of the sequence-level log-ratio inside `forward_kl_is`, `chi2` and `chi2_smooth` (code: 10).
    base_model_name_or_path (`str`, *optional*):
        μ, the fixed base model of the regularizers. `None`: the model being trained is the base (first iteration),
        so μ = π_t.
    precompute_base_log_probs (`bool`, *optional*, defaults to `True`):
        Score every response with μ once before training and free it; `False` keeps μ in memory and scores each batch.

    > [!NOTE]
    > Defaults that differ from [`trl.DPOConfig`]: `beta=1e-3` (η = 1000) and `precompute_ref_log_probs=True`:
    > π_t is the policy's own initial weights, scored once before training, so no reference model stays in memory.
    > The paper's other settings (RMSprop, lr 5e-7, warmup ratio 0.1, global batch 64) are in
    > `recipes/configs/rspo.yaml`.
    """

    beta: float = field(default=1e-3, metadata={"help": "1/η, inverse SPPO step size (papers: 1e-3, η = 1000)."})
    sppo_variant: str = field(
        default="soft", metadata={"help": "SPPO targets: soft, single or hard.", "choices": list(SPPO_VARIANTS)}
    )
    regularizers: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Regularizer kinds and weights, e.g. 'forward_kl_is=0.01,reverse_kl=0.5' or a JSON dict. "
                          f"Kinds: {', '.join(REGULARIZERS)}. Empty: plain SPPO."},
    )
    is_clip: float = field(default=10.0, metadata={"help": "Clip R of the sequence log-ratio in IS-forward/χ² (10)."})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The fixed base model μ; None: the model being trained (first iteration)."}
    )
    precompute_base_log_probs: bool = field(
        default=True, metadata={"help": "Score all responses with μ before training (True) or keep μ in memory."}
    )
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Score all responses with π_t (the initial policy) before training."}
    )

    def __post_init__(self):
        check_option("sppo_variant", self.sppo_variant, SPPO_VARIANTS)
        self.regularizers = parse_regularizers(self.regularizers)
        if self.beta <= 0:
            raise ValueError(f"beta = 1/η must be > 0, got {self.beta}.")
        if self.is_clip <= 0:
            raise ValueError(f"is_clip must be > 0, got {self.is_clip}.")
        super().__post_init__()
        unused = (["loss_type"] if self.loss_type != ["sigmoid"] else []) + changed_dpo_loss_options(self)
        if unused:
            names = ", ".join(unused)
            raise ValueError(f"RSPOTrainer replaces the DPO loss, so these DPO options would do nothing: {names}. "
                             "Leave them at their defaults; the SPPO term is chosen with sppo_variant.")
