"""KL to the base model on the fine-tuning tokens, for SFT-style trainers (self-distillation, as RLHF's KL keeps a
policy near its reference).

    class KLSFTTrainer(KLToBaseMixin, SFTTrainer): ...              # or with_kl_to_base(SFTTrainer)
    trainer = KLSFTTrainer(model, args=args, train_dataset=new_task, peft_config=LoraConfig(...),
                           kl_to_base=KLToBaseConfig(kl_to_base_beta=0.5))

The loss is L_SFT + β·KL, the KL exact over the vocabulary at every answer token (the tokens SFT's loss counts),
token-averaged as SFT's loss is (over the whole step's tokens on every process, so gradient accumulation and data
parallelism leave it unchanged). ``forward`` is KL(π_base‖π_θ), distillation from the base (it keeps mass wherever the
base put some); ``reverse`` is KL(π_θ‖π_base), RLHF's direction. The base is the model with its adapter disabled with
LoRA (no second model in memory), and a frozen copy of the starting model in full fine-tuning (as TRL's DPO keeps its
reference; not under ZeRO-3, which shards it): one more forward of the decoder per micro-batch, without gradients.
Both distributions are computed at the answer tokens only, from the last hidden states there and the output
embedding (SFTTrainer's fused head computes only the label tokens' log-probabilities; a hook keeps the model's hidden
states). Logged: ``kl_to_base/kl`` (the token mean over the step's tokens on every
process).

Not yet: the base's top-k log-probabilities precomputed once (no copy in full fine-tuning).
"""

import contextlib
import os
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from trl import SFTTrainer

from llmreg._compat import independent_copy, log_metric
from llmreg.losses.kl import vocab_kl
from llmreg.trainer_utils import is_zero3


DIRECTIONS = ("forward", "reverse")


@dataclass
class KLToBaseConfig:
    """The KL-to-base term's weight and direction. See the module docstring."""

    kl_to_base_beta: float = field(default=0.0, metadata={"help": "β of the KL to the base model (0: off)."})
    kl_to_base_direction: str = field(
        default="forward", metadata={"help": "forward: KL(base‖model), distillation from the base; reverse: "
                                             "KL(model‖base), RLHF's direction."}
    )

    def __post_init__(self):
        if self.kl_to_base_direction not in DIRECTIONS:
            raise ValueError(f"Unknown kl_to_base_direction {self.kl_to_base_direction!r}; valid: "
                             f"{', '.join(DIRECTIONS)}.")
        if self.kl_to_base_beta < 0:
            raise ValueError(f"kl_to_base_beta must be >= 0, got {self.kl_to_base_beta}.")


class KLToBaseMixin:
    """See the module docstring. Goes before an SFT-style trainer class; β = 0 changes nothing."""

    def __init__(self, *args, kl_to_base: KLToBaseConfig | None = None, **kwargs):
        config = kl_to_base if kl_to_base is not None else KLToBaseConfig()
        super().__init__(*args, **kwargs)
        self.kl_to_base = config
        self._frozen_base = None
        if config.kl_to_base_beta == 0:
            return
        if not isinstance(self, SFTTrainer):
            raise TypeError(f"The KL to the base is taken at the answer tokens of SFT-style batches (their labels); "
                            f"{type(self).__name__} is not an SFTTrainer. DPO- and GRPO-style trainers have their "
                            "own KL to a reference (beta).")
        # An FSDP launch on CPU runs as DDP, so the launch's request is what counts.
        if self.is_fsdp_enabled or self.args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError("The KL to the base applies the output embedding to the last hidden states after the "
                             "model's forward, when FSDP2 has resharded it into DTensors. Use DeepSpeed ZeRO-3 "
                             "(accelerate_configs/deepspeed_zero3.yaml) or DDP.")
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            if is_zero3(self.accelerator):
                raise ValueError("The KL to the base in full fine-tuning keeps a frozen copy of the starting model, "
                                 "which ZeRO-3 shards; use a LoRA adapter under ZeRO-3 (the base is the adapter "
                                 "disabled).")
            self._frozen_base = independent_copy(model).eval().requires_grad_(False)
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if base.config.get_text_config().to_dict().get("final_logit_softcapping"):
            raise ValueError("The KL to the base rebuilds the logits from the last hidden state and the output "
                             "embedding; this model caps its logits (final_logit_softcapping), which that would miss.")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        beta = self.kl_to_base.kl_to_base_beta
        if beta == 0:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped if self._frozen_base is not None else unwrapped.get_base_model()
        hidden = []
        handle = base.get_decoder().register_forward_hook(lambda module, args, out: hidden.append(out[0]))
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            handle.remove()
        # Only the answer tokens' logits are needed: the last hidden states there, through the output embedding.
        mask = inputs["labels"][:, 1:] != -100
        logits = base.get_output_embeddings()(hidden[-1][:, :-1][mask])
        model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        reference_model = self._frozen_base if self._frozen_base is not None else base
        with unwrapped.disable_adapter() if self._frozen_base is None else contextlib.nullcontext(), torch.no_grad():
            base_hidden = reference_model.get_decoder()(**model_inputs, use_cache=False)[0]
            base_logits = reference_model.get_output_embeddings()(base_hidden[:, :-1][mask])
        pair = (base_logits, logits) if self.kl_to_base.kl_to_base_direction == "forward" else (logits, base_logits)
        # As SFT's loss: over the step's answer tokens on every process, times the process count (DDP averages).
        every = torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        kl = vocab_kl(*pair, every, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            kl = kl * self.accelerator.num_processes
        self._log_kl(vocab_kl(*pair, every).detach(), every.sum())
        if return_outputs:
            loss, outputs = result
            return loss + beta * kl, outputs
        return result + beta * kl

    def _log_kl(self, mean: torch.Tensor, tokens: torch.Tensor) -> None:
        totals = torch.stack([mean.float() * tokens, tokens.float()])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        mode = "train" if self.model.training else "eval"
        log_metric(self, mode, "kl_to_base/kl", (totals[0] / totals[1].clamp(min=1)).item())


def with_kl_to_base(trainer_class: type) -> type:
    """``trainer_class`` with the KL-to-base term: a subclass with ``KLToBaseMixin`` first."""
    return type(f"KLToBase{trainer_class.__name__}", (KLToBaseMixin, trainer_class), {})
