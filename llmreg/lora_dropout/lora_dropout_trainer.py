"""LoRA Dropout for any Trainer: N-sample loss averaging in training, the test-time ensemble in evaluation.

    class LoRADropoutSFTTrainer(LoRADropoutMixin, SFTTrainer): ...
    trainer = LoRADropoutSFTTrainer(model, args=args, train_dataset=data, peft_config=LoraConfig(...),
                                    lora_dropout=LoRADropoutConfig(lora_dropout_p=0.1, lora_dropout_train_samples=2))

or ``with_lora_dropout(SFTTrainer)`` for the same class. The mixin goes first, so that its ``compute_loss`` wraps the
trainer's own: each of the N calls draws new masks (paper Eq. 4, L = (1/N)·Σ_r ℓ(x; θ0 + Δθ(m_r))), and one backward
runs through their mean. ``lora_dropout_p`` = 0 turns it off: nothing is attached and the trainer is its own.

Composition (docs/lora_dropout.md). The masks act in the loss's forwards (``compute_loss``) and in any other forward a
trainer runs in training mode within its step (Booster's two harmful passes draw one mask for both). What a trainer
computes while preparing its inputs (``_prepare_inputs``: GRPO/RPG's rollouts and old-policy log-probs) sees the
expected adapter (1−p)²·BA, the deterministic policy the adapter stands for at evaluation, so that an importance ratio
π_θ,m/π_old compares the sampled sub-network m with the policy that generated. Logged: ``lora_dropout/kept_fraction``,
the fraction of the LoRA input and output dims that the loss's masks kept (about 1 − p).
"""

import torch
from transformers.modeling_outputs import CausalLMOutput

from llmreg._compat import log_metric
from llmreg.lora_dropout.lora_dropout import LoRADropoutConfig, attach_lora_dropout, ensemble_forward
from llmreg.trainer_utils import PrefetchedStepMixin


class LoRADropoutMixin:
    """See the module docstring. ``self.lora_dropout`` holds the masks' hooks (``ensemble()``, ``remove()``); None
    when ``lora_dropout_p`` = 0."""

    def __init__(self, *args, lora_dropout: LoRADropoutConfig | None = None, **kwargs):
        config = lora_dropout if lora_dropout is not None else LoRADropoutConfig()
        samples = config.lora_dropout_train_samples
        if config.lora_dropout_p > 0 and samples > 1 and isinstance(self, PrefetchedStepMixin):
            # Those trainers (unlearning, reweighting) take each micro-batch's share of step-wide counts and side
            # batches once per compute_loss call: N calls would hand the later samples the next micro-batch's share.
            raise ValueError(f"lora_dropout_train_samples={samples} calls {type(self).__name__}'s loss {samples} "
                             "times per micro-batch, but this trainer normalizes each micro-batch by step-wide counts "
                             "it takes once per call. Use lora_dropout_train_samples=1 with it (masks are still "
                             "drawn at every step).")
        model = kwargs["model"] if "model" in kwargs else args[0] if args else None
        if config.lora_dropout_p > 0 and isinstance(model, str) and kwargs.get("peft_config") is None:
            raise ValueError(f"lora_dropout_p={config.lora_dropout_p} masks the input and output dims of a LoRA "
                             f"adapter, but {model!r} is loaded without one. Pass peft_config=LoraConfig(...) "
                             "(--use_peft in the recipes), or set lora_dropout_p=0.")
        self.lora_dropout = None
        super().__init__(*args, **kwargs)
        self.lora_dropout_config = config
        if config.lora_dropout_p == 0:
            return
        # A regularizer's config field read by name: Vaccine lives in BoosterConfig, which this mixin cannot import.
        if getattr(self.args, "vaccine_rho", 0.0) > 0:
            raise ValueError("Vaccine (vaccine_rho > 0) computes each micro-batch's hidden-state perturbation in a "
                             "pass of its own, before the alignment pass that it perturbs; with LoRA Dropout the two "
                             "passes would draw different masks, so the perturbation would be the worst case of "
                             "another sub-network. Use Booster alone with LoRA Dropout (vaccine_rho=0), or Vaccine "
                             "without it (lora_dropout_p=0).")
        self.lora_dropout = attach_lora_dropout(self.model, config)

    def _prepare_inputs(self, inputs):
        if self.lora_dropout is None:
            return super()._prepare_inputs(inputs)
        # Rollouts and the log-probs computed with them come from the policy itself, the expected adapter: a fresh
        # mask per generated token (and others for the old log-probs) would be no single sub-network's policy.
        with self.lora_dropout.expected_adapter():
            return super()._prepare_inputs(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.lora_dropout_config
        if self.lora_dropout is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if not model.training and config.lora_dropout_eval_samples > 0 and "labels" in inputs:
            model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids",
                                                                     "labels")}
            logits, loss = ensemble_forward(model, self.lora_dropout, config.lora_dropout_eval_samples,
                                            **model_inputs)
            return (loss, CausalLMOutput(loss=loss, logits=logits)) if return_outputs else loss
        samples = config.lora_dropout_train_samples if model.training else 1
        with self.lora_dropout.recorded_masks() as masks:
            results = [super(LoRADropoutMixin, self).compute_loss(model, dict(inputs), return_outputs=return_outputs,
                                                                  num_items_in_batch=num_items_in_batch)
                       for _ in range(samples)]
        if model.training and masks:
            self._log_kept_fraction(masks)
        if samples == 1:
            return results[0]
        if return_outputs:
            return sum(loss for loss, _ in results) / samples, results[-1][1]
        return sum(results) / samples

    def _log_kept_fraction(self, masks: list[torch.Tensor]) -> None:
        """The fraction of LoRA dims the masks of this micro-batch's loss kept, averaged over processes."""
        kept = torch.cat([mask.reshape(-1) for mask in masks]).float().mean()
        if self.accelerator.num_processes > 1:
            kept = self.accelerator.reduce(kept, reduction="mean")
        log_metric(self, "train", "lora_dropout/kept_fraction", kept.item())


def with_lora_dropout(trainer_class: type) -> type:
    """``trainer_class`` with LoRA Dropout: a subclass with ``LoRADropoutMixin`` first."""
    return type(f"LoRADropout{trainer_class.__name__}", (LoRADropoutMixin, trainer_class), {})
