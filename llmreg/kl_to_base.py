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
states). Logged: ``kl_to_base/kl``, each micro-batch's token mean over its tokens on every process, averaged over
the logging interval's micro-batches as the Trainer averages its metrics (so with gradient accumulation it is not the
step's token mean; the loss is).

With ``kl_to_base_top_k`` = k > 0 the base is not run during training: its k most likely tokens and their
log-probabilities at every answer token are precomputed once, over the training (and evaluation) rows as the collator
builds them, as TRL's preference trainers precompute their reference log-probabilities; they ride in the batches
(two dataset columns). The KL is then between the base's and the model's distributions coarse-grained to those k
tokens and one outcome for the rest (``llmreg.losses.kl.top_k_kl``): at most the exact KL, equal to it for k = the
vocabulary. No copy of the model in full fine-tuning, no extra forward with LoRA: the step costs what SFT's does.
"""

import contextlib
import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from peft import PeftModel
from tqdm.auto import tqdm
from trl import SFTTrainer

from llmreg._compat import add_signature_columns, independent_copy, log_metric
from llmreg.losses.aggregation import aggregate
from llmreg.losses.kl import top_k_kl_per_token, vocab_kl_per_token
from llmreg.trainer_utils import adapter_layers, adapters_disabled, is_zero3, loss_token_mask


DIRECTIONS = ("forward", "reverse")
TOP_K_COLUMNS = ("base_top_k_ids", "base_top_k_logps")  # per row: one list of k per answer token


@dataclass
class KLToBaseConfig:
    """The KL-to-base term's weight and direction. See the module docstring."""

    kl_to_base_beta: float = field(default=0.0, metadata={"help": "β of the KL to the base model (0: off)."})
    kl_to_base_direction: str = field(
        default="forward", metadata={"help": "forward: KL(base‖model), distillation from the base; reverse: "
                                             "KL(model‖base), RLHF's direction."}
    )

    kl_to_base_top_k: int = field(
        default=0, metadata={"help": "0: the exact KL over the vocabulary, against the base run at every step (the "
                                     "adapter disabled with LoRA, a frozen copy in full fine-tuning). k > 0: the "
                                     "base's k most likely tokens at every answer token, precomputed once; the KL "
                                     "between the distributions coarse-grained to them and the rest (at most the "
                                     "exact KL), with no copy and no extra forward."}
    )

    def __post_init__(self):
        if self.kl_to_base_top_k < 0:
            raise ValueError(f"kl_to_base_top_k must be >= 0 (0: the exact KL), got {self.kl_to_base_top_k}.")
        if self.kl_to_base_direction not in DIRECTIONS:
            raise ValueError(f"Unknown kl_to_base_direction {self.kl_to_base_direction!r}; valid: "
                             f"{', '.join(DIRECTIONS)}.")
        if self.kl_to_base_beta < 0:
            raise ValueError(f"kl_to_base_beta must be >= 0, got {self.kl_to_base_beta}.")


