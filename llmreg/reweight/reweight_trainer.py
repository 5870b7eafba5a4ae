"""ReweightTrainer: TRL's SFTTrainer with dynamic loss-based sample weights, from the same forward pass.

For each micro-batch, with the per-sample losses ℓ_i (each sample's mean over its answer tokens, detached for the
weights) of the whole data-parallel batch — gathered from every process, in process order:

    w = sample_weights(ℓ, strategy, r, δ)                      over the S samples of the global micro-batch
    loss = Σ_i w_i · S · n_i · ℓ_i / N                         n_i: sample i's tokens; N: the step's tokens (all
                                                               micro-batches and processes)

Each process returns its own samples' share (times the number of processes, which DDP's averaging undoes). With
uniform weights w_i = 1/S this is Σ n_i·ℓ_i / N, the token mean of the step: exactly SFT's loss, under gradient
accumulation and data parallelism. What "a sample" is: a row of the batch, or, with padding-free batches (packing),
each packed document (TRL's ``seq_idx``).

Gradient accumulation (``reweight_scope``): by default, as in the reference code, each micro-batch is weighted on its
own (its global batch across processes), from the training forward pass alone. With ``reweight_scope="step"`` the
softmax runs over every sample of the optimizer step (the paper's minibatch): weighting the step needs every
micro-batch's losses before the first backward, so a forward pass without gradients over the step's micro-batches
computes them first, and 1 micro-batch of 8 rows then gives the update of 8 micro-batches of 1. Either way the token
normalization N is the step's, so uniform weights give SFT's update exactly.
"""

import logging
from typing import ClassVar

import torch
from trl import SFTTrainer

from llmreg._compat import log_metric, prepare_inputs
from llmreg.losses.reweighting import per_sample_losses, sample_weights
from llmreg.reweight.reweight_config import ReweightConfig
from llmreg.trainer_utils import PrefetchedStepMixin, loss_token_mask


logger = logging.getLogger(__name__)


