"""BoosterTrainer: TRL's SFTTrainer plus Booster's harmful-perturbation regularizer, exact under gradient accumulation.

Once per optimizer step (at its last micro-batch, before that micro-batch's backward), with the parameters w that the
whole step shares:

1. g = ∇h(w) on a harmful batch, by ``torch.autograd.grad`` (the accumulated ``.grad`` is never touched); h is the
   token mean over the harmful batches of all processes (each process's summed loss over the global token count,
   gradients summed over processes), so the direction is normalized over the global harmful batch;
2. w̃ = w − α·g/(‖g‖ + ε), applied in place after saving a copy of every trainable parameter;
3. g̃ = ∇h(w̃) on the same batch; the parameters are then copied back, bit for bit;
4. λ·(g − g̃) is added to ``.grad`` once. The alignment loss f then backpropagates as in SFTTrainer, and DDP averages
   the sum over processes: ∇f + λ·(∇h(w) − ∇h(w̃)) of the global batches, the same update as one process with the
   global batches.

The reference code zeroes ``.grad`` between these passes, which is right only without gradient accumulation, and
restores the weights by adding the step back, which drifts in bf16.
"""

import logging
from typing import ClassVar

import torch
from torch.utils.data import DataLoader, RandomSampler
from trl import SFTTrainer

from llmreg.booster.booster_config import BoosterConfig
from llmreg.losses.booster import global_norm, perturbation, regularizer_gradient
from llmreg.trainer_utils import SFT_FORMATS, check_dataset_columns


logger = logging.getLogger(__name__)

class BoosterTrainer(SFTTrainer):
    """SFT with Booster's regularizer on a harmful dataset (https://huggingface.co/papers/2409.01586).

    >>> from llmreg.booster import BoosterConfig, BoosterTrainer
    >>> from llmreg.lab import ensure_lab_model, safety_alignment_dataset, safety_harmful_dataset
    >>> args = BoosterConfig("outputs/booster", booster_lambda=5.0, booster_alpha=0.1)
    >>> trainer = BoosterTrainer(str(ensure_lab_model()), args=args, train_dataset=safety_alignment_dataset(),
    ...                          harmful_dataset=safety_harmful_dataset())
    >>> trainer.train()
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sft", "booster", "llmreg"]
    _name = "Booster"

    def __init__(self, model, args: BoosterConfig | None = None, train_dataset=None, harmful_dataset=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = BoosterConfig(f"{name.split('/')[-1]}-Booster")
        if not isinstance(args, BoosterConfig):
            raise TypeError(f"BoosterTrainer needs a BoosterConfig, got {type(args).__name__}: booster_lambda, "
                            "booster_alpha and harmful_batch_size live there.")
        if harmful_dataset is None:
            raise ValueError("BoosterTrainer needs harmful_dataset: harmful prompts with harmful answers (not "
                             "refusals), in one of SFT's formats.")
        check_dataset_columns(harmful_dataset, SFT_FORMATS, "Booster (harmful_dataset)")
        super().__init__(model, args=args, train_dataset=train_dataset, **kwargs)
        self.harmful_dataset = self._prepare_dataset(harmful_dataset, self.processing_class, args, packing=False,
                                                     formatting_func=None, dataset_name="harmful")
        self._harmful_batches = None
        self._harmful_epoch = 0

    def _next_harmful_batch(self) -> dict:
        """The next harmful batch of this process, from a seeded, reshuffled-each-pass, sharded dataloader."""
        if self._harmful_batches is None:
            generator = torch.Generator().manual_seed(self.args.seed + self._harmful_epoch)
            columns = [c for c in self.harmful_dataset.column_names if c in ("input_ids", "completion_mask",
                                                                             "assistant_masks", "seq_lengths")]
            loader = DataLoader(self.harmful_dataset.select_columns(columns),
                                batch_size=self.args.harmful_batch_size, collate_fn=self.data_collator,
                                sampler=RandomSampler(self.harmful_dataset, generator=generator), drop_last=True)
            self._harmful_batches = iter(self.accelerator.prepare_data_loader(loader))
        try:
            return next(self._harmful_batches)
        except StopIteration:
            self._harmful_epoch += 1
            self._harmful_batches = None
            return self._next_harmful_batch()

    def _harmful_loss(self, model, batch: dict, num_items: torch.Tensor) -> torch.Tensor:
        """This process's share of h: the summed cross-entropy of its harmful answer tokens / ``num_items``, the
        number of answer tokens in the harmful batch of all processes. Summed over processes, h is the token mean of
        the global harmful batch, as SFT's loss is of the global batch."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
        with self.compute_loss_context_manager():
            return model(**inputs, use_cache=False, num_items_in_batch=num_items).loss

    def _add_booster_gradient(self, model) -> None:
        args = self.args
        unwrapped = self.accelerator.unwrap_model(model)  # no DDP hooks: these passes are not the step's backward
        params = [p for p in unwrapped.parameters() if p.requires_grad]
        batch = self._next_harmful_batch()

        processes = self.accelerator.num_processes
        num_items = self.accelerator.reduce((batch["labels"][:, 1:] != -100).sum(), reduction="sum")
        harmful_loss = self._harmful_loss(unwrapped, batch, num_items)
        grads = list(torch.autograd.grad(harmful_loss, params))
        if processes > 1:  # ∇h of the global harmful batch: the direction is normalized over all processes
            flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
            grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, step in zip(params, perturbation(grads, args.booster_alpha, args.booster_epsilon)):
                p.add_(step)
        perturbed_loss = self._harmful_loss(unwrapped, batch, num_items)
        # This process's share of ∇h(w̃), times the number of processes: DDP averages .grad over them, which turns
        # λ(g − R·g̃_r) into λ(∇h(w) − ∇h(w̃)) of the global harmful batch.
        perturbed_grads = [processes * g for g in torch.autograd.grad(perturbed_loss, params)]
        with torch.no_grad():
            for p, copy in zip(params, saved):
                p.copy_(copy)
            for p, extra in zip(params, regularizer_gradient(grads, perturbed_grads, args.booster_lambda)):
                if p.grad is None:
                    p.grad = extra.detach().clone()
                else:
                    p.grad.add_(extra)

        values = self.accelerator.reduce(torch.stack([harmful_loss.detach(), perturbed_loss.detach()]).float(),
                                         reduction="sum")
        metrics = self._metrics["train"]
        metrics["booster/harmful_loss"].append(values[0].item())
        metrics["booster/harmful_loss_perturbed"].append(values[1].item())
        metrics["booster/gap"].append((values[0] - values[1]).item())
        metrics["booster/harmful_grad_norm"].append(global_norm(grads).item())

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The parameters are the same for every micro-batch of an optimizer step, so the regularizer's gradient is
        # computed once, at the last one, before its backward (DDP averages .grad in that backward).
        if self.args.booster_lambda > 0 and self.accelerator.sync_gradients:
            model.train()
            self._add_booster_gradient(model)
        return super().training_step(model, inputs, num_items_in_batch)
