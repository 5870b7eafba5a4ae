"""The ℓ1 penalty λ1·Σ|θ| on the trainable parameters, for any TRL or llmreg trainer (CLEAR, arXiv 2410.18057 §3).

    class L1SFTTrainer(L1PenaltyMixin, SFTTrainer): ...       # or with_l1_penalty(SFTTrainer)
    trainer = L1SFTTrainer(model, args=args, train_dataset=data, peft_config=LoraConfig(...), l1_lambda=0.01)

With LoRA the trainable parameters are the adapter's A and B, and the penalty is on their entries (CLEAR's "init"
mode: a fresh adapter, so the penalty keeps it small). Without LoRA it is on θ − θ₀, the distance from the weights at
the start of training (a copy of the trainable weights is kept). Added to the training loss once per optimizer step
(its share per micro-batch), so gradient accumulation and data-parallel averaging leave its gradient λ1·sign(θ).
Logged: ``l1/norm`` (Σ|θ| or Σ|θ − θ₀|) and ``l1/penalty`` (λ1 times it).
"""

from peft import PeftModel

from llmreg.losses.unlearning import l1_penalty


class L1PenaltyMixin:
    """See the module docstring. Goes before the trainer class; ``l1_lambda`` = 0 changes nothing."""

    def __init__(self, *args, l1_lambda: float = 0.0, **kwargs):
        if l1_lambda < 0:
            raise ValueError(f"l1_lambda must be >= 0, got {l1_lambda}.")
        super().__init__(*args, **kwargs)
        self.l1_lambda = l1_lambda
        self._l1_params = [p for p in self.model.parameters() if p.requires_grad]
        # Full fine-tuning: the penalty is on the distance from the starting weights, not on the weights themselves.
        self._l1_origin = None if isinstance(self.model, PeftModel) else [p.detach().clone() for p in self._l1_params]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.l1_lambda == 0 or not model.training:
            return result
        tensors = self._l1_params if self._l1_origin is None else [
            p - origin for p, origin in zip(self._l1_params, self._l1_origin)]
        norm = l1_penalty(tensors, 1.0)
        # The Trainer divides a loss by the accumulation steps unless the loss is already a share of the step's
        # global token mean (its own test, below); either way the penalty must total λ1·‖θ‖₁ per optimizer step.
        scaled_for_accumulation = self.loss_is_scaled_for_ga
        if scaled_for_accumulation is None:
            scaled_for_accumulation = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        share = 1.0 / self.current_gradient_accumulation_steps if scaled_for_accumulation else 1.0
        penalty = self.l1_lambda * norm * share
        self._metrics["train"]["l1/norm"].append(norm.item())
        self._metrics["train"]["l1/penalty"].append(self.l1_lambda * norm.item())
        if return_outputs:
            loss, outputs = result
            return loss + penalty, outputs
        return result + penalty


def with_l1_penalty(trainer_class: type) -> type:
    """``trainer_class`` with the ℓ1 penalty: a subclass with ``L1PenaltyMixin`` first."""
    return type(f"L1{trainer_class.__name__}", (L1PenaltyMixin, trainer_class), {})