class ReweightTrainer(PrefetchedStepMixin, SFTTrainer):
    """SFT or pretraining with loss-based sample reweighting (https://arxiv.org/abs/2502.06733).

    >>> from llmreg.reweight import ReweightConfig, ReweightTrainer
    >>> from llmreg.lab import ensure_lab_model, corpus_dataset
    >>> args = ReweightConfig("outputs/reweight", reweight_strategy="linupper", reweight_r=1.0)
    >>> trainer = ReweightTrainer(str(ensure_lab_model()), args=args, train_dataset=corpus_dataset())
    >>> trainer.train()
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sft", "reweighting", "llmreg"]
    _name = "Reweight"

    def __init__(self, model, args: ReweightConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = ReweightConfig(f"{name.split('/')[-1]}-Reweight")
        if not isinstance(args, ReweightConfig):
            raise TypeError(f"ReweightTrainer needs a ReweightConfig, got {type(args).__name__}: the strategy, r and "
                            "the warmup live there.")
        super().__init__(model, args=args, **kwargs)
        # The returned loss is already this micro-batch's share of the step's token mean.
        self.loss_is_scaled_for_ga = True
        self._step_tokens: list[float] = []  # the step's token count, once per remaining micro-batch
        self._step_weights: list[tuple[torch.Tensor, int]] = []  # reweight_scope="step": per remaining micro-batch

    def _count_step_tokens(self, batches: list[dict]) -> list[float]:
        tokens = sum(int(loss_token_mask(b).sum()) for b in batches)
        count = torch.tensor(float(tokens), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return [count.item()] * len(batches)

    def _gathered(self, losses: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every process's (loss, count) pairs in process order, and where this process's start. Processes may hold
        different numbers of samples (a short last batch, packed documents): padded with count −1, then dropped."""
        local = torch.stack([losses.detach().double(), counts.double()], dim=-1)
        if self.accelerator.num_processes == 1:
            return local[:, 0], local[:, 1], 0
        sizes = self.accelerator.gather(torch.tensor([len(local)], device=local.device))
        padded = torch.nn.functional.pad(local, (0, 0, 0, int(sizes.max()) - len(local)), value=-1.0)
        everything = self.accelerator.gather(padded).view(self.accelerator.num_processes, -1, 2)
        pieces = [everything[rank, :size] for rank, size in enumerate(sizes.tolist())]
        start = int(sizes[:self.accelerator.process_index].sum())
        joined = torch.cat(pieces)
        return joined[:, 0], joined[:, 1], start

    def _weights(self, losses: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The weights of one batch of gathered per-sample losses (zero for samples with no loss token), and how many
        samples carry one."""
        valid = counts > 0
        weights = torch.zeros_like(losses)
        num_valid = int(valid.sum())
        if num_valid:
            step = self.state.global_step
            weights[valid] = (torch.full((num_valid,), 1.0 / num_valid, dtype=weights.dtype, device=weights.device)
                              if self._is_uniform() else sample_weights(
                losses[valid], self.args.reweight_strategy, r=self.args.r_at(step), delta=self.args.reweight_delta))
            self._log_weights(weights[valid], losses[valid])
        return weights, num_valid

    def _is_uniform(self) -> bool:
        return self.args.reweight_strategy == "uniform" or self.state.global_step < self.args.reweight_warmup_steps

    @torch.no_grad()
    def _weigh_step(self, model, batches: list[dict]) -> list[tuple[torch.Tensor, int]]:
        """``reweight_scope="step"``: one softmax over every sample of the step's micro-batches (on every process),
        from a forward pass without gradients at the step's parameters. Per micro-batch: this process's weights and
        the step's number of weighted samples."""
        pieces = []
        for batch in batches:
            batch = prepare_inputs(self, batch)
            with self.compute_loss_context_manager():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
            losses, counts = per_sample_losses(logits, batch["labels"], batch.get("seq_idx"))
            del logits
            pieces.append((len(losses), *self._gathered(losses, counts)))
        weights, num_valid = self._weights(torch.cat([p[1] for p in pieces]), torch.cat([p[2] for p in pieces]))
        per_micro_batch, offset = [], 0
        for num_local, gathered_losses, _, start in pieces:
            per_micro_batch.append((weights[offset + start:offset + start + num_local], num_valid))
            offset += len(gathered_losses)
        return per_micro_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the plain SFT loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self._step_tokens:  # the step's first micro-batch
            batches = self.take_step_batches(inputs)
            self._step_tokens = self._count_step_tokens(batches)
            # With one micro-batch (or uniform weights) the step's weights are the micro-batch's: no extra pass.
            weigh_step = self.args.reweight_scope == "step" and len(batches) > 1 and not self._is_uniform()
            self._step_weights = self._weigh_step(model, batches) if weigh_step else []
        step_tokens = self._step_tokens.pop(0)

        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with self.compute_loss_context_manager():
            outputs = model(**model_inputs, use_cache=False)
        losses, counts = per_sample_losses(outputs.logits, inputs["labels"], inputs.get("seq_idx"))
        if self._step_weights:
            local_weights, num_weighted = self._step_weights.pop(0)
        else:
            all_losses, all_counts, start = self._gathered(losses, counts)
            weights, num_weighted = self._weights(all_losses, all_counts)
            local_weights = weights[start:start + len(losses)]
        # S·w_i·n_i/N: uniform weights (1/S) give each token 1/N, the step's token mean.
        scale = local_weights.to(losses.dtype) * num_weighted * counts / max(step_tokens, 1.0)
        loss = (scale * losses).sum() * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _log_weights(self, weights: torch.Tensor, losses: torch.Tensor) -> None:
        """The weights' summary over the global micro-batch (the same on every process)."""
        if weights.numel() == 0:
            return
        log_metric(self, "train", "reweight/effective_sample_size", float(1 / weights.square().sum()))
        log_metric(self, "train", "reweight/weight_entropy", float(-(weights * weights.clamp(min=1e-30).log()).sum()))
        log_metric(self, "train", "reweight/weight_min", float(weights.min()))
        log_metric(self, "train", "reweight/weight_max", float(weights.max()))
        for q in (0.1, 0.5, 0.9):
            log_metric(self, "train", f"reweight/loss_q{int(q * 100)}", float(torch.quantile(losses, q)))