class KLToBaseMixin:
    """See the module docstring. Goes before an SFT-style trainer class; β = 0 changes nothing."""

    def __init__(self, *args, kl_to_base: KLToBaseConfig | None = None, **kwargs):
        config = kl_to_base if kl_to_base is not None else KLToBaseConfig()
        self.kl_to_base = config  # before the Trainer's __init__, which may read the dataset columns to keep
        super().__init__(*args, **kwargs)
        self._frozen_base = None
        # id(the model as compute_loss gets it) → (it, unwrapped, its adapter layers): found once per model, as
        # unwrapping reads the installed packages' metadata (milliseconds a call). Wrapped (DDP) in the Trainer's step,
        # unwrapped in a weight perturbation's first pass. With LoRA the base is the adapter disabled.
        self._unwrapped = {}
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
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if base.config.get_text_config().to_dict().get("final_logit_softcapping"):
            raise ValueError("The KL to the base rebuilds the logits from the last hidden state and the output "
                             "embedding; this model caps its logits (final_logit_softcapping), which that would miss.")
        if config.kl_to_base_top_k:
            self._precompute_base_top_k()
        elif not isinstance(model, PeftModel):
            if is_zero3(self.accelerator):
                raise ValueError("The KL to the base in full fine-tuning keeps a frozen copy of the starting model, "
                                 "which ZeRO-3 shards; use a LoRA adapter under ZeRO-3 (the base is the adapter "
                                 "disabled).")
            self._frozen_base = independent_copy(model).eval().requires_grad_(False)

    def _precompute_base_top_k(self) -> None:
        k = self.kl_to_base.kl_to_base_top_k
        if is_zero3(self.accelerator):
            raise ValueError("The base's top-k log-probabilities are precomputed before training, with the model "
                             "whole, and ZeRO-3 has sharded it by then: use kl_to_base_top_k=0 with a LoRA adapter "
                             "under ZeRO-3.")
        if self.args.packing:
            raise ValueError("The base's top-k log-probabilities are precomputed per row, and packing joins rows into "
                             "others: use kl_to_base_top_k=0, or packing=False.")
        datasets = {"train": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            datasets.update({f"eval {name}": data for name, data in self.eval_dataset.items()})
        elif self.eval_dataset is not None:
            datasets["eval"] = self.eval_dataset
        if not all(isinstance(data, Dataset) for data in datasets.values()):
            raise TypeError("The base's top-k log-probabilities are precomputed over the rows of a datasets.Dataset; "
                            "an iterable dataset has no rows to index. Use kl_to_base_top_k=0.")
        done = {name: with_base_top_k(self, data, k, name) for name, data in datasets.items()}
        self.train_dataset = done["train"]
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name: done[f"eval {name}"] for name in self.eval_dataset}
        elif self.eval_dataset is not None:
            self.eval_dataset = done["eval"]
        self.data_collator = BaseTopKCollator(self.data_collator, k)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.kl_to_base.kl_to_base_beta and self.kl_to_base.kl_to_base_top_k:
            add_signature_columns(self, TOP_K_COLUMNS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        beta = self.kl_to_base.kl_to_base_beta
        top_k = None
        if TOP_K_COLUMNS[0] in inputs:  # the model's forward does not take the precomputed columns
            inputs = dict(inputs)
            top_k = tuple(inputs.pop(column) for column in TOP_K_COLUMNS)
        if beta == 0:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self.kl_to_base.kl_to_base_top_k and top_k is None:
            raise ValueError("This batch lacks the base's precomputed top-k (kl_to_base_top_k): its rows are not the "
                             "training or evaluation rows they were precomputed for.")
        found = self._unwrapped.get(id(model))
        if found is None or found[0] is not model:
            unwrapped = self.accelerator.unwrap_model(model)
            found = (model, unwrapped, adapter_layers(unwrapped) if isinstance(unwrapped, PeftModel) else [])
            self._unwrapped[id(model)] = found
        _, unwrapped, adapters = found
        base = unwrapped.get_base_model() if isinstance(unwrapped, PeftModel) else unwrapped
        hidden = []
        handle = base.get_decoder().register_forward_hook(lambda module, args, out: hidden.append(out[0]))
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            handle.remove()
        # Only the answer tokens' logits are needed: the last hidden states there, through the output embedding.
        mask = loss_token_mask(inputs)
        logits = base.get_output_embeddings()(hidden[-1][:, :-1][mask])
        every = torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        direction = self.kl_to_base.kl_to_base_direction
        if top_k is not None:
            if len(top_k[0]) != len(logits):
                raise RuntimeError(f"The batch has {len(logits)} answer tokens but precomputed base top-k for "
                                   f"{len(top_k[0])}: its rows were changed after the precompute.")
            per_token = top_k_kl_per_token(logits, *top_k, direction)
        else:
            model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
            reference_model = self._frozen_base if self._frozen_base is not None else base
            with adapters_disabled(adapters) if self._frozen_base is None else contextlib.nullcontext(), \
                    torch.no_grad():
                base_hidden = reference_model.get_decoder()(**model_inputs, use_cache=False)[0]
                base_logits = reference_model.get_output_embeddings()(base_hidden[:, :-1][mask])
            pair = (base_logits, logits) if direction == "forward" else (logits, base_logits)
            per_token = vocab_kl_per_token(*pair)
        # As SFT's loss: over the step's answer tokens on every process, times the process count (DDP averages). The
        # per-token KL is made once, for the loss and the log.
        kl = aggregate(per_token, every, "token-mean", num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            kl = kl * self.accelerator.num_processes
        self._log_kl(per_token.detach().sum(), len(per_token))
        if return_outputs:
            loss, outputs = result
            return loss + beta * kl, outputs
        return result + beta * kl

    def _log_kl(self, total: torch.Tensor, tokens: int) -> None:
        totals = torch.stack([total.float(), torch.tensor(float(tokens), device=total.device)])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        mode = "train" if self.model.training else "eval"
        log_metric(self, mode, "kl_to_base/kl", (totals[0] / totals[1].clamp(min=1)).item())


def with_base_top_k(trainer, dataset: Dataset, k: int, name: str) -> Dataset:
    """``dataset`` (tokenized, as the trainer trains on it) with the base's k most likely tokens and their
    log-probabilities at each row's answer tokens, in order: the two ``TOP_K_COLUMNS``. The base is the model as it is
    now (its adapter disabled), without dropout. Each process scores every R-th row; the rows are gathered."""
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    device = next(model.parameters()).device
    # One row per batch when the collator flattens rows into one sequence (padding-free): the split below is by row.
    batch_size = 1 if trainer.args.padding_free else trainer.args.per_device_eval_batch_size
    mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    found = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext():
            for start in tqdm(range(0, len(mine), batch_size), desc=f"Base top-{k} ({name})",
                              disable=not accelerator.is_local_main_process):
                indices = mine[start:start + batch_size]
                batch = trainer.data_collator([dataset[i] for i in indices])
                mask = loss_token_mask(batch)
                model_inputs = {key: value.to(device) for key, value in batch.items()
                                if key in ("input_ids", "attention_mask", "position_ids")}
                hidden = base.get_decoder()(**model_inputs, use_cache=False)[0][:, :-1][mask.to(device)]
                logits = base.get_output_embeddings()(hidden)
                values, ids = logits.float().log_softmax(-1).topk(k, dim=-1)
                counts = mask.sum(1).tolist()
                for index, row_ids, row_values in zip(indices, ids.cpu().split(counts), values.cpu().split(counts)):
                    found[index] = (row_ids.tolist(), row_values.tolist())
    finally:
        model.train(was_training)
    if accelerator.num_processes > 1:
        found = {index: row for part in gather_object([found]) for index, row in part.items()}
    rows = [found[index] for index in range(len(dataset))]
    dataset = dataset.add_column(TOP_K_COLUMNS[0], [row[0] for row in rows])
    return dataset.add_column(TOP_K_COLUMNS[1], [row[1] for row in rows])


class BaseTopKCollator:
    """The trainer's collator, with the rows' precomputed base top-k concatenated over their answer tokens in batch
    order (the order of the loss's answer mask): two (answer tokens, k) tensors."""

    def __init__(self, collator, k: int):
        self.collator, self.k = collator, k

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator([{key: value for key, value in example.items() if key not in TOP_K_COLUMNS}
                               for example in examples])
        if not all(TOP_K_COLUMNS[0] in example for example in examples):
            return batch  # rows of another set (EWC's Fisher data, a side dataset): no KL is taken on them
        for column, dtype in zip(TOP_K_COLUMNS, (torch.long, torch.float32)):
            batch[column] = torch.tensor([token for example in examples for token in example[column]],
                                         dtype=dtype).reshape(-1, self.k)
        return batch


def with_kl_to_base(trainer_class: type) -> type:
    """``trainer_class`` with the KL-to-base term: a subclass with ``KLToBaseMixin`` first."""
    return type(f"KLToBase{trainer_class.__name__}", (KLToBaseMixin, trainer_class), {})
