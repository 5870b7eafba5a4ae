"""Configuration of the Booster trainer: TRL's SFTConfig plus the harmful-perturbation regularizer."""

import os
from dataclasses import dataclass, field

from trl import SFTConfig


@dataclass
class BoosterConfig(SFTConfig):
    r"""
    Configuration for [`BoosterTrainer`]: SFT on alignment data (harmful prompt → refusal) plus Booster's regularizer
    λ·(h(w) − h(w − α·∇h/‖∇h‖)) on harmful data (Huang et al. 2025, https://huggingface.co/papers/2409.01586). See
    `docs/booster.md` for the math.

    > Parameters of the regularizer

    booster_lambda (`float`, *optional*, defaults to `5.0`):
        λ, the weight of the regularizer (paper and code: 5).
    booster_alpha (`float`, *optional*, defaults to `0.1`):
        α, the length of the simulated normalized harmful step (paper and code: 0.1).
    harmful_batch_size (`int`, *optional*, defaults to `10`):
        Harmful examples per optimizer step and process (code: 10). The harmful direction is computed once per
        optimizer step, whatever the gradient accumulation, and normalized over the harmful batch of all processes.
    booster_epsilon (`float`, *optional*, defaults to `1e-7`):
        ε added to ‖∇h‖ (code: 1e-7).

    > Vaccine (Huang et al. 2024, https://huggingface.co/papers/2402.01109), composable with Booster

    vaccine_rho (`float`, *optional*, defaults to `0.0`):
        ρ, the norm of Vaccine's perturbation of the decoder layers' hidden states during the alignment loss's pass
        (Vaccine README: 2; Booster's scripts: 5). 0 turns Vaccine off. With booster_lambda 0 it is Vaccine alone,
        otherwise Booster + Vaccine (the paper's `perturb_aware`).
    """

    booster_lambda: float = field(default=5.0, metadata={"help": "λ, weight of the regularizer (paper: 5)."})
    booster_alpha: float = field(
        default=0.1, metadata={"help": "α, length of the normalized harmful step (paper: 0.1)."}
    )
    harmful_batch_size: int = field(
        default=10, metadata={"help": "Harmful examples per optimizer step and process (paper code: 10)."}
    )
    booster_epsilon: float = field(default=1e-7, metadata={"help": "ε added to the harmful gradient's norm."})
    vaccine_rho: float = field(
        default=0.0,
        metadata={"help": "ρ of Vaccine's hidden-state perturbation of the alignment pass (Vaccine: 2; 0 = off). "
                          "Composes with Booster."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.booster_lambda < 0 or self.booster_alpha < 0 or self.vaccine_rho < 0:
            raise ValueError(f"booster_lambda, booster_alpha and vaccine_rho must be >= 0, got {self.booster_lambda}, "
                             f"{self.booster_alpha} and {self.vaccine_rho}.")
        if self.harmful_batch_size < 1:
            raise ValueError(f"harmful_batch_size must be >= 1, got {self.harmful_batch_size}.")
        if self.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError(
                "BoosterTrainer does not support FSDP: it moves the trainable parameters to w̃ and back between "
                "passes, and FSDP2 keeps them as sharded DTensors that its forward unshards into other tensors, so "
                "that move would need FSDP's internal unshard/reshard. Use DeepSpeed ZeRO-3 "
                "(accelerate_configs/deepspeed_zero3.yaml), ZeRO-2 or DDP instead."
            )
