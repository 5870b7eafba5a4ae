"""UnlearnTrainer: TRL's SFTTrainer turned to unlearning a forget set, with CLEAR's objectives and ℓ1 penalty.

The Trainer's loop runs over the forget set (``forget_dataset``); each micro-batch of it gets a retain micro-batch
drawn as a function of the step (so resuming draws what a straight run does) and, for ``idk`` and ``dpo``, the same
questions with "I don't know" answers. Everything the objective differentiates goes through the model in one forward
(the batches concatenated); the teacher π0 — the same model with its LoRA adapter disabled, so no copy is held — in
one more, without gradients.

Every term is normalized by its count over the whole optimizer step — tokens for token means, sequences for sequence
means, over all micro-batches of gradient accumulation and all processes — so 1 micro-batch of 8 rows gives the
update of 8 micro-batches of 1, and 2 processes that of 1 process with both batches. The counts come from the step's
micro-batches, which the Trainer prefetches (``get_batch_samples``), in one reduction per step.
"""

import logging
import random
from typing import ClassVar

import torch
from peft import PeftModel
from trl import SFTTrainer

from llmreg._compat import add_signature_columns, log_metric, prepare_inputs
from llmreg.l1_penalty import L1PenaltyMixin
from llmreg.losses.kl import vocab_kl
from llmreg.losses.selfplay import sequence_logps
from llmreg.losses.unlearning import (
    dpo_unlearning_loss,
    ga_loss,
    gd_loss,
    idk_loss,
    kl_loss,
    nll,
    npo_loss,
    rmu_loss,
    scrub_loss,
)
from llmreg.scoring import selective_log_softmax
from llmreg.trainer_utils import (
    SFT_FORMATS,
    PrefetchedStepMixin,
    StepIndexedRows,
    adapter_layers,
    adapters_disabled,
    check_dataset_columns,
    loss_token_mask,
    prepare_side_dataset,
)
from llmreg.unlearn.unlearn_config import (
    IDK_ANSWERS,
    IDK_OBJECTIVES,
    RETAIN_OBJECTIVES,
    TEACHER_OBJECTIVES,
    UnlearnConfig,
)


logger = logging.getLogger(__name__)

ROW = "forget_row"  # the forget row's index, carried through the collator to find its "I don't know" answer
# What each objective differentiates (forget, retain, idk batches) and what it asks of the teacher.
GRAD_BATCHES = {"ga": ("forget",), "gd": ("forget", "retain"), "kl": ("forget", "retain"), "idk": ("idk", "retain"),
                "npo": ("forget",), "dpo": ("idk", "forget"), "scrub": ("forget", "retain"),
                "rmu": ("forget", "retain")}
TEACHER_BATCHES = {"kl": ("retain",), "npo": ("forget",), "dpo": ("idk", "forget"), "scrub": ("forget", "retain"),
                   "rmu": ("retain",)}
# The step-wide counts that normalize the terms.
COUNTS = ("forget_tokens", "forget_sequences", "retain_tokens", "retain_attended", "idk_tokens")


