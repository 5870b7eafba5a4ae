"""Anchors against forgetting for any TRL or llmreg trainer: L2-SP and EWC toward the starting weights.

    class AnchoredSFTTrainer(AnchorMixin, SFTTrainer): ...          # or with_anchor(SFTTrainer)
    trainer = AnchoredSFTTrainer(model, args=args, train_dataset=new_task, peft_config=LoraConfig(...),
                                 anchor=AnchorConfig("ewc", anchor_lambda=1e3, fisher_path="fisher.safetensors"),
                                 fisher_dataset=old_behaviour)

The penalty (λ/2)·Σ F·Δ² (``llmreg.losses.anchor``) is on Δ = θ − θ₀ in full fine-tuning (a copy of the starting
weights is kept) and on each adapted layer's ΔW = s·B·A with LoRA (nothing is copied: θ₀ is the base). L2-SP has F = 1;
EWC's F is the diagonal Fisher of the old behaviour's data at θ₀: estimated from ``fisher_dataset`` (SFT formats,
tokenized as the trainer tokenizes its training data, the log-likelihood of the answer tokens), one example at a time,
split over the processes and summed; saved to ``fisher_path`` (safetensors, keyed by the base model's parameter
names, so a LoRA run and a full fine-tune share it) and loaded from there by a later run. With LoRA it is the Fisher of
the adapted base weights W.

The penalty's gradient is computed in closed form once per optimizer step (layers of one shape as one stack) and joins
the last micro-batch's gradient (``llmreg.trainer_utils.StepRegularizerMixin``, as the ℓ1 penalty's), so gradient
accumulation and data-parallel averaging leave it λ·F·Δ, under DDP and DeepSpeed ZeRO-2/3 (ZeRO-3 gathers the adapter
to read it; full fine-tuning under ZeRO-3 is refused, as its θ₀ would be a full copy per process). Under a weight
perturbation it is λ·F·Δ at w, not at the moved weights. The logged loss is the task's; ``anchor/distance``
(Σ F·Δ²) and ``anchor/penalty`` are logged apart. λ = 0 is the trainer itself.

Coupled that way, the anchor's gradient goes through the optimizer with the loss's: Adam divides each coordinate by
its own scale, so a larger λ does not pull harder (each weight still moves about η a step), and gradient clipping
scales the task's gradient down with the anchor's. ``anchor_decoupled`` applies it after each optimizer step instead,
as AdamW applies weight decay, with the step's learning rate η: in full fine-tuning the penalty's proximal step
θ ← θ₀ + (θ − θ₀)/(1 + η·λ·F) (exact, stable at any λ); with LoRA the same step on ΔW, made by B by least squares
(for L2-SP exactly; ``llmreg.losses.anchor``). It runs once per optimizer step, identically on every process, so
gradient accumulation and data parallelism leave it as it is. DeepSpeed steps its own copy of the weights inside the
backward pass, where a step after it cannot reach: there the decoupled anchor is refused. ``anchor/distance`` is then
Σ F·Δ² after the optimizer's step, before the anchor's.
"""

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import TrainerCallback
from trl import SFTTrainer

from llmreg._compat import log_metric
from llmreg.losses.anchor import (
    accumulate_fisher,
    anchor_gradients,
    anchor_penalty,
    lora_anchor_gradients,
    lora_proximal_update,
)
from llmreg.scoring import token_logps
from llmreg.stages import dataset_digest
from llmreg.trainer_utils import StepRegularizerMixin, is_zero3, prepare_side_dataset, refuse_fp16_under_deepspeed


logger = logging.getLogger(__name__)

ANCHORS = ("none", "l2sp", "ewc")


@dataclass
class AnchorConfig:
    """Which anchor and how strong. See the module docstring."""

    anchor: str = field(
        default="none", metadata={"help": f"The anchor: {', '.join(ANCHORS)}. l2sp: (λ/2)‖θ − θ₀‖² (with LoRA, on "
                                          "ΔW = s·B·A); ewc: the same weighted by the old data's diagonal Fisher."}
    )
    anchor_lambda: float = field(default=0.0, metadata={"help": "λ of the anchor (0: off)."})
    fisher_path: str | None = field(
        default=None, metadata={"help": "ewc: the Fisher artifact (safetensors). Loaded when it exists, else "
                                        "estimated from the fisher dataset and saved there (default: "
                                        "output_dir/fisher.safetensors)."}
    )
    fisher_num_samples: int = field(
        default=256, metadata={"help": "ewc: rows of the fisher dataset the Fisher is estimated on (its first ones)."}
    )
    anchor_decoupled: bool = field(
        default=False, metadata={"help": "Apply the anchor after each optimizer step with its learning rate η, as "
                                         "AdamW applies weight decay, not as a gradient through Adam and clipping: "
                                         "θ ← θ₀ + (θ − θ₀)/(1 + η·λ·F) in full fine-tuning (its proximal step); "
                                         "with LoRA that step on ΔW, made by B by least squares. Not under "
                                         "DeepSpeed."}
    )

    def __post_init__(self):
        if self.anchor not in ANCHORS:
            raise ValueError(f"Unknown anchor {self.anchor!r}; valid: {', '.join(ANCHORS)}.")
        if self.anchor_decoupled and self.anchor == "none":
            raise ValueError("anchor_decoupled applies an anchor after each optimizer step, and anchor is 'none': "
                             "choose l2sp or ewc, or leave anchor_decoupled off.")
        if self.anchor_lambda < 0 or self.fisher_num_samples < 1:
            raise ValueError(f"anchor_lambda must be >= 0 and fisher_num_samples >= 1, got {self.anchor_lambda} and "
                             f"{self.fisher_num_samples}.")

    @property
    def enabled(self) -> bool:
        return self.anchor != "none" and self.anchor_lambda > 0


