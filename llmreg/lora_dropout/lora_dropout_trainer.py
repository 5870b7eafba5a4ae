"""LoRA Dropout for any Trainer: N-sample loss averaging in training, the test-time ensemble in evaluation.

    class LoRADropoutSFTTrainer(LoRADropoutMixin, SFTTrainer): ...
    trainer = LoRADropoutSFTTrainer(model, args=args, train_dataset=data, peft_config=LoraConfig(...),
                                    lora_dropout=LoRADropoutConfig(lora_dropout_p=0.1, lora_dropout_train_samples=2))

or ``with_lora_dropout(SFTTrainer)`` for the same class. The mixin goes first, so that its ``compute_loss`` wraps the
trainer's own: each of the N calls draws new masks (paper Eq. 4, L = (1/N)·Σ_r ℓ(x; θ0 + Δθ(m_r))), and one backward
runs through their mean.
"""

from transformers.modeling_outputs import CausalLMOutput

from llmreg.lora_dropout.lora_dropout import LoRADropoutConfig, attach_lora_dropout, ensemble_forward
from llmreg.trainer_utils import PrefetchedStepMixin


class LoRADropoutMixin:
    """See the module docstring. ``self.lora_dropout`` holds the masks' hooks (``ensemble()``, ``remove()``)."""

    def __init__(self, *args, lora_dropout: LoRADropoutConfig | None = None, **kwargs):
        samples = (lora_dropout or LoRADropoutConfig()).lora_dropout_train_samples
        if samples > 1 and isinstance(self, PrefetchedStepMixin):
            # Those trainers (unlearning, reweighting) take each micro-batch's share of step-wide counts and side
            # batches once per compute_loss call: N calls would hand the later samples the next micro-batch's share.
            raise ValueError(f"lora_dropout_train_samples={samples} calls {type(self).__name__}'s loss {samples} "
                             "times per micro-batch, but this trainer normalizes each micro-batch by step-wide counts "
                             "it takes once per call. Use lora_dropout_train_samples=1 with it (masks are still "
                             "drawn at every step).")
        super().__init__(*args, **kwargs)
        self.lora_dropout_config = lora_dropout if lora_dropout is not None else LoRADropoutConfig()
        self.lora_dropout = attach_lora_dropout(self.model, self.lora_dropout_config)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.lora_dropout_config
        if not model.training and config.lora_dropout_eval_samples > 0 and "labels" in inputs:
            model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids",
                                                                     "labels")}
            logits, loss = ensemble_forward(model, self.lora_dropout, config.lora_dropout_eval_samples,
                                            **model_inputs)
            return (loss, CausalLMOutput(loss=loss, logits=logits)) if return_outputs else loss
        samples = config.lora_dropout_train_samples if model.training else 1
        results = [super(LoRADropoutMixin, self).compute_loss(model, dict(inputs), return_outputs=return_outputs,
                                                              num_items_in_batch=num_items_in_batch)
                   for _ in range(samples)]
        if samples == 1:
            return results[0]
        if return_outputs:
            return sum(loss for loss, _ in results) / samples, results[-1][1]
        return sum(results) / samples


def with_lora_dropout(trainer_class: type) -> type:
    """``trainer_class`` with LoRA Dropout: a subclass with ``LoRADropoutMixin`` first."""
    return type(f"LoRADropout{trainer_class.__name__}", (LoRADropoutMixin, trainer_class), {})