class _RowIndexCollator:
    """SFT's collator, passing the forget row index through as a tensor."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        if not examples or ROW not in examples[0]:
            return self.collator(examples)
        rows = torch.tensor([example[ROW] for example in examples])
        batch = self.collator([{k: v for k, v in example.items() if k != ROW} for example in examples])
        batch[ROW] = rows
        return batch


def _concatenated(batches: list[dict], pad_token_id: int) -> dict:
    """One batch of several (right-padded to the longest), for a single forward."""
    length = max(b["input_ids"].shape[1] for b in batches)

    def pad(tensor, value):
        return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)

    return {"input_ids": torch.cat([pad(b["input_ids"], pad_token_id) for b in batches]),
            "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
            "labels": torch.cat([pad(b["labels"], -100) for b in batches])}


class UnlearnTrainer(PrefetchedStepMixin, L1PenaltyMixin, SFTTrainer):
    """Unlearning with CLEAR's objectives and ℓ1 penalty (https://arxiv.org/abs/2410.18057).

    >>> from peft import LoraConfig
    >>> from llmreg.unlearn import UnlearnConfig, UnlearnTrainer
    >>> from llmreg.lab import ensure_lab_model, facts_dataset
    >>> args = UnlearnConfig("outputs/unlearn", objective="npo", l1_lambda=0.01)
    >>> trainer = UnlearnTrainer(str(ensure_lab_model()), args=args, forget_dataset=facts_dataset("forget"),
    ...                          retain_dataset=facts_dataset("retain"), peft_config=LoraConfig(r=8, lora_alpha=32))
    >>> trainer.train()
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sft", "unlearning", "llmreg"]
    _name = "Unlearn"

    def __init__(self, model, args: UnlearnConfig | None = None, forget_dataset=None, retain_dataset=None,
                 **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = UnlearnConfig(f"{name.split('/')[-1]}-Unlearn")
        if not isinstance(args, UnlearnConfig):
            raise TypeError(f"UnlearnTrainer needs an UnlearnConfig, got {type(args).__name__}: the objective and "
                            "l1_lambda live there.")
        if "train_dataset" in kwargs:
            raise TypeError("UnlearnTrainer takes forget_dataset (the rows to unlearn) and retain_dataset, not "
                            "train_dataset.")
        objective = args.objective
        if forget_dataset is None:
            raise ValueError("UnlearnTrainer needs forget_dataset: the rows to unlearn, in one of SFT's formats.")
        forget_format = check_dataset_columns(forget_dataset, SFT_FORMATS, "Unlearning (forget_dataset)")
        if objective in IDK_OBJECTIVES and forget_format != "prompt-completion":
            raise ValueError(f"Objective {objective!r} answers the forget questions with 'I don't know', so "
                             "forget_dataset needs `prompt` and `completion` columns (prompt-completion format), "
                             f"not the {forget_format} format.")
        if objective in RETAIN_OBJECTIVES and retain_dataset is None:
            raise ValueError(f"Objective {objective!r} keeps the retain set: pass retain_dataset (or use ga or npo, "
                             "which read the forget set alone).")
        if objective not in RETAIN_OBJECTIVES and retain_dataset is not None:
            raise ValueError(f"Objective {objective!r} does not read the retain set, so retain_dataset would be "
                             f"ignored: drop it, or use an objective that keeps it ({', '.join(RETAIN_OBJECTIVES)}).")
        if retain_dataset is not None:
            check_dataset_columns(retain_dataset, SFT_FORMATS, "Unlearning (retain_dataset)")
        if ROW in forget_dataset.column_names:
            raise ValueError(f"forget_dataset has a column {ROW!r}, which UnlearnTrainer uses itself: rename it.")
        idk_source = forget_dataset
        forget_dataset = forget_dataset.add_column(ROW, list(range(len(forget_dataset))))
        super().__init__(model, args=args, train_dataset=forget_dataset, l1_lambda=args.l1_lambda, **kwargs)
        self.data_collator = _RowIndexCollator(self.data_collator)
        # The returned loss is already this micro-batch's share of the step's mean (see _step_counts).
        self.loss_is_scaled_for_ga = True

        unwrapped = self.accelerator.unwrap_model(self.model)
        if objective in TEACHER_OBJECTIVES and not isinstance(unwrapped, PeftModel):
            raise ValueError(f"Objective {objective!r} compares with the original model, which UnlearnTrainer gets "
                             "by disabling the unlearning LoRA adapter (no copy in memory): pass a peft_config "
                             "(CLEAR trains a fresh LoRA, r=8, alpha=32, on all linear layers), or use ga, gd or idk.")
        if objective == "rmu":
            self._check_rmu_layers(unwrapped)
        # The teacher is the model with the adapter disabled: its layers, found once (PeftModel.disable_adapter walks
        # every module and checks every parameter on each call, milliseconds a step).
        self._adapter_layers = adapter_layers(unwrapped) if isinstance(unwrapped, PeftModel) else []
        self._retain_rows = self._idk_rows = None
        if retain_dataset is not None:
            self._retain_rows = prepare_side_dataset(self, retain_dataset, "retain")
            try:
                batch_size = args.retain_batch_size or args.per_device_train_batch_size
                self._retain_indices = StepIndexedRows(len(self._retain_rows), batch_size,
                                                       self.accelerator.num_processes,
                                                       self.accelerator.process_index, args.seed)
            except ValueError as error:
                raise ValueError(f"retain_dataset is too small: {error} Use more retain data or a smaller "
                                 "retain_batch_size.") from None
        if objective in IDK_OBJECTIVES:
            answers, rng = args.idk_answers or IDK_ANSWERS, random.Random(f"idk-{args.seed}")
            chosen = [rng.choice(answers) for _ in range(len(idk_source))]
            conversational = isinstance(idk_source[0]["completion"], list)
            idk = idk_source.select_columns(["prompt"]).add_column(
                "completion", [[{"role": "assistant", "content": a}] if conversational else a for a in chosen])
            self._idk_rows = prepare_side_dataset(self, idk, "idk")
            if len(self._idk_rows) != len(idk):
                raise ValueError("Preparing the 'I don't know' answers dropped rows, so they no longer line up with "
                                 "forget_dataset.")
        self._control = None  # RMU's u, drawn at the first step
        self._queue: list[dict] = []  # (side batches, counts) per remaining micro-batch of the step

    def _check_rmu_layers(self, model) -> None:
        num_layers = model.config.num_hidden_layers
        if self.args.rmu_layer >= num_layers:
            raise ValueError(f"rmu_layer is {self.args.rmu_layer}, but the model has {num_layers} decoder layers "
                             f"(0 to {num_layers - 1}): pick one of them.")
        beyond = [name for name, p in model.named_parameters() if p.requires_grad and any(
            f"layers.{i}." in name for i in range(self.args.rmu_layer + 1, num_layers))]
        beyond += [name for name, p in model.named_parameters() if p.requires_grad and "layers." not in name]
        if beyond:
            raise ValueError(f"RMU's loss reads the output of decoder layer {self.args.rmu_layer}, so it does not "
                             f"reach {len(beyond)} trainable parameters after it (e.g. {beyond[0]}): train only "
                             f"layers 0 to {self.args.rmu_layer}, e.g. LoraConfig(layers_to_transform="
                             f"list(range({self.args.rmu_layer + 1})), ...).")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        add_signature_columns(self, [ROW])

    # --- the step's side batches and counts --------------------------------------------------------------------------

    def _side_batch(self, rows, indices: list[int]) -> dict:
        return prepare_inputs(self, self.data_collator(list(rows.select(indices))))

    def _plan_step(self, forget_batches: list[dict]) -> list[dict]:
        """The side batches of each micro-batch of the step and the step-wide counts (one reduction)."""
        objective, step = self.args.objective, self.state.global_step
        accumulation = self.args.gradient_accumulation_steps
        plans, counts = [], torch.zeros(len(COUNTS), dtype=torch.float64)
        for micro, forget in enumerate(forget_batches):
            plan = {"forget": forget}
            counts[0] += loss_token_mask(forget).sum().item()
            counts[1] += len(forget["input_ids"])
            if objective in RETAIN_OBJECTIVES:
                plan["retain"] = self._side_batch(self._retain_rows, self._retain_indices(step * accumulation + micro))
                counts[2] += loss_token_mask(plan["retain"]).sum().item()
                counts[3] += plan["retain"]["attention_mask"].sum().item()
            if objective in IDK_OBJECTIVES:
                plan["idk"] = self._side_batch(self._idk_rows, forget[ROW].tolist())
                counts[4] += loss_token_mask(plan["idk"]).sum().item()
            plans.append(plan)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts.to(self.accelerator.device), reduction="sum").cpu()
        for plan in plans:
            plan["counts"] = dict(zip(COUNTS, counts.tolist(), strict=True))
        return plans

    # --- the loss ----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the plain SFT loss of the eval dataset
            inputs = {k: v for k, v in inputs.items() if k != ROW}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self._queue:  # the step's first micro-batch
            self._queue = self._plan_step([prepare_inputs(self, b) for b in self.take_step_batches(inputs)])
        plan = self._queue.pop(0)
        loss, metrics = self._objective(model, plan)
        # Each metric is this micro-batch's mean over all processes: the local means weighted by their token (or
        # sequence) counts, so the log is the global batch's value, not an average of per-process averages.
        totals = torch.tensor([[value * weight, weight] for value, weight in metrics.values()],
                              dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        for name, (total, weight) in zip(metrics, totals.tolist(), strict=True):
            log_metric(self, "train", f"unlearn/{name}", total / weight if weight else 0.0)
        # DDP and DeepSpeed average gradients over processes; each process's share is of the global mean.
        loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _forward(self, model, batches: list[dict], hidden: bool):
        """Logits (and, for RMU, the steered layer's output) of several batches in one forward, split back."""
        joined = _concatenated(batches, self.processing_class.pad_token_id)
        with self.compute_loss_context_manager():
            output = model(input_ids=joined["input_ids"], attention_mask=joined["attention_mask"], use_cache=False,
                           output_hidden_states=hidden)
        sizes = [len(b["input_ids"]) for b in batches]
        length = [b["input_ids"].shape[1] for b in batches]
        logits = [chunk[:, :t] for chunk, t in zip(output.logits.split(sizes), length, strict=True)]
        states = None
        if hidden:
            layer = output.hidden_states[self.args.rmu_layer + 1]  # [0] is the embeddings
            states = [chunk[:, :t] for chunk, t in zip(layer.split(sizes), length, strict=True)]
        return logits, states

    def _teacher_forward(self, model, batches: list[dict], hidden: bool):
        with adapters_disabled(self._adapter_layers), torch.no_grad():
            return self._forward(model, batches, hidden)

    def _objective(self, model, plan: dict) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        """The micro-batch's loss share, and its metrics as (local mean, the number of tokens or sequences)."""
        objective, beta, counts = self.args.objective, self.args.objective_beta, plan["counts"]
        names = GRAD_BATCHES[objective]
        rmu = objective == "rmu"
        logits, states = self._forward(model, [plan[n] for n in names], hidden=rmu)
        logits, states = dict(zip(names, logits, strict=True)), dict(zip(names, states or [None] * len(names),
                                                                         strict=True))
        teacher_names = TEACHER_BATCHES.get(objective, ())
        teacher_logits = teacher_states = {}
        if teacher_names:
            t_logits, t_states = self._teacher_forward(model, [plan[n] for n in teacher_names], hidden=rmu)
            teacher_logits = dict(zip(teacher_names, t_logits, strict=True))
            teacher_states = dict(zip(teacher_names, t_states or [None] * len(teacher_names), strict=True))

        cache = {}

        def token_logps(source, name):  # once per batch and model: a log-softmax over the vocabulary
            key = (source is logits, name)
            if key not in cache:
                labels = plan[name]["labels"][:, 1:]
                cache[key] = selective_log_softmax(source[name][:, :-1], labels.clamp(min=0)), labels != -100
            return cache[key]

        def local_mean(share, mask, count):
            """The batch's own token mean, from its share of the step's: share · (step count) / (batch count)."""
            return share.detach() * counts[count] / mask.sum().clamp(min=1), mask.sum()

        def ce(name, count):
            logps, mask = token_logps(logits, name)
            share = nll(logps, mask, counts[count])
            return share, local_mean(share, mask, count)

        def kl(p_source, q_source, name, count):
            mask = loss_token_mask(plan[name])
            share = vocab_kl(p_source[name][:, :-1], q_source[name][:, :-1], mask, counts[count])
            return share, local_mean(share, mask, count)

        def seq_logps(source, name):
            logps, mask = token_logps(source, name)
            return sequence_logps(logps, mask)

        metrics = {}
        if objective in ("ga", "gd", "kl"):
            forget_ce, metrics["forget_nll"] = ce("forget", "forget_tokens")
            if objective == "ga":
                loss = ga_loss(forget_ce)
            elif objective == "gd":
                retain_ce, metrics["retain_nll"] = ce("retain", "retain_tokens")
                loss = gd_loss(forget_ce, retain_ce, beta)
            else:
                retain_kl, metrics["retain_kl"] = kl(teacher_logits, logits, "retain", "retain_tokens")
                loss = kl_loss(forget_ce, retain_kl)
        elif objective == "idk":
            idk_ce, metrics["idk_nll"] = ce("idk", "idk_tokens")
            retain_ce, metrics["retain_nll"] = ce("retain", "retain_tokens")
            loss = idk_loss(idk_ce, retain_ce)
        elif objective == "npo":
            policy, reference = seq_logps(logits, "forget"), seq_logps(teacher_logits, "forget")
            loss = npo_loss(policy, reference, beta, counts["forget_sequences"])
            metrics["forget_logratio"] = (policy - reference).detach().mean(), len(policy)
        elif objective == "dpo":
            policy_idk, policy_forget = seq_logps(logits, "idk"), seq_logps(logits, "forget")
            ref_idk, ref_forget = seq_logps(teacher_logits, "idk"), seq_logps(teacher_logits, "forget")
            loss = dpo_unlearning_loss(policy_idk, policy_forget, ref_idk, ref_forget, beta,
                                       counts["forget_sequences"])
            margin = (policy_idk - policy_forget) - (ref_idk - ref_forget)
            metrics["margin"] = margin.detach().mean(), len(policy_idk)
        elif objective == "scrub":
            forget_kl, metrics["forget_kl"] = kl(logits, teacher_logits, "forget", "forget_tokens")
            retain_kl, metrics["retain_kl"] = kl(logits, teacher_logits, "retain", "retain_tokens")
            retain_ce, metrics["retain_nll"] = ce("retain", "retain_tokens")
            loss = scrub_loss(forget_kl, retain_kl, retain_ce, beta)
        else:  # rmu
            forget, retain = plan["forget"], plan["retain"]
            loss = rmu_loss(states["forget"], forget["attention_mask"], self._control_vector(states["forget"]),
                            states["retain"], teacher_states["retain"], retain["attention_mask"], beta,
                            num_forget_sequences=counts["forget_sequences"],
                            num_retain_tokens=counts["retain_attended"])
            norms = states["forget"].detach().norm(dim=-1)
            metrics["forget_hidden_norm"] = norms.mean(), norms.numel()
        if objective in ("npo", "dpo", "scrub") and "forget_nll" not in metrics:
            logps, mask = token_logps(logits, "forget")
            metrics["forget_nll"] = nll(logps, mask).detach(), mask.sum()
        return loss, {name: (float(value), float(weight)) for name, (value, weight) in metrics.items()}

    def _control_vector(self, like: torch.Tensor) -> torch.Tensor:
        """RMU's u = c·r/‖r‖, r uniform in [0, 1)^d, drawn once from the seed (the same on every process)."""
        if self._control is None:
            generator = torch.Generator().manual_seed(self.args.seed)
            direction = torch.rand(like.shape[-1], generator=generator, dtype=torch.float64)
            self._control = (self.args.rmu_steering_coeff * direction / direction.norm()).float()
        return self._control.to(like.device, like.dtype)
