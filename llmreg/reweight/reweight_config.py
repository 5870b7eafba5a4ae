"""Configuration of the reweighting trainer: TRL's SFTConfig plus loss-based sample weights."""

from dataclasses import dataclass, field

from trl import SFTConfig

from llmreg.losses.reweighting import STRATEGIES


SCOPES = ("micro_batch", "step")


@dataclass
class ReweightConfig(SFTConfig):
    r"""
    Configuration for [`ReweightTrainer`]: SFT or pretraining where each sample's loss is weighted by a function of
    that loss over the global batch (Sow et al. 2025, https://arxiv.org/abs/2502.06733). See `docs/reweight.md`.

    > Parameters of the weights

    reweight_strategy (`str`, *optional*, defaults to `"linupper"`):
        One of `uniform` (the stock loss), `linupper` (low losses down-weighted, high ones capped: the paper's main
        method), `quadratic` (medium losses favoured) and `extremes` (both ends favoured).
    reweight_r (`float`, *optional*, defaults to `1.0`):
        r, the softmax temperature (code default 1.0; the shipped configs also use 0.4). Larger is closer to uniform.
    reweight_delta (`float`, *optional*, defaults to `1.0`):
        δ, the half-width of the range the losses are normalized to (paper: 1).
    reweight_warmup_steps (`int`, *optional*, defaults to `0`):
        Optimizer steps of uniform weights first (the code's `burnout_steps`: 1000 of 20,000).
    reweight_r_start (`float` or `None`, *optional*, defaults to `None`):
        With a value, r starts there after the warmup and moves linearly to `reweight_r` over
        `reweight_r_decay_steps` (the README's suggestion: a large r first, then lower). `None`: r is constant.
    reweight_r_decay_steps (`int`, *optional*, defaults to `0`):
        Steps of that linear schedule.
    reweight_scope (`str`, *optional*, defaults to `"micro_batch"`):
        Which samples one softmax weighs against each other. `micro_batch`: each gradient-accumulation micro-batch
        (its rows on every process), as the reference code does, from the training forward pass alone. `step`: all
        the samples of the optimizer step (the paper's minibatch), whatever the accumulation: one extra forward
        pass without gradients over the step's micro-batches gives their losses first. The two are the same with
        `gradient_accumulation_steps=1`, where `step` adds no pass.
    """

    reweight_strategy: str = field(
        default="linupper", metadata={"help": f"Weighting strategy: one of {', '.join(STRATEGIES)}."}
    )
    reweight_r: float = field(default=1.0, metadata={"help": "r, softmax temperature (code: 1.0; configs: 0.4)."})
    reweight_delta: float = field(default=1.0, metadata={"help": "δ, half-width of the normalized loss range (1)."})
    reweight_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of uniform weights first."})
    reweight_r_start: float | None = field(
        default=None, metadata={"help": "r after the warmup, moving linearly to reweight_r; None = constant r."}
    )
    reweight_r_decay_steps: int = field(default=0, metadata={"help": "Steps of the linear r schedule."})
    reweight_scope: str = field(
        default="micro_batch",
        metadata={"help": "Samples weighed together: micro_batch (the reference code) or step (the paper's minibatch, "
                          "over all accumulated micro-batches; one extra no-grad forward when accumulating)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.reweight_strategy not in STRATEGIES:
            raise ValueError(f"Unknown reweight_strategy {self.reweight_strategy!r}; valid strategies: "
                             f"{', '.join(STRATEGIES)}.")
        if self.reweight_scope not in SCOPES:
            raise ValueError(f"Unknown reweight_scope {self.reweight_scope!r}; valid scopes: {', '.join(SCOPES)}.")
        if self.reweight_r <= 0 or self.reweight_delta <= 0:
            raise ValueError(f"reweight_r and reweight_delta must be > 0, got {self.reweight_r} and "
                             f"{self.reweight_delta}.")
        if self.reweight_warmup_steps < 0 or self.reweight_r_decay_steps < 0:
            raise ValueError("reweight_warmup_steps and reweight_r_decay_steps must be >= 0.")
        if self.reweight_r_start is not None and (self.reweight_r_start <= 0 or self.reweight_r_decay_steps == 0):
            raise ValueError("reweight_r_start needs a value > 0 and reweight_r_decay_steps > 0 (the steps over "
                             "which r moves from it to reweight_r).")
        if self.reweight_r_start is None and self.reweight_r_decay_steps:
            raise ValueError("reweight_r_decay_steps is set without reweight_r_start, so it would do nothing: set "
                             "both, or neither.")

    def r_at(self, step: int) -> float:
        """r at optimizer step ``step`` (after the warmup; during it the weights are uniform)."""
        if self.reweight_r_start is None:
            return self.reweight_r
        progress = min(1.0, max(0, step - self.reweight_warmup_steps) / self.reweight_r_decay_steps)
        return self.reweight_r_start + progress * (self.reweight_r - self.reweight_r_start)
