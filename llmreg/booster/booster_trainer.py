"""BoosterTrainer: TRL's SFTTrainer plus Booster's harmful-perturbation regularizer, exact under gradient accumulation.

Once per optimizer step (at its last micro-batch, before that micro-batch's backward), with the parameters w that the
whole step shares:

1. g = ∇h(w) on a harmful batch, by ``torch.autograd.grad`` (the accumulated ``.grad`` is never touched); h is the
   token mean over the harmful batches of all processes (each process's summed loss over the global token count,
   gradients summed over processes), so the direction is normalized over the global harmful batch; with a random
   training forward (LoRA Dropout), step 3 replays this pass's random draws: both are of one sampled sub-network;
2. w̃ = w − α·g/(‖g‖ + ε), applied in place after saving a copy of every trainable parameter (gathered under ZeRO-3);
3. g̃ = ∇h(w̃) on the same batch; the parameters are then copied back, bit for bit;
4. λ·(g − g̃) joins that micro-batch's backward through gradient hooks on the parameters, so it reaches the gradient
   the way the loss's own does, whoever owns ``.grad``: DDP and DeepSpeed then average ∇f + λ·(∇h(w) − ∇h(w̃)) over
   processes, the same update as one process with the global batches.

The reference code zeroes ``.grad`` between these passes, which is right only without gradient accumulation, and
restores the weights by adding the step back, which drifts in bf16.

With ``vaccine_rho`` > 0, the alignment pass is Vaccine's (Huang et al. 2024): the decoder layers' outputs are moved by
ρ along the normalized gradient of f with respect to them, computed for all the step's micro-batches first.
"""

import contextlib
import logging
from contextlib import contextmanager
from typing import ClassVar

import torch
from peft import PeftModel
from trl import SFTTrainer

