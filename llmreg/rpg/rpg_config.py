"""Configuration of the RPG trainer: TRL's GRPOConfig plus the choice of KL-regularized surrogate."""

from dataclasses import dataclass, field

from trl import GRPOConfig

from llmreg.losses.rpg import CLIPS, DIVERGENCES, ESTIMATORS, check_option, check_rpg_options


REFERENCES = ("old", "fixed")


@dataclass
class RPGConfig(GRPOConfig):
    r"""
    Configuration for [`RPGTrainer`]: everything of [`trl.GRPOConfig`] (generation, rewards, batching) plus the RPG
    surrogate (Zhang et al., 2025, https://huggingface.co/papers/2505.17508). See `docs/rpg.md` for the math.

    > Parameters of the RPG objective

    divergence (`str`, *optional*, defaults to `"ufkl"`):
        The KL regularizer: `"fkl"` KL(π_ref‖π_θ), `"ufkl"` its unnormalized form, `"rkl"` KL(π_θ‖π_ref), `"urkl"`.
    estimator (`str`, *optional*, defaults to `"full"`):
        `"full"`: the fully differentiable surrogate (paper Table 1); `"reinforce"`: the stop-gradient
        weight × log-prob form (paper Table 2). Both have the objective's expected gradient.
    reference (`str`, *optional*, defaults to `"old"`):
        `"old"`: the sampling policy is the reference, refreshed at every generation (the paper's iterative reference;
        no reference model is loaded and no extra forward pass runs). `"fixed"`: a frozen reference model, loaded by
        TRL (or the base model with the adapter disabled under PEFT).
    rpg_beta (`float`, *optional*, defaults to `1e-4`):
        The KL coefficient β (paper: 1e-4). TRL's own `beta` (its k3 penalty) stays unused: it is set from `rpg_beta`
        when `reference="fixed"`, so that TRL loads the reference model, and is 0 otherwise.
    clip (`str` or `None`, *optional*, defaults to `None`):
        `"dual"`: dual-clip PPO on the reward part; `"rpg"`: the paper's RPG-style clip of the whole REINFORCE weight;
        `"none"`. `None` picks `"dual"` for the full estimator and `"rpg"` for the REINFORCE one.
    dual_clip_c (`float`, *optional*, defaults to `10.0`):
        The dual-clip bound c on the ratio for negative advantages (paper scripts: 10).
    kl_in_advantage (`bool`, *optional*, defaults to `False`):
        Put the KL into the advantage, then dual-clip (paper Alg. 1; full estimator only).

    > [!NOTE]
    > Defaults that differ from [`trl.GRPOConfig`], from the paper: `epsilon_high=0.28` (clip range (0.2, 0.28)),
    > `scale_rewards="none"` (advantage = reward − group mean). With `reference="old"`, when neither
    > `steps_per_generation` nor `generation_batch_size` is set, `steps_per_generation` is 4 × the gradient
    > accumulation steps: several optimizer steps per generation, so the old policy differs from the current one
    > (the paper takes 16).
    """

    divergence: str = field(default="ufkl", metadata={"help": "KL regularizer.", "choices": list(DIVERGENCES)})
    estimator: str = field(default="full", metadata={"help": "Surrogate form.", "choices": list(ESTIMATORS)})
    reference: str = field(
        default="old",
        metadata={"help": "KL anchor: the sampling policy or a fixed model.", "choices": list(REFERENCES)},
    )
    rpg_beta: float = field(default=1e-4, metadata={"help": "KL coefficient β of the RPG objective (paper: 1e-4)."})
    clip: str | None = field(
        default=None,
        metadata={"help": "dual, rpg (REINFORCE only) or none; default: dual for full, rpg for reinforce.",
                  "choices": [*CLIPS, None]},
    )
    dual_clip_c: float = field(default=10.0, metadata={"help": "Dual-clip bound c for negative advantages."})
    kl_in_advantage: bool = field(
        default=False, metadata={"help": "Put the KL into the advantage (paper Alg. 1; full estimator only)."}
    )
    epsilon_high: float | None = field(
        default=0.28, metadata={"help": "Upper clip range: ratios above 1 + epsilon_high are clipped (paper: 0.28)."}
    )
    max_zero_spread_generations: int = field(
        default=10,
        metadata={"help": "Stop with an error after this many consecutive generation batches in which no group's "
                          "rewards differ (every advantage is 0, so the reward teaches nothing). Each such batch is "
                          "warned about. 0: warn only, never stop."},
    )
    scale_rewards: str = field(
        default="none",
        metadata={"help": "Reward scaling of GRPO: 'group', 'batch' or 'none' (RPG: 'none', group mean only)."},
    )

    def __post_init__(self):
        check_option("reference", self.reference, REFERENCES)
        if self.rpg_beta < 0:
            raise ValueError(f"rpg_beta must be >= 0, got {self.rpg_beta}.")
        if self.max_zero_spread_generations < 0:
            raise ValueError(f"max_zero_spread_generations must be >= 0 (0: never stop), got "
                             f"{self.max_zero_spread_generations}.")
        if self.clip is None:
            self.clip = "dual" if self.estimator == "full" else "rpg"
        # The loss's own checks, run here so that a bad combination fails before any model is loaded.
        epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        check_rpg_options(self.divergence, self.estimator, self.clip, self.rpg_beta, self.epsilon, epsilon_high,
                          self.dual_clip_c, self.kl_in_advantage)
        if self.beta != 0.0:
            raise ValueError(f"beta={self.beta} is TRL's k3 KL penalty, which RPGTrainer replaces. Set the KL "
                             "coefficient with rpg_beta and the reference with reference='old' or 'fixed'.")
        if self.loss_type != "dapo":
            raise ValueError(f"RPGTrainer aggregates with a global token mean (loss_type='dapo'); got "
                             f"loss_type={self.loss_type!r}.")
        if self.use_vllm:
            raise ValueError("RPGTrainer does not support use_vllm yet (the vLLM importance-sampling correction would "
                             "have to weight only the reward part). Generate with transformers (use_vllm=False).")
        unsupported = {"importance_sampling_level": self.importance_sampling_level != "token",
                       "top_entropy_quantile": self.top_entropy_quantile < 1.0,
                       "entropy_coef": self.entropy_coef != 0.0,
                       "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
                       "delta": self.delta is not None}
        if any(unsupported.values()):
            names = ", ".join(name for name, used in unsupported.items() if used)
            raise ValueError(f"RPGTrainer does not support these GRPO options yet: {names}. Leave them at their "
                             "defaults.")
        if self.reference == "old" and self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = 4 * self.gradient_accumulation_steps
        if self.reference == "fixed" and self.rpg_beta == 0.0:
            raise ValueError("reference='fixed' with rpg_beta=0 would load a reference model for nothing. Set "
                             "rpg_beta > 0, or reference='old'.")
        if self.reference == "fixed":
            self.beta = self.rpg_beta  # makes TRL load the reference model and compute its log-probs
        super().__post_init__()
        # TRL keeps a generation's batches in memory, not in checkpoints: a resume starts a new generation, so only
        # checkpoints at generation boundaries resume exactly.
        steps_per_rollout = self.steps_per_generation * self.num_iterations // self.gradient_accumulation_steps
        if self.save_strategy == "steps" and steps_per_rollout > 1 and self.save_steps % steps_per_rollout != 0:
            raise ValueError(
                f"save_steps={self.save_steps} saves in the middle of a generation ({steps_per_rollout} optimizer "
                "steps each), and a resume from there would not continue the same samples. Set save_steps to a "
                f"multiple of {steps_per_rollout}."
            )
        if self.reference == "old" and self.gradient_accumulation_steps % (
            self.steps_per_generation * self.num_iterations
        ) == 0:
            raise ValueError(
                f"With reference='old', steps_per_generation={self.steps_per_generation} and num_iterations="
                f"{self.num_iterations} make every optimizer step use fresh samples, so the old policy equals the "
                "current one, every ratio is 1 and the KL term does nothing. Take several optimizer steps per "
                "generation: steps_per_generation > gradient_accumulation_steps (e.g. 4x), or num_iterations >= 2."
            )
