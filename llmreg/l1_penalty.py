"""The ℓ1 penalty λ1·Σ|θ| on the trainable parameters, for any TRL or llmreg trainer (CLEAR, arXiv 2410.18057 §3).

    class L1SFTTrainer(L1PenaltyMixin, SFTTrainer): ...       # or with_l1_penalty(SFTTrainer)
    trainer = L1SFTTrainer(model, args=args, train_dataset=data, peft_config=LoraConfig(...), l1_lambda=0.01)

With LoRA the trainable parameters are the adapter's A and B, and the penalty is on their entries (CLEAR's "init"
mode: a fresh adapter, so the penalty keeps it small). Without LoRA it is on θ − θ₀, the distance from the weights at
the start of training (a copy of the trainable weights is kept). Its gradient λ1·sign(θ) joins the last micro-batch's
gradient once per optimizer step (``llmreg.trainer_utils.StepRegularizerMixin``), so gradient accumulation and
data-parallel averaging leave it λ1·sign(θ), under DDP and DeepSpeed ZeRO-2/3 alike (ZeRO-3 gathers the adapter to
read its signs); under a weight perturbation, the signs at w, not at the moved weights. The logged training loss is the
task's; the penalty is logged apart: ``l1/norm`` (Σ|θ| or Σ|θ − θ₀|) and ``l1/penalty`` (λ1 times it).
"""

import torch
from peft import PeftModel

from llmreg._compat import log_metric
from llmreg.losses.unlearning import l1_penalty
from llmreg.trainer_utils import StepRegularizerMixin, is_zero3, refuse_fp16_under_deepspeed


class L1PenaltyMixin(StepRegularizerMixin):
    """See the module docstring. Goes before the trainer class; ``l1_lambda`` = 0 changes nothing."""

    def __init__(self, *args, l1_lambda: float = 0.0, **kwargs):
        if l1_lambda < 0:
            raise ValueError(f"l1_lambda must be >= 0, got {l1_lambda}.")
        super().__init__(*args, **kwargs)
        self.l1_lambda = l1_lambda
        self._l1_params, self._l1_origin = [], None
        if l1_lambda == 0:  # off: no copy of the weights, and nothing refused (recipes compose it unconditionally)
            return
        refuse_fp16_under_deepspeed(self, "The ℓ1 penalty's gradient")
        self._l1_params = [p for p in self.model.parameters() if p.requires_grad]
        if not isinstance(self.model, PeftModel):  # full fine-tuning: the distance from the starting weights
            if is_zero3(self.accelerator):
                raise ValueError("The ℓ1 penalty of full fine-tuning (on θ − θ₀) keeps a copy of the starting "
                                 "weights, which ZeRO-3 shards; use it with a LoRA adapter under ZeRO-3.")
            self._l1_origin = [p.detach().clone() for p in self._l1_params]

    def training_step(self, model, inputs, num_items_in_batch=None):
        # λ1·sign(θ) is added once per optimizer step, at its last micro-batch, identical on every process.
        if self.l1_lambda == 0 or not self.accelerator.sync_gradients:
            return super().training_step(model, inputs, num_items_in_batch)
        with self.parameters_at_w(self._l1_params) as params:
            tensors = params if self._l1_origin is None else [p - origin for p, origin in zip(params, self._l1_origin)]
            flat = torch.cat([t.reshape(-1) for t in tensors])
            norm = l1_penalty([flat], 1.0).item()
            extras = [chunk.view_as(t) for chunk, t in zip((self.l1_lambda * flat.sign()).split(
                [t.numel() for t in tensors]), tensors)]
        log_metric(self, "train", "l1/norm", norm)
        log_metric(self, "train", "l1/penalty", self.l1_lambda * norm)
        return self.training_step_adding(model, inputs, num_items_in_batch, self._l1_params, extras,
                                         "The ℓ1 penalty's gradient")

def with_l1_penalty(trainer_class: type) -> type:
    """``trainer_class`` with the ℓ1 penalty: a subclass with ``L1PenaltyMixin`` first."""
    return type(f"L1{trainer_class.__name__}", (L1PenaltyMixin, trainer_class), {})