from llmreg._compat import log_metric, prepare_inputs
from llmreg.booster.booster_config import BoosterConfig
from llmreg.losses.booster import global_norm, perturbation, regularizer_gradient
from llmreg.trainer_utils import (
    SFT_FORMATS,
    StepIndexedRows,
    check_dataset_columns,
    gradients_added_in_backward,
    loss_scale,
    prepare_side_dataset,
    refuse_fp16_under_deepspeed,
)
from llmreg.weight_perturbation import (
    autograd_gradients,
    moved_parameters,
    random_draws_replayed,
    sum_over_processes,
)


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
            name = model if isinstance(model, str) else model.config.name_or_path
            args = BoosterConfig(f"{name.split('/')[-1]}-Booster")
        if not isinstance(args, BoosterConfig):
            raise TypeError(f"BoosterTrainer needs a BoosterConfig, got {type(args).__name__}: booster_lambda, "
                            "booster_alpha and harmful_batch_size live there.")
        if harmful_dataset is None:
            raise ValueError("BoosterTrainer needs harmful_dataset: harmful prompts with harmful answers (not "
                             "refusals), in one of SFT's formats.")
        check_dataset_columns(harmful_dataset, SFT_FORMATS, "Booster (harmful_dataset)")
        super().__init__(model, args=args, train_dataset=train_dataset, **kwargs)
        if args.booster_lambda > 0:
            refuse_fp16_under_deepspeed(self, "Booster's gradient")
        # h is the loss on the harmful answers alone, as f is on the refusals: the rows keep their loss mask.
        self._harmful_rows = prepare_side_dataset(self, harmful_dataset, "harmful")
        try:
            self._harmful_indices = StepIndexedRows(len(self._harmful_rows), args.harmful_batch_size,
                                                    self.accelerator.num_processes, self.accelerator.process_index,
                                                    args.seed)
        except ValueError as error:
            raise ValueError(f"harmful_dataset is too small: {error} Use more harmful data or a smaller "
                             "harmful_batch_size.") from None
        self._vaccine_pending = None  # (the step's micro-batches, their token count), set by get_batch_samples
        self._vaccine_queue: list[list[torch.Tensor]] = []  # ε per remaining micro-batch of the step
        if args.vaccine_rho > 0:
            decoder_layers(self.accelerator.unwrap_model(self.model))  # refuse a model without layers before training

    def _harmful_batch(self, step: int) -> dict:
        rows = self._harmful_rows.select(self._harmful_indices(step))
        return prepare_inputs(self, self.data_collator(list(rows)))

    def _lm_loss(self, model, batch: dict, num_items: torch.Tensor) -> torch.Tensor:
        """This process's share of a token-mean loss: the summed cross-entropy of the batch's answer tokens /
        ``num_items``, the number of answer tokens over all processes (and micro-batches). Summed over them, it is the
        token mean of the global batch, as SFT's loss is."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
        with self.compute_loss_context_manager():
            return model(**inputs, use_cache=False, num_items_in_batch=num_items).loss

    def _booster_gradient(self, model) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """λ·(∇h(w) − ∇h(w̃)) for this process, to be added to the gradient of the step's last micro-batch: every
        process adds λ·(g − R·g̃_r), g of the global harmful batch and g̃_r its own share of ∇h(w̃), so that the
        average over the R processes (DDP's, DeepSpeed's) is λ·(∇h(w) − ∇h(w̃)) of the global harmful batch."""
        args = self.args
        unwrapped = self.accelerator.unwrap_model(model)  # no DDP hooks: these passes are not the step's backward
        params = [p for p in unwrapped.parameters() if p.requires_grad]
        batch = self._harmful_batch(self.state.global_step)
        processes = self.accelerator.num_processes
        num_items = self.accelerator.reduce((batch["labels"][:, 1:] != -100).sum(), reduction="sum")

        # Booster's objective is of one network: h(w) − h(w − α·∇h(w)/‖∇h(w)‖) with the same h in both terms. With a
        # random training forward (LoRA Dropout's masks, PEFT's lora_dropout, attention dropout) h is the loss of one
        # sampled sub-network m, and both harmful passes must be of that m: a second draw would evaluate h_m2 at a
        # step taken along ∇h_m1, which is no sub-network's regularizer.
        with random_draws_replayed(self.accelerator):  # w̃'s pass below draws what this one draws
            harmful_loss = self._lm_loss(unwrapped, batch, num_items)
            local_grads = autograd_gradients(self, harmful_loss, params)
        grads = sum_over_processes(self.accelerator, local_grads)
        with moved_parameters(self.accelerator, params, perturbation(grads, args.booster_alpha, args.booster_epsilon)):
            perturbed_loss = self._lm_loss(unwrapped, batch, num_items)
            perturbed_grads = [processes * g for g in autograd_gradients(self, perturbed_loss, params)]
        extras = regularizer_gradient(grads, perturbed_grads, args.booster_lambda)

        values = self.accelerator.reduce(torch.stack([harmful_loss.detach(), perturbed_loss.detach()]).float(),
                                         reduction="sum")
        log_metric(self, "train", "booster/harmful_loss", values[0].item())
        log_metric(self, "train", "booster/harmful_loss_perturbed", values[1].item())
        log_metric(self, "train", "booster/gap", (values[0] - values[1]).item())
        log_metric(self, "train", "booster/harmful_grad_norm", global_norm(grads).item())
        return params, extras

    # --- Vaccine -----------------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Vaccine normalizes its perturbation over the whole optimizer step (every micro-batch, every process), so
        # it needs the step's micro-batches before the first one trains; the Trainer fetches them all here.
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.vaccine_rho > 0:
            self._vaccine_pending = (batch_samples, num_items_in_batch)
        return batch_samples, num_items_in_batch

    def _vaccine_perturbations(self, model, batch_samples: list, num_items) -> list[list[torch.Tensor]]:
        """Vaccine's ε for each micro-batch of the step: ε_l = ρ·∂f/∂e_l / ‖∂f/∂e‖ at every decoder layer's output
        e_l, the norm over all layers, micro-batches and processes (a constant: no gradient flows through it)."""
        unwrapped = self.accelerator.unwrap_model(model)
        layers = decoder_layers(unwrapped)
        per_batch, squares, losses = [], torch.zeros((), dtype=torch.float64), []
        outputs = []
        handles = [layer.register_forward_hook(lambda module, args, out: outputs.append(hidden(out)))
                   for layer in layers]
        try:
            for batch in batch_samples:
                outputs.clear()
                loss = self._lm_loss(unwrapped, prepare_inputs(self, batch), num_items)
                grads = autograd_gradients(self, loss, outputs[:len(layers)])
                squares = squares + sum(g.detach().double().square().sum() for g in grads).cpu()
                per_batch.append([g.detach() for g in grads])
                losses.append(loss.detach().float())
        finally:
            for handle in handles:
                handle.remove()
        squares = self.accelerator.reduce(squares.to(self.accelerator.device), reduction="sum")
        norm = squares.sqrt()
        scale = self.args.vaccine_rho / (norm + self.args.booster_epsilon)
        loss = self.accelerator.reduce(torch.stack(losses).sum(), reduction="sum")
        log_metric(self, "train", "vaccine/loss_unperturbed", loss.item())
        log_metric(self, "train", "vaccine/hidden_grad_norm", norm.item())
        return [[(scale * g.double()).to(g.dtype) for g in grads] for grads in per_batch]

    @contextmanager
    def _hidden_states_perturbed(self, model, perturbations: list[torch.Tensor]):
        """Add ε_l to the output of decoder layer l in the forwards of the block."""
        layers = decoder_layers(self.accelerator.unwrap_model(model))

        def hook(index):
            def add(module, args, out):
                if isinstance(out, tuple):
                    return (out[0] + perturbations[index], *out[1:])
                return out + perturbations[index]
            return add

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --- the step ----------------------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        hidden_perturbation = contextlib.nullcontext()
        if self.args.vaccine_rho > 0:
            if self._vaccine_pending is None and not self._vaccine_queue:  # called outside Trainer's loop
                self._vaccine_pending = ([inputs], num_items_in_batch)
            if self._vaccine_pending is not None:  # the step's first micro-batch: ε for all of them at once
                batch_samples, num_items = self._vaccine_pending
                self._vaccine_queue = self._vaccine_perturbations(model, batch_samples, num_items)
                self._vaccine_pending = None
            hidden_perturbation = self._hidden_states_perturbed(model, self._vaccine_queue.pop(0))
        # The parameters are the same for every micro-batch of an optimizer step, so Booster's gradient is computed
        # once, at the last one (where DDP and DeepSpeed reduce), and enters that micro-batch's backward through
        # gradient hooks: it reaches .grad the way the loss's gradient does, whoever owns .grad (DDP, ZeRO-2/3).
        booster_gradient = contextlib.nullcontext()
        if self.args.booster_lambda > 0 and self.accelerator.sync_gradients:
            booster_gradient = gradients_added_in_backward(*self._booster_gradient(model), "Booster's gradient",
                                                           scale=loss_scale(self.accelerator))
        with booster_gradient, hidden_perturbation:
            return super().training_step(model, inputs, num_items_in_batch)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers whose outputs Vaccine perturbs (a PEFT model's base model's)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"Vaccine perturbs the outputs of the decoder layers, but {type(base).__name__}'s decoder "
                         "has no `layers` ModuleList; it supports the transformers decoder-only models.")
    return layers


def hidden(output):
    """A decoder layer's hidden-state output (some models return a tuple with it first)."""
    return output[0] if isinstance(output, tuple) else output
