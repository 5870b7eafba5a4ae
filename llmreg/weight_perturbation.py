"""Weight perturbation for any TRL or llmreg trainer: SAM, ASAM, finite-difference gradient-norm regularization, AWP.

    class SAMSFTTrainer(WeightPerturbationMixin, SFTTrainer): ...        # or with_weight_perturbation(SFTTrainer)
    trainer = SAMSFTTrainer(model, args=args, train_dataset=data, peft_config=LoraConfig(...),
                            weight_perturbation=WeightPerturbationConfig("sam", perturbation_rho=0.05))

Each optimizer step takes its gradient at moved weights w + δ (the rules and their papers:
``llmreg.losses.perturbation``):

1. at the step's first micro-batch, g = ∇L(w) over all the step's micro-batches and processes, by
   ``torch.autograd.grad`` on the loss the trainer's own ``training_step`` would backpropagate (its scaling for
   gradient accumulation and token counts included), so that 1 micro-batch of 8 rows and 8 of 1 give the same g;
   the accumulated ``.grad`` is not touched;
2. δ from g (and w: ASAM, AWP); the trainable parameters are saved and moved to w + δ (gathered under ZeRO-3);
3. the trainer's own step runs every micro-batch at w + δ: its backward accumulates g̃ = ∇L(w + δ) as it would
   accumulate ∇L(w), whoever owns ``.grad`` (DDP, ZeRO-2/3). For gradient-norm regularization, whose update is
   (1 − c)·g + c·g̃, the perturbed loss's gradient is scaled by c (its value is not), and (1 − c)·g is added once,
   after the last micro-batch's backward (under DeepSpeed, which owns ``.grad``, inside it through hooks);
4. after the last micro-batch's backward, before the optimizer steps, the saved w is copied back, bit for bit. Under
   DeepSpeed the optimizer steps inside that backward, from its own fp32 copy of the weights, which the move did not
   touch: the update is of w, and the copy back is needed only when it skipped the step (fp16 overflow).

Penalties on the weights that another mixin adds once per step (the anchor, the ℓ1 penalty:
``llmreg.trainer_utils.StepRegularizerMixin``) are of w, not of w + δ, as weight decay is under SAM; the perturbation
is of the loss alone. Those mixins go after this one in the bases (refused otherwise).

A random training forward (dropout, LoRA Dropout's masks) draws the same in both passes of a micro-batch (the
generators are rewound after step 1): the perturbation is of one sampled sub-network, as Booster's. Cost: one extra
forward and backward per micro-batch, and the step-1 gradients and a copy of the trainable weights in memory.
The logged loss is L(w), the trainer's own metrics are those of that pass; the perturbed pass is logged as
``perturbation/loss`` and ‖g‖ as ``perturbation/grad_norm``, ‖δ‖ as ``perturbation/norm``.
"""

import contextlib
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from trl import GRPOTrainer

from llmreg._compat import log_metric, metrics_discarded, training_loss
from llmreg.losses.perturbation import (
    adaptive_step,
    global_norm,
    gradient_norm_coefficients,
    gradient_scaled,
    layerwise_step,
    normalized_step,
)
from llmreg.trainer_utils import (
    PrefetchedStepMixin,
    StepRegularizerMixin,
    add_to_gradients,
    gathered_parameters,
    gradients_added_in_backward,
    is_zero3,
    loss_scale,
    refuse_fp16_under_deepspeed,
)


# --- the engine: gradients without .grad, weights moved and restored (Booster's passes too) --------------------------


