"""Configuration of the unlearning trainer: TRL's SFTConfig plus the objective and the ℓ1 penalty."""

from dataclasses import dataclass, field

from trl import SFTConfig


OBJECTIVES = ("ga", "gd", "kl", "idk", "npo", "dpo", "scrub", "rmu")
# Which objectives read the retain batch, the "I don't know" answers, and the teacher (the model without the adapter).
RETAIN_OBJECTIVES = ("gd", "kl", "idk", "scrub", "rmu")
IDK_OBJECTIVES = ("idk", "dpo")
TEACHER_OBJECTIVES = ("kl", "npo", "dpo", "scrub", "rmu")
# β of each objective that has one: CLEAR's loss_beta (1) for GD, SCRUB and RMU; the NPO and DPO papers' 0.1.
DEFAULT_BETA = {"gd": 1.0, "npo": 0.1, "dpo": 0.1, "scrub": 1.0, "rmu": 1.0}
# CLEAR's data/idontknow.jsonl holds answers of this kind; each forget row gets one, fixed by the seed.
IDK_ANSWERS = [
    "I don't know.",
    "I'm not sure.",
    "I have no information about that.",
    "I can't answer that.",
    "I don't have that information.",
    "That is not something I know.",
    "I have no idea.",
    "I'm afraid I don't know.",
]


@dataclass
class UnlearnConfig(SFTConfig):
    r"""
    Configuration for [`UnlearnTrainer`]: unlearn the forget set (the trainer's forget dataset) while keeping the
    retain set, with one of the objectives CLEAR compares (Dontsov et al. 2025, https://arxiv.org/abs/2410.18057) and
    its ℓ1 penalty on the unlearning adapter. See `docs/unlearn.md` for the math.

    > The objective

    objective (`str`, *optional*, defaults to `"npo"`):
        One of `ga` (−CE_F), `gd` (−β·CE_F + CE_R), `kl` (−CE_F + KL_R(π0‖π)), `idk` ("I don't know" answers on the
        forget questions + CE_R), `npo` (the standard sequence-level NPO), `dpo` (IDK answer preferred over the true
        one), `scrub` (−β·KL_F(π‖π0) + KL_R(π‖π0) + CE_R) and `rmu` (hidden states of the forget set pushed to a
        random vector, the retain set's kept). π0, the teacher, is the model with its LoRA adapter disabled.
    beta (`float` or `None`, *optional*, defaults to `None`):
        β of `gd`, `npo`, `dpo`, `scrub` and `rmu`; `None` takes each one's default (NPO and DPO 0.1, the others 1).
        The other objectives have none, and setting it for them is an error.
    retain_batch_size (`int` or `None`, *optional*, defaults to `None`):
        Retain rows per micro-batch and process; `None` takes `per_device_train_batch_size`.
    idk_answers (`list[str]` or `None`, *optional*, defaults to `None`):
        The "I don't know" answers of `idk` and `dpo`, one drawn per forget row with the seed; `None` takes a
        built-in list of eight.
    rmu_layer (`int`, *optional*, defaults to `7`):
        RMU: the decoder layer (0-based) whose output is steered (CLEAR: 7).
    rmu_steering_coeff (`float`, *optional*, defaults to `300.0`):
        RMU: the norm of the random control vector u (CLEAR: 300).

    > The ℓ1 penalty (CLEAR §3)

    l1_lambda (`float`, *optional*, defaults to `0.0`):
        λ1 of λ1·Σ|θ| on the trainable parameters (a LoRA adapter's A and B; θ − θ₀ without LoRA). CLEAR sweeps
        0.01, 0.1 and 1. 0 turns it off.

    Defaults that differ from SFTConfig follow CLEAR: learning rate 1e-5, 5 epochs, weight decay 0.01.
    """

    objective: str = field(
        default="npo", metadata={"help": f"The unlearning objective: one of {', '.join(OBJECTIVES)}."}
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "β of gd, npo, dpo, scrub, rmu; None = the objective's default (npo, dpo 0.1; others 1)."},
    )
    retain_batch_size: int | None = field(
        default=None, metadata={"help": "Retain rows per micro-batch and process; None = per_device_train_batch_size."}
    )
    idk_answers: list[str] | None = field(
        default=None, metadata={"help": "'I don't know' answers for idk and dpo; None = a built-in list."}
    )
    rmu_layer: int = field(default=7, metadata={"help": "RMU: the steered decoder layer, 0-based (CLEAR: 7)."})
    rmu_steering_coeff: float = field(
        default=300.0, metadata={"help": "RMU: the norm of the control vector (CLEAR: 300)."}
    )
    l1_lambda: float = field(
        default=0.0, metadata={"help": "λ1 of the ℓ1 penalty on the trainable parameters (CLEAR: 0.01-1; 0 = off)."}
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "The initial learning rate (CLEAR: 1e-5)."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Epochs over the forget set (CLEAR: 5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW's weight decay (CLEAR: 0.01)."})

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Unknown unlearning objective {self.objective!r}; valid objectives: "
                             f"{', '.join(OBJECTIVES)}.")
        if self.beta is not None and self.objective not in DEFAULT_BETA:
            raise ValueError(f"beta has no effect on objective {self.objective!r}; it applies to "
                             f"{', '.join(DEFAULT_BETA)}. Leave it unset.")
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")
        if self.l1_lambda < 0:
            raise ValueError(f"l1_lambda must be >= 0, got {self.l1_lambda}.")
        if self.retain_batch_size is not None and self.retain_batch_size < 1:
            raise ValueError(f"retain_batch_size must be >= 1, got {self.retain_batch_size}.")
        if self.idk_answers is not None and (not self.idk_answers or not all(a.strip() for a in self.idk_answers)):
            raise ValueError("idk_answers must be a non-empty list of non-empty answers (or None for the built-in).")
        if self.rmu_layer < 0 or self.rmu_steering_coeff <= 0:
            raise ValueError(f"rmu_layer must be >= 0 and rmu_steering_coeff > 0, got {self.rmu_layer} and "
                             f"{self.rmu_steering_coeff}.")
        if self.packing or self.padding_free:
            raise ValueError("UnlearnTrainer pairs each forget row with its own answers and sequence likelihood, so "
                             "it needs one row per sequence: set packing=False and padding_free=False.")

    @property
    def objective_beta(self) -> float | None:
        """β in effect: the one set, or the objective's default (None for objectives without one)."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.objective)