def base_parameter_name(name: str) -> str:
    """A parameter's name in the plain base model: PEFT's prefix and LoRA's ``base_layer`` removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def adapted_layers(model: PeftModel) -> list[tuple[str, LoraLayer, str]]:
    """(base weight name, layer, adapter) of each LoRA layer's active adapter; an error for what ΔW = s·B·A is not."""
    found = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A or module.use_dora.get(adapter, False):
                raise ValueError(f"The anchor on ΔW = s·B·A supports LoRA on Linear layers; {module_name} is "
                                 f"{'DoRA' if adapter in module.lora_A else 'another kind of LoRA'}.")
            found.append((base_parameter_name(f"{module_name}.weight"), module, adapter))
    if not found:
        raise ValueError("The model is a PeftModel without LoRA layers: the anchor supports LoRA adapters or full "
                         "fine-tuning.")
    return found


def estimate_fisher(trainer, dataset, names: list[str], num_samples: int) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of the named base parameters at the current weights (an adapter disabled), from the first
    ``num_samples`` rows of ``dataset``: (1/N)·Σ_n (∇ log p(answer_n | prompt_n))². Each process takes every R-th row;
    the sums are added over processes."""
    rows = prepare_side_dataset(trainer, dataset, "fisher")
    rows = rows.select(range(min(num_samples, len(rows))))
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    peft = isinstance(model, PeftModel)
    base = model.get_base_model() if peft else model
    by_base_name = {base_parameter_name(n): p for n, p in base.named_parameters()}
    missing = [name for name in names if name not in by_base_name]
    if missing:
        raise ValueError(f"The Fisher's parameters {missing[:3]} are not in the model.")
    targets = [by_base_name[name] for name in names]
    flags = [p.requires_grad for p in targets]
    fisher = None
    mine = range(accelerator.process_index, len(rows), accelerator.num_processes)
    was_training = model.training
    model.eval()  # the old behaviour's Fisher: no dropout
    try:
        for p in targets:
            p.requires_grad_(True)
        with model.disable_adapter() if peft else contextlib.nullcontext():
            for index in tqdm(mine, desc="Fisher", disable=not accelerator.is_local_main_process):
                batch = trainer.data_collator([rows[index]])
                labels = batch["labels"][:, 1:].to(accelerator.device)
                mask = labels != -100
                logps = token_logps(model, batch["input_ids"], batch["attention_mask"], use_cache=False)
                log_likelihood = (logps * mask).sum()
                grads = torch.autograd.grad(log_likelihood, targets)
                fisher = accumulate_fisher(fisher, list(grads), len(rows))
    finally:
        for p, flag in zip(targets, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if fisher is None:  # a process with no row
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in targets]
    if accelerator.num_processes > 1:
        fisher = [accelerator.reduce(f, reduction="sum") for f in fisher]
    return {name: f.detach().cpu().contiguous() for name, f in zip(names, fisher)}


def fisher_metadata(trainer, dataset, num_samples: int) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return {"model": str(base.config.name_or_path), "data": dataset_digest(dataset),
            "num_samples": str(min(num_samples, len(dataset)))}


class AnchorMixin(StepRegularizerMixin):
    """See the module docstring. Goes before the trainer class; ``anchor="none"`` or λ = 0 changes nothing."""

    def __init__(self, *args, anchor: AnchorConfig | None = None, fisher_dataset=None, **kwargs):
        config = anchor if anchor is not None else AnchorConfig()
        if config.enabled and config.anchor == "ewc" and fisher_dataset is None and not (
                config.fisher_path and Path(config.fisher_path).is_file()):
            raise ValueError("EWC weighs the anchor by the Fisher of the old behaviour: pass fisher_dataset (rows of "
                             "the old behaviour, in an SFT format) or a fisher_path that exists.")
        super().__init__(*args, **kwargs)
        self.anchor_config = config
        self._anchor_origin = None
        if not config.enabled:
            return
        # An FSDP launch on CPU runs as DDP, so the launch's request is what counts.
        if self.is_fsdp_enabled or self.args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError("The anchor reads the adapter's A and B (or θ − θ₀) whole, and FSDP2 keeps parameters "
                             "as sharded DTensors. Use DeepSpeed ZeRO-3 (accelerate_configs/deepspeed_zero3.yaml) "
                             "with LoRA, or DDP.")
        if config.anchor_decoupled and self.is_deepspeed_enabled:
            raise ValueError("anchor_decoupled steps the weights after the optimizer's step, and DeepSpeed steps its "
                             "own copy of them inside the backward pass, which would overwrite it. Under DeepSpeed "
                             "use the anchor as a gradient (anchor_decoupled=False), or train with DDP.")
        if not config.anchor_decoupled:  # decoupled, it steps the weights after the optimizer, not its gradient
            refuse_fp16_under_deepspeed(self, "The anchor's gradient")
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel):
            self._anchor_layers = adapted_layers(model)
            names = [name for name, _, _ in self._anchor_layers]
            self._anchor_params = [p for _, layer, adapter in self._anchor_layers
                                   for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)]
        else:
            if is_zero3(self.accelerator):
                raise ValueError("The anchor of full fine-tuning keeps a copy of the starting weights θ₀, which "
                                 "ZeRO-3 shards; use it with a LoRA adapter under ZeRO-3 (the base is θ₀ there).")
            self._anchor_layers = None
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            names = [base_parameter_name(n) for n, _ in named]
            self._anchor_params = [p for _, p in named]
            self._anchor_origin = [p.detach().clone() for p in self._anchor_params]
        self._fisher = [None] * len(names)
        if config.anchor == "ewc":
            fisher = self._load_or_estimate_fisher(fisher_dataset, names)
            self._fisher = [fisher[name].to(self.accelerator.device) for name in names]
        if self._anchor_layers is not None:
            # Layers of one shape and scaling are computed as one stack (a few batched products per step, not a few
            # per layer): groups of layer indices, each with its Fisher stacked once here.
            groups = {}
            for index, (_, layer, adapter) in enumerate(self._anchor_layers):
                key = (tuple(layer.lora_A[adapter].weight.shape), tuple(layer.lora_B[adapter].weight.shape),
                       layer.scaling[adapter])
                groups.setdefault(key, []).append(index)
            self._anchor_groups = [(indices, key[2], None if self._fisher[0] is None else
                                    torch.stack([self._fisher[i] for i in indices]))
                                   for key, indices in groups.items()]
        if config.anchor_decoupled:
            self.add_callback(_DecoupledAnchorStep(self))

    def _load_or_estimate_fisher(self, dataset, names: list[str]) -> dict[str, torch.Tensor]:
        config = self.anchor_config
        path = Path(config.fisher_path or Path(self.args.output_dir) / "fisher.safetensors")
        if path.is_file():
            fisher = load_file(path)
            missing = [name for name in names if name not in fisher]
            if missing:
                raise ValueError(f"The Fisher in {path} lacks the parameters {missing[:3]} (of {len(missing)}): it "
                                 "was estimated for other layers. Estimate it again (remove the file).")
            if dataset is not None:
                recorded = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() \
                    else {}
                current = fisher_metadata(self, dataset, config.fisher_num_samples)
                if recorded and recorded != current:
                    raise ValueError(f"The Fisher in {path} was estimated on other data or another model "
                                     f"({recorded} against {current}). Remove it, or point fisher_path elsewhere.")
            logger.info("EWC: the Fisher loaded from %s", path)
            return fisher
        if not isinstance(self, SFTTrainer):
            raise TypeError(f"EWC's Fisher is estimated on SFT-format rows, tokenized as an SFTTrainer tokenizes its "
                            f"data; {type(self).__name__} is not one. Estimate the Fisher with an SFT trainer first "
                            "(its fisher_path), then pass that fisher_path here.")
        if is_zero3(self.accelerator):
            raise ValueError("EWC's Fisher is estimated from per-example gradients of the whole base weights, which "
                             "ZeRO-3 shards: estimate it in one process first (fisher_path), then train under ZeRO-3.")
        fisher = estimate_fisher(self, dataset, names, config.fisher_num_samples)
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(fisher, str(path))
            path.with_suffix(".json").write_text(json.dumps(fisher_metadata(self, dataset, config.fisher_num_samples),
                                                            indent=1))
            logger.info("EWC: the Fisher saved to %s", path)
        self.accelerator.wait_for_everyone()
        return fisher

    def _anchor_terms(self) -> tuple[list[torch.Tensor], float, float]:
        """(the penalty's gradient per anchored parameter, Σ F·Δ², the penalty)."""
        lam = self.anchor_config.anchor_lambda
        with self.parameters_at_w(self._anchor_params) as params:
            if self._anchor_layers is None:
                deltas = [p - origin for p, origin in zip(params, self._anchor_origin)]
                extras = anchor_gradients(deltas, self._fisher, lam)
                distance = (2 / lam) * anchor_penalty(deltas, self._fisher, lam).item()
            else:
                extras, squares = [None] * len(self._anchor_params), []
                for indices, scaling, fisher in self._anchor_groups:
                    # _anchor_params holds A then B of each layer: A of layer i at 2i, B at 2i + 1.
                    lora_a = torch.stack([params[2 * i] for i in indices])
                    lora_b = torch.stack([params[2 * i + 1] for i in indices])
                    grad_a, grad_b, squared = lora_anchor_gradients(lora_a, lora_b, scaling, fisher, lam)
                    for i, a, b in zip(indices, grad_a.unbind(), grad_b.unbind()):
                        extras[2 * i], extras[2 * i + 1] = a, b
                    squares.append(squared)
                distance = torch.stack(squares).sum().item()  # one synchronization for all layers
        return extras, distance, lam / 2 * distance

    def training_step(self, model, inputs, num_items_in_batch=None):
        # λ·F·Δ(w) is added once per optimizer step, at its last micro-batch, identical on every process.
        config = self.anchor_config
        if not config.enabled or config.anchor_decoupled or not self.accelerator.sync_gradients:
            return super().training_step(model, inputs, num_items_in_batch)
        extras, distance, penalty = self._anchor_terms()
        log_metric(self, "train", "anchor/distance", distance)
        log_metric(self, "train", "anchor/penalty", penalty)
        return self.training_step_adding(model, inputs, num_items_in_batch, self._anchor_params, extras,
                                         "The anchor's gradient")

    def decoupled_anchor_step(self):
        """The penalty's proximal step with this step's learning rate η (``llmreg.losses.anchor``): after the
        optimizer's step, before the scheduler's."""
        if self.accelerator.optimizer_step_was_skipped:  # a mixed-precision overflow: no step, no decay
            return
        rates = {id(p): group["lr"] for group in self.optimizer.param_groups for p in group["params"]}
        missing = [i for i, p in enumerate(self._anchor_params) if id(p) not in rates]
        if missing:
            raise RuntimeError(f"{len(missing)} anchored parameters are in no optimizer group: the decoupled "
                               "anchor steps them with their group's learning rate.")
        lr = rates[id(self._anchor_params[0])]
        if any(rates[id(p)] != lr for p in self._anchor_params):
            raise ValueError("anchor_decoupled takes its step with the learning rate of the anchored parameters, "
                             "and the optimizer's groups give them several (LoRA+?). Give them one, or use the "
                             "anchor as a gradient (anchor_decoupled=False).")
        lam = self.anchor_config.anchor_lambda
        if self._anchor_layers is None:
            # A tensor at a time: the whole model's Δ and update at once would be two more copies of the weights.
            penalty = 0.0
            with torch.no_grad():
                for param, origin, fisher in zip(self._anchor_params, self._anchor_origin, self._fisher, strict=True):
                    delta = param - origin
                    penalty = penalty + anchor_penalty([delta], [fisher], lam)
                    (gradient,) = anchor_gradients([delta], [fisher], lam, proximal_lr=lr)
                    param.sub_(gradient.mul_(lr).to(param.dtype))
            distance = (2 / lam) * float(penalty)
        else:  # B alone moves
            squares = []
            for indices, scaling, fisher in self._anchor_groups:
                lora_a = torch.stack([self._anchor_params[2 * i].detach() for i in indices])
                lora_b = torch.stack([self._anchor_params[2 * i + 1].detach() for i in indices])
                update_b, squared = lora_proximal_update(lora_a, lora_b, scaling, fisher, lam, lr)
                with torch.no_grad():
                    for i, update in zip(indices, update_b.unbind(), strict=True):
                        self._anchor_params[2 * i + 1].sub_(update.to(self._anchor_params[2 * i + 1].dtype))
                squares.append(squared)
            distance = torch.stack(squares).sum().item()
        log_metric(self, "train", "anchor/distance", distance)
        log_metric(self, "train", "anchor/penalty", lam / 2 * distance)


class _DecoupledAnchorStep(TrainerCallback):
    """Calls the trainer's decoupled anchor step after each optimizer step (the Trainer has no method to override
    there; its callbacks are called there)."""

    def __init__(self, trainer: AnchorMixin):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.decoupled_anchor_step()


def with_anchor(trainer_class: type) -> type:
    """``trainer_class`` with an anchor: a subclass with ``AnchorMixin`` first."""
    return type(f"Anchored{trainer_class.__name__}", (AnchorMixin, trainer_class), {})