def autograd_gradients(trainer, loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``torch.autograd.grad``: the gradients are returned, ``.grad`` (and DeepSpeed's buffers) untouched. An input
    (a trainable parameter) the loss does not reach is an error: its gradient would silently be 0."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    if is_zero3(trainer.accelerator):
        # ZeRO-3 releases the parameters it gathered for a backward in its gradient hooks, which this backward
        # does not run (nothing is accumulated): release them, as DeepSpeed does after a backward.
        trainer.model_wrapped.empty_partition_cache()
    missing = sum(g is None for g in grads)
    if missing:
        raise RuntimeError(f"{missing} trainable parameters get no gradient from the loss, so no perturbation can be "
                           "computed for them. Freeze them (requires_grad=False).")
    return list(grads)


def sum_over_processes(accelerator, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over processes, in one collective."""
    if accelerator.num_processes == 1:
        return tensors
    flat = accelerator.reduce(torch.cat([t.reshape(-1) for t in tensors]), reduction="sum")
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def move_parameters(accelerator, params: list[torch.nn.Parameter],
                    steps: Callable[[list[torch.nn.Parameter]], list[torch.Tensor]]) -> list[torch.Tensor]:
    """Save every parameter, then move it by its step, in place; returns the saved copy. ``steps`` is called with the
    whole parameters (gathered under ZeRO-3, where every process computes the same steps and process 0's are kept)."""
    with gathered_parameters(accelerator, params, modifier_rank=0), torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, step in zip(params, steps(params), strict=True):
            p.add_(step)
    return saved


def restore_parameters(accelerator, params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    """Copy the saved values back, bit for bit (adding the step back would drift in bf16)."""
    with gathered_parameters(accelerator, params, modifier_rank=0), torch.no_grad():
        for p, copy in zip(params, saved, strict=True):
            p.copy_(copy)


@contextmanager
def moved_parameters(accelerator, params: list[torch.nn.Parameter], steps: list[torch.Tensor]):
    """``params`` at w + step for the duration of the block, then w again, bit for bit."""
    saved = move_parameters(accelerator, params, lambda _: steps)
    try:
        yield
    finally:
        restore_parameters(accelerator, params, saved)


def random_draws_replayed(accelerator):
    """torch's generators (CPU and this process's device) are restored on leaving the block, so that the next pass
    draws what the block drew: with a random training forward (dropout, LoRA Dropout's masks) both passes are then of
    one sampled sub-network. Activation checkpointing replays the generator within a pass, so it changes nothing."""
    device = accelerator.device
    return torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)


# --- the regularizers ------------------------------------------------------------------------------------------------

METHODS = ("none", "sam", "asam", "gradient_norm", "awp")
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}  # the papers' usual radii (ASAM's is larger: its step is scaled by |w|)


@dataclass
class WeightPerturbationConfig:
    """Which perturbation and its size. See ``llmreg.losses.perturbation`` for the math."""

    weight_perturbation: str = field(
        default="none",
        metadata={"help": f"The rule: {', '.join(METHODS)}. sam: the gradient at w + ρ·g/‖g‖; asam: the same in the "
                          "|w|-scaled geometry; gradient_norm: the gradient of L + (γ/2)‖∇L‖² by a forward "
                          "difference; awp: each weight tensor moved by γ·‖W‖ along its own gradient."},
    )
    perturbation_rho: float | None = field(
        default=None, metadata={"help": "ρ of sam and asam: the radius of the ascent step (default 0.05 for sam, 0.5 "
                                        "for asam)."}
    )
    asam_eta: float = field(default=0.01, metadata={"help": "η of asam: T = |w| + η, so that zeros can move."})
    gradient_norm_gamma: float = field(
        default=0.01, metadata={"help": "γ of gradient_norm: the weight of (γ/2)‖∇L‖² in the objective."}
    )
    gradient_norm_epsilon: float = field(
        default=0.05, metadata={"help": "ε of gradient_norm: the length of the finite-difference step along g/‖g‖."}
    )
    awp_gamma: float = field(
        default=5e-3, metadata={"help": "γ of awp: each weight tensor moves by γ times its own norm."}
    )

    def __post_init__(self):
        if self.weight_perturbation not in METHODS:
            raise ValueError(f"Unknown weight_perturbation {self.weight_perturbation!r}; valid: {', '.join(METHODS)}.")
        if self.perturbation_rho is None:
            self.perturbation_rho = DEFAULT_RHO.get(self.weight_perturbation, 0.05)
        sizes = {"perturbation_rho": self.perturbation_rho, "asam_eta": self.asam_eta, "awp_gamma": self.awp_gamma,
                 "gradient_norm_gamma": self.gradient_norm_gamma}
        bad = {name: value for name, value in sizes.items() if value < 0}
        if bad:
            raise ValueError(f"The perturbation sizes must be >= 0; got {bad}.")
        if self.gradient_norm_epsilon <= 0:
            raise ValueError(f"gradient_norm_epsilon is the finite-difference step and must be > 0; got "
                             f"{self.gradient_norm_epsilon}.")

    @property
    def enabled(self) -> bool:
        return self.weight_perturbation != "none"


class WeightPerturbationMixin:
    """See the module docstring. Goes before the trainer class; ``weight_perturbation="none"`` changes nothing."""

    def __init__(self, *args, weight_perturbation: WeightPerturbationConfig | None = None, **kwargs):
        config = weight_perturbation if weight_perturbation is not None else WeightPerturbationConfig()
        if config.enabled and isinstance(self, PrefetchedStepMixin):
            raise ValueError(f"{config.weight_perturbation} runs {type(self).__name__}'s loss twice per micro-batch, "
                             "but this trainer normalizes each micro-batch by step-wide counts it takes once per "
                             "call. Use the weight perturbation with SFT-, DPO- or reward-style trainers.")
        super().__init__(*args, **kwargs)
        self.weight_perturbation = config
        self._perturbation_pending = None  # (the step's micro-batches, their token count), set by get_batch_samples
        self._losses_at_w: list[torch.Tensor] = []  # L(w) of each remaining micro-batch of the step
        self._saved_weights = None
        self._perturbed: list[torch.nn.Parameter] = []  # the trainable parameters, found at the first step
        self._perturbed_names, self._perturbed_model = None, (None, None)  # (the model as called, unwrapped)
        self._combination = None  # gradient_norm's (a, b, g): the step's update is a·g + b·g̃
        self._in_perturbed_pass = False
        self._perturbed_loss = 0.0  # the step's L(w + δ) so far
        if config.enabled:
            self._refuse_what_cannot_compose()

    def _refuse_what_cannot_compose(self):
        name = self.weight_perturbation.weight_perturbation
        # An FSDP launch on CPU runs as DDP, so the launch's request is what counts, as for Booster.
        if self.is_fsdp_enabled or self.args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError(f"{name} moves the trainable parameters to w + δ for a step, and FSDP2 keeps them as "
                             "sharded DTensors that its forward unshards into other tensors. Use DeepSpeed ZeRO-3 "
                             "(accelerate_configs/deepspeed_zero3.yaml) or DDP.")
        if name == "gradient_norm":
            refuse_fp16_under_deepspeed(self, "Gradient-norm regularization's (1 − c)·g")
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 0:
            raise ValueError(f"{name} under DeepSpeed relies on the optimizer's own copy of the weights (ZeRO stages "
                             "1-3), which the move to w + δ leaves at w; ZeRO stage 0 steps the moved weights. Use "
                             "ZeRO stage 1, 2 or 3, or DDP.")
        if isinstance(self, GRPOTrainer):
            raise TypeError(f"{name} computes each step's gradient at w first, over all its micro-batches; GRPO-style "
                            "trainers (RPG) generate their rollouts while preparing those micro-batches, so the "
                            "first pass would generate again. Use it with SFT-, DPO- or reward-style trainers.")
        mro = type(self).__mro__
        outside = [cls.__name__ for cls in mro[:mro.index(WeightPerturbationMixin)]
                   if StepRegularizerMixin in cls.__bases__]
        if outside:
            # Their gradient is of w, read through ``_weights_at_w`` while the weights are at w + δ, which this
            # mixin sets at the step's first micro-batch: they must run inside its step.
            raise TypeError(f"{', '.join(outside)} must come after WeightPerturbationMixin in the class's bases, so "
                            f"that {name} runs around their step: with_weight_perturbation(with_anchor(...)), not "
                            "with_anchor(with_weight_perturbation(...)).")
        # Read by name: Booster's config lives above this module.
        if getattr(self.args, "booster_lambda", 0.0) > 0 or getattr(self.args, "vaccine_rho", 0.0) > 0:
            raise ValueError(f"Booster and Vaccine move the weights or hidden states within the step themselves; "
                             f"with {name} they would be evaluated at w + δ, a regularizer of another point. Use one "
                             "of them.")

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The perturbation is normalized over the whole optimizer step (every micro-batch, every process), so it needs
        # the step's micro-batches before the first one trains; the Trainer fetches them all here.
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.weight_perturbation.enabled:
            self._perturbation_pending = (batch_samples, num_items_in_batch)
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.weight_perturbation.enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._perturbation_pending is None and not self._losses_at_w:  # called outside the Trainer's loop
            self._perturbation_pending = ([inputs], num_items_in_batch)
        if self._perturbation_pending is not None:  # the step's first micro-batch: g, δ, and the move
            self._start_step(model, *self._perturbation_pending)
            self._perturbation_pending = None
        last = self.accelerator.sync_gradients
        combination, added = self._combination, contextlib.nullcontext()
        what = "The gradient-norm term (1 − c)·g"
        if last and combination is not None and self.is_deepspeed_enabled:
            a, _, grads = combination
            added = gradients_added_in_backward(self._perturbed, [a * g for g in grads], what)
        self._in_perturbed_pass = True
        try:
            with added:
                perturbed_loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_perturbed_pass = False
            if last:
                self._finish_step()
        if last and combination is not None and not self.is_deepspeed_enabled:
            # After the backward: .grad is synchronized, and an inner penalty's gradient (the anchor's), which is not
            # to be scaled, is already in it. Sums commute.
            a, _, grads = combination
            add_to_gradients(self._perturbed, grads, what, alpha=a * loss_scale(self.accelerator))
        # Summed over the step's micro-batches and averaged over processes, as the Trainer makes the logged loss.
        self._perturbed_loss = self._perturbed_loss + perturbed_loss.detach().float()
        if last:
            log_metric(self, "train", "perturbation/loss", self._mean_over_processes(self._perturbed_loss).item())
            self._perturbed_loss = 0.0
        return self._losses_at_w.pop(0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The trainer's metrics (entropy, accuracy, rewards, ...) are those of L(w), the loss this step reports: the
        # perturbed pass's are dropped. Metrics logged outside the loss (the ℓ1 penalty's) stay.
        if not self._in_perturbed_pass:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with metrics_discarded(self):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        if self._combination is None:
            return result
        # gradient_norm: the backward of this pass gives b·g̃, with no hook on the parameters; the loss's value (the
        # logged perturbation/loss) is L(w + δ).
        b = self._combination[1]
        if return_outputs:
            return gradient_scaled(result[0], b), result[1]
        return gradient_scaled(result, b)

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.accelerator.num_processes == 1 else self.accelerator.reduce(value, reduction="mean")

    def _start_step(self, model, batches: list[dict], num_items_in_batch) -> None:
        config = self.weight_perturbation
        # Found once per model (unwrapping reads the installed packages' metadata, milliseconds a call). The pass runs
        # unwrapped: no DDP hooks, it is not the step's backward.
        if self._perturbed_model[0] is not model:
            unwrapped = self.accelerator.unwrap_model(model)
            named = [(name, p) for name, p in unwrapped.named_parameters() if p.requires_grad]
            self._perturbed_model, self._perturbed_names = (model, unwrapped), [name for name, _ in named]
            self._perturbed = [p for _, p in named]
        unwrapped = self._perturbed_model[1]
        if not unwrapped.training:  # the Trainer's training_step sets it, after this pass; a walk over every module
            unwrapped.train()
        params = self._perturbed
        grads, self._losses_at_w = None, []
        with random_draws_replayed(self.accelerator):  # the step's own passes will draw what these draw
            for batch in batches:
                loss = training_loss(self, unwrapped, batch, num_items_in_batch)
                local = autograd_gradients(self, loss, params)
                grads = local if grads is None else [a + b for a, b in zip(grads, local, strict=True)]
                self._losses_at_w.append(loss.detach())
        # Each process's loss is its share scaled so that DDP's average over processes is the step's gradient.
        processes = self.accelerator.num_processes
        if processes > 1:
            grads = [g / processes for g in sum_over_processes(self.accelerator, grads)]
        grad_norm = float(global_norm(grads))
        rule = config.weight_perturbation
        moved = []

        def steps(whole: list[torch.nn.Parameter]) -> list[torch.Tensor]:
            if rule == "sam":
                moved.extend(normalized_step(grads, config.perturbation_rho))
            elif rule == "gradient_norm":
                moved.extend(normalized_step(grads, config.gradient_norm_epsilon))
            elif rule == "asam":  # T = |w| + η on weights, not biases, as the paper's code
                scaled = [name.endswith("weight") for name in self._perturbed_names]
                moved.extend(adaptive_step(grads, whole, config.perturbation_rho, config.asam_eta, scaled))
            else:  # awp
                moved.extend(layerwise_step(grads, whole, config.awp_gamma))
            return moved

        self._combination = None
        if rule == "gradient_norm":
            a, b = gradient_norm_coefficients(grad_norm, config.gradient_norm_gamma, config.gradient_norm_epsilon)
            self._combination = (a, b, grads)
        self._saved_weights = move_parameters(self.accelerator, params, steps)
        self._weights_at_w = {id(p): saved for p, saved in zip(params, self._saved_weights)}  # for the penalties
        log_metric(self, "train", "perturbation/grad_norm", grad_norm)
        log_metric(self, "train", "perturbation/norm", float(global_norm(moved)))

    def _finish_step(self) -> None:
        """w back before the optimizer steps (see the module docstring for DeepSpeed, which stepped already)."""
        saved, self._saved_weights, self._combination = self._saved_weights, None, None
        self._weights_at_w = None
        if saved is None:
            return
        if self.is_deepspeed_enabled and self.model_wrapped.was_step_applied():
            return  # the update of w, from DeepSpeed's own copy, is in the weights now
        restore_parameters(self.accelerator, self._perturbed, saved)


def with_weight_perturbation(trainer_class: type) -> type:
    """``trainer_class`` with a weight perturbation: a subclass with ``WeightPerturbationMixin`` first."""
    return type(f"WeightPerturbation{trainer_class.__name__}", (WeightPerturbationMixin, trainer_class), {})
