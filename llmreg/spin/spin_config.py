"""Configuration of the SPIN trainer: TRL's DPOConfig plus α-SPIN's base-model mixture and fictitious play."""

from dataclasses import dataclass, field

from trl import DPOConfig

from llmreg.losses.options import check_option
from llmreg.losses.selfplay import OPPONENT_MIXTURES, SPIN_LOSSES
from llmreg.trainer_utils import changed_dpo_loss_options


@dataclass
class SPINConfig(DPOConfig):
    r"""
    Configuration for [`SPINTrainer`]: SPIN (Chen et al. 2024, https://huggingface.co/papers/2401.01335) with the KL
    to the base model and fictitious play of Alami et al. 2024 (https://huggingface.co/papers/2404.04291). Everything
    of [`trl.DPOConfig`] applies; `loss_type` is `"sigmoid"` (SPIN's logistic loss) or `"hinge"`, and `beta` is
    SPIN's β (paper: 0.1 for iterations 0–2, 5.0 for iteration 3). See `docs/spin.md` for the math.

    > Parameters of the opponent

    alpha (`float`, *optional*, defaults to `0.0`):
        Weight of the base model in the geometric-mixture opponent π_t^{1−α} μ^α (α-SPIN). 0 is SPIN; 1 is DPO against
        the base with self-generated negatives.
    base_model_name_or_path (`str`, *optional*):
        μ, the fixed base (SFT) model. `None`: the model being trained is the base (first iteration), so μ = π_t.
    precompute_base_log_probs (`bool`, *optional*, defaults to `True`):
        Score every response with μ once before training and free it; `False` keeps μ in memory.
    opponent_mixture (`str`, *optional*, defaults to `"data"`):
        How fictitious play mixes the last h iterates: `"data"` (the negatives come from the last h generators and
        are scored against π_t, as the official code does for h = 2: the iteration loop builds such datasets),
        `"arith"` (the opponent is the arithmetic mixture of the h iterates' sequence probabilities) or `"geom"`
        (their geometric mean).
    history_models (`list[str]`, *optional*):
        For `"arith"`/`"geom"`: the previous iterates π_{t−1}, π_{t−2}, … (most recent first); the opponent mixes π_t
        (the model being trained) with them, so h = 1 + len(history_models).

    > [!NOTE]
    > Defaults that differ from [`trl.DPOConfig`]: `precompute_ref_log_probs=True`: π_t is the policy's own initial
    > weights, scored once before training, so no reference model stays in memory.
    """

    alpha: float = field(
        default=0.0, metadata={"help": "Weight of the base model in the opponent (α-SPIN); 0 = SPIN."}
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The fixed base model μ; None: the model being trained (first iteration)."}
    )
    precompute_base_log_probs: bool = field(
        default=True, metadata={"help": "Score all responses with μ before training (True) or keep μ in memory."}
    )
    opponent_mixture: str = field(
        default="data",
        metadata={"help": "Fictitious play over the last h iterates: data, arith or geom.",
                  "choices": list(OPPONENT_MIXTURES)},
    )
    history_models: list[str] = field(
        default_factory=list,
        metadata={"help": "Previous iterates (most recent first) mixed into the opponent by 'arith'/'geom'."},
    )
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Score all responses with π_t (the initial policy) before training."}
    )

    def __post_init__(self):
        super().__post_init__()
        if len(self.loss_type) != 1:
            raise ValueError(f"SPIN uses one loss, 'sigmoid' or 'hinge'; got loss_type={self.loss_type}.")
        check_option("SPIN loss_type", self.loss_type[0], SPIN_LOSSES)
        check_option("opponent_mixture", self.opponent_mixture, OPPONENT_MIXTURES)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha is the base model's weight in the opponent mixture and lies in [0, 1]; got "
                             f"{self.alpha}.")
        if self.history_models and self.opponent_mixture == "data":
            raise ValueError("history_models are mixed into the opponent by opponent_mixture='arith' or 'geom'. With "
                             "'data', fictitious play happens in the dataset (negatives from the last h generators): "
                             "drop history_models or choose 'arith'/'geom'.")
        unused = changed_dpo_loss_options(self)
        if unused:
            names = ", ".join(unused)
            raise ValueError(f"SPINTrainer computes its own loss, so these DPO options would do nothing: {names}. "
                             "Leave them at their defaults.")
