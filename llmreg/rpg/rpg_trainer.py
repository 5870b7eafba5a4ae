"""RPGTrainer: TRL's GRPOTrainer with the loss replaced by RPG's KL-regularized surrogates.

Generation, rewards, advantages, batching and the reference model stay TRL's; only ``_compute_loss`` differs: it
computes the per-token log-probs (TRL's fused forward), hands them to ``llmreg.losses.rpg.rpg_per_token_loss``,
and aggregates with a global token mean over the optimizer step (``loss_type="dapo"``), so gradient accumulation
and data parallelism do not change the loss.

A generation batch in which every group's rewards are equal has advantages that are all 0: the reward teaches
nothing, and with the old policy as reference the loss and gradient are exactly 0. Each such batch is warned about
(with the reward, the share of completions cut at the length cap and what to change); after
``max_zero_spread_generations`` of them in a row, training stops with an error instead of ending "normally".
"""

import logging
from typing import ClassVar

import torch
from trl import GRPOTrainer

from llmreg._compat import log_metric, logged_metrics, per_token_logps_and_entropies
from llmreg.losses.aggregation import aggregate
from llmreg.losses.rpg import rpg_per_token_loss
from llmreg.rpg.rpg_config import RPGConfig


logger = logging.getLogger(__name__)


class RPGTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is an RPG surrogate (https://huggingface.co/papers/2505.17508).

    >>> from llmreg.lab import arithmetic_dataset, arithmetic_reward, ensure_lab_model
    >>> from llmreg.rpg import RPGConfig, RPGTrainer
    >>> args = RPGConfig("outputs/rpg", divergence="urkl", estimator="reinforce", use_cpu=True, bf16=False)
    >>> trainer = RPGTrainer(str(ensure_lab_model()), arithmetic_reward, args=args,
    ...                      train_dataset=arithmetic_dataset(512))
    >>> trainer.train()
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "rpg", "llmreg"]
    _name = "RPG"

    def __init__(self, model, reward_funcs=None, args: RPGConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = RPGConfig(f"{name.split('/')[-1]}-RPG")
        if not isinstance(args, RPGConfig):
            raise TypeError(f"RPGTrainer needs an RPGConfig, got {type(args).__name__}: the RPG fields (divergence, "
                            "estimator, reference, rpg_beta, ...) live there.")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self._zero_spread_generations = 0  # consecutive generation batches without reward spread
        self.variant = (f"{args.divergence}/{args.estimator}/ref={args.reference}/clip={args.clip}"
                        + ("/kl_in_advantage" if args.kl_in_advantage else ""))
        logger.info("RPG variant %s, beta %g", self.variant, args.rpg_beta)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self._check_reward_spread()
        return output

    def _check_reward_spread(self) -> None:
        """Warn about a generation batch whose groups all have zero reward spread; stop after too many in a row.

        TRL computes the metrics below from the rewards of the whole generation batch, gathered over all ranks, so
        every rank takes the same decision.
        """
        metrics = logged_metrics(self, "train")
        if metrics["frac_reward_zero_std"][-1] < 1.0:
            self._zero_spread_generations = 0
            return
        self._zero_spread_generations += 1
        limit = self.args.max_zero_spread_generations
        clipped = 100 * metrics["completions/clipped_ratio"][-1]
        message = (
            f"No reward signal: in this generation batch every group of {self.num_generations} completions got the "
            f"same reward (mean reward {metrics['reward'][-1]:.3g}, {clipped:.0f} % of completions cut at "
            f"max_completion_length={self.args.max_completion_length}), so every advantage "
            f"is 0 and the reward teaches nothing ({self._zero_spread_generations} such batch(es) in a row"
            + (f"; training stops at {limit})." if limit else ").")
        )
        if limit and self._zero_spread_generations >= limit:
            raise RuntimeError(
                message + " Likely causes: the reward function cannot read the answers (check it on a few generated "
                "completions), completions hit the length cap before answering (raise max_completion_length or ask "
                "for shorter answers in the prompt), the temperature is too low for samples to differ, or too few "
                "num_generations per prompt. Set max_zero_spread_generations=0 to keep training anyway."
            )
        logger.warning(message)

    def _compute_loss(self, model, inputs):
        args = self.args
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logps, entropies, aux_loss = per_token_logps_and_entropies(
            self, model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        # TRL skips the old log-probs when they equal the current ones (one optimizer step per generation).
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps
        per_token_loss, token_metrics = rpg_per_token_loss(
            logps, old_logps, inputs["advantages"],
            divergence=args.divergence, estimator=args.estimator, beta=args.rpg_beta,
            ref_logps=inputs["ref_per_token_logps"] if args.reference == "fixed" else None,
            clip=args.clip, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            dual_clip_c=args.dual_clip_c, kl_in_advantage=args.kl_in_advantage,
        )

        mode = "train" if self.model.training else "eval"
        # num_items_in_batch counts the loss tokens of the whole generation batch on all ranks; one optimizer step
        # takes gradient_accumulation_steps / steps_per_generation of it, split over the ranks.
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            num_items = num_items * self.current_gradient_accumulation_steps / args.steps_per_generation
        loss = aggregate(per_token_loss, mask, "token-mean", num_items=num_items)
        if self.aux_loss_enabled:
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer

        self._log_rpg_metrics(mode, mask, token_metrics, entropies.detach())
        return loss

    def _log_rpg_metrics(self, mode: str, mask: torch.Tensor, token_metrics: dict, entropies: torch.Tensor) -> None:
        """Token means over all ranks with one reduction, and the ratio extremes with one gather."""
        mask = mask.to(entropies.dtype)
        ratio = token_metrics["ratio"]
        means = {f"rpg/{self.args.divergence}": token_metrics["kl"], "rpg/ratio_mean": ratio,
                 "rpg/clip_fraction": token_metrics["clipped"], "entropy": entropies}
        sums = torch.stack([*((values * mask).sum() for values in means.values()), mask.sum()])
        sums = self.accelerator.reduce(sums, reduction="sum")
        for index, name in enumerate(means):
            log_metric(self, mode, name, (sums[index] / sums[-1].clamp(min=1.0)).item())
        padding = mask == 0
        extremes = torch.stack(
            [ratio.masked_fill(padding, -torch.inf).max(), (-ratio).masked_fill(padding, -torch.inf).max()]
        )
        extremes = self.accelerator.gather(extremes).view(-1, 2).max(dim=0).values
        log_metric(self, mode, "rpg/ratio_max", extremes[0].item())
        log_metric(self, mode, "rpg/ratio_min", -extremes[1].item())
