"""Configuration of the Booster trainer: TRL's SFTConfig plus the harmful-perturbation regularizer."""

from dataclasses import dataclass, field

from trl import SFTConfig

from llmreg.trainer_utils import init_deepspeed_distributed_on_cpu


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
    """

    booster_lambda: float = field(default=5.0, metadata={"help": "λ, weight of the regularizer (paper: 5)."})
    booster_alpha: float = field(
        default=0.1, metadata={"help": "α, length of the normalized harmful step (paper: 0.1)."}
    )
    harmful_batch_size: int = field(
        default=10, metadata={"help": "Harmful examples per optimizer step and process (paper code: 10)."}
    )
    booster_epsilon: float = field(default=1e-7, metadata={"help": "ε added to the harmful gradient's norm."})

    def __post_init__(self):
        # Under DeepSpeed on CPUs, deepspeed.comm must be up before TRL builds any model under zero.Init.
        init_deepspeed_distributed_on_cpu()
        super().__post_init__()
        if self.booster_lambda < 0 or self.booster_alpha < 0:
            raise ValueError(f"booster_lambda and booster_alpha must be >= 0, got {self.booster_lambda} and "
                             f"{self.booster_alpha}.")
        if self.harmful_batch_size < 1:
            raise ValueError(f"harmful_batch_size must be >= 1, got {self.harmful_batch_size}.")
        if self.deepspeed or self.fsdp:
            raise ValueError(
                "BoosterTrainer does not support DeepSpeed or FSDP yet: it perturbs the trainable parameters in place "
                "and adds its gradient to .grad, which DeepSpeed manages in its own buffers and ZeRO-3/FSDP shard. "
                "Use one process or DDP (accelerate_configs/multi_process.yaml); with LoRA, DDP fits large models."
            )
