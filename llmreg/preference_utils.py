"""What the self-play trainers (RSPO, SPIN) share on top of TRL's DPOTrainer: log-prob columns of other models.

Both losses compare the policy with several frozen models: the previous iterate π_t, the fixed base model μ, and for
fictitious play older iterates. Holding them all in memory is what makes the reference code need three 7B models.
Here each frozen model is loaded once, before training, to write its sequence log-probs of every chosen and rejected
response into dataset columns (``<prefix>_chosen_logps``, ``<prefix>_rejected_logps``), with a progress bar and an
on-disk cache keyed by the dataset and the model's weight files; then it is freed. π_t needs no load at all: it is the
policy's own initial weights, which TRL's ``precompute_ref_log_probs`` turns into ``ref_chosen_logps`` /
``ref_rejected_logps``. During training, these columns travel through TRL's collator (which drops unknown keys) as
float tensors.
"""

import gc
import hashlib
import logging
import os
from pathlib import Path

import pyarrow.compute as pc
import torch
from accelerate.utils import broadcast_object_list, gather_object, tqdm
from datasets import Dataset, concatenate_datasets, load_from_disk
from torch.utils.data import DataLoader
from trl import DPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp

from llmreg._compat import (
    Hasher,
    add_fused_lm_head,
    add_signature_columns,
    create_model_from_path,
    dataset_cache_file_path,
    dataset_fingerprint,
    disable_dropout_in_model,
    has_indices_mapping,
    log_metric,
    pad,
)
from llmreg.losses.selfplay import sequence_logps


logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "completion_mask")
BASE_SAMPLE_PREFIX = "base_sample_"


class ColumnPassingCollator:
    """Wraps TRL's ``DataCollatorForPreference`` and adds the float columns it would drop, as tensors.

    ``columns`` are scalar or fixed-length list columns (e.g. win probabilities, precomputed log-probs). A
    ``base_completion_ids`` column (responses sampled from the base model, for RSPO's forward KL on samples), with
    ``base_prompt_ids`` (the prompt as tokenized together with that sample, which can end a token before the pair's
    ``prompt_ids``), becomes a second padded batch: ``base_sample_input_ids`` / ``base_sample_attention_mask`` /
    ``base_sample_completion_mask``.
    """

    def __init__(self, collator, columns: tuple[str, ...], pad_token_id: int):
        self.collator = collator
        self.columns = columns
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        for column in self.columns:
            if column in examples[0]:
                batch[column] = torch.tensor([example[column] for example in examples], dtype=torch.float32)
        if "base_completion_ids" in examples[0]:
            ids = [example["base_prompt_ids"] + example["base_completion_ids"] for example in examples]
            masks = [[0] * len(example["base_prompt_ids"]) + [1] * len(example["base_completion_ids"])
                     for example in examples]
            batch[f"{BASE_SAMPLE_PREFIX}input_ids"] = pad([torch.tensor(i) for i in ids], self.pad_token_id)
            batch[f"{BASE_SAMPLE_PREFIX}attention_mask"] = pad([torch.ones(len(i), dtype=torch.long) for i in ids], 0)
            batch[f"{BASE_SAMPLE_PREFIX}completion_mask"] = pad([torch.tensor(m) for m in masks], 0)
        return batch


def token_fingerprint(dataset: Dataset) -> str:
    """A hash of the tokenized pairs' content (prompt, chosen and rejected ids), for caching per-row columns.

    Not ``dataset._fingerprint``: after TRL's ``_prepare_dataset`` that depends on every training argument (its
    ``filter`` closes over the config), so a new output directory or learning rate would miss the cache.
    """
    digest = hashlib.sha256()
    tokens = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    table = (tokens.flatten_indices() if has_indices_mapping(tokens) else tokens).data.table
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        column = table.column(name).combine_chunks()
        # The values and the lengths, as plain numbers: arrow's buffers also depend on offsets and chunking.
        digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype("int64").tobytes())
        digest.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return digest.hexdigest()


def weights_fingerprint(model_name_or_path: str) -> str:
    """A cheap identity for a model's weights: the path and the names, sizes and times of its weight files."""
    path = Path(model_name_or_path)
    if not path.is_dir():
        return model_name_or_path  # a hub id: resolved to a fixed snapshot by the cache
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})
    return str(path.resolve()) + "|" + "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


class PrecomputedColumnsDPOTrainer(DPOTrainer):
    """DPOTrainer that keeps extra float columns through collation and precomputes other models' log-probs.

    Subclasses set ``extra_columns`` (the columns their loss reads) and call ``precompute_model_logps`` for each
    frozen model; ``policy_sequence_logps`` runs the policy forward once for the [chosen; rejected] batch.
    """

    extra_columns: tuple[str, ...] = ()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        add_signature_columns(self, (*self.extra_columns, "base_prompt_ids", "base_completion_ids"))

    def wrap_collator(self) -> None:
        """Called at the end of the subclass ``__init__``: from then on batches carry ``extra_columns``."""
        if not isinstance(self.data_collator, ColumnPassingCollator):
            self.data_collator = ColumnPassingCollator(self.data_collator, self.extra_columns,
                                                       self.data_collator.pad_token_id)

    def on_shared_disk(self, dataset: Dataset, name: str) -> Dataset:
        """``dataset``, stored where every process reads the same cache files.

        The log-prob precomputes (TRL's for π_t, ``precompute_model_logps`` for the others) write their columns to a
        cache file next to the dataset's own, from the main process, and every process then reads that file. A
        dataset built in memory (``Dataset.from_dict``) has its cache files in each process's own temporary
        directory, where the other processes would look for the file in vain. Such a dataset is saved once under
        ``output_dir/datasets`` and every process loads it from there.
        """
        if self.accelerator.num_processes == 1:
            return dataset
        directories = gather_object([os.path.dirname(dataset_cache_file_path(dataset, "probe"))])
        if len(set(directories)) == 1:
            return dataset
        home = [str(Path(self.args.output_dir) / "datasets" / f"{name}-{dataset_fingerprint(dataset)}")]
        broadcast_object_list(home, from_process=0)
        if self.accelerator.is_main_process and not (Path(home[0]) / "state.json").is_file():
            dataset.save_to_disk(home[0])
        self.accelerator.wait_for_everyone()
        return load_from_disk(home[0])

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return super()._precompute_ref_logps(self.on_shared_disk(dataset, name), name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        # TRL passes every batch key except its own to the model: drop the extra columns first.
        return super().compute_ref_log_probs(model, {k: inputs[k] for k in MODEL_INPUT_KEYS})

    def policy_sequence_logps(self, model, inputs: dict, prefix: str = "") -> tuple[torch.Tensor, object]:
        """ℓ_θ(y) of every row of the batch (sum over completion tokens), through TRL's fused log-prob head."""
        input_ids, completion_mask = inputs[f"{prefix}input_ids"], inputs[f"{prefix}completion_mask"]
        attention_mask = inputs[f"{prefix}attention_mask"]
        model_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        shift_mask = completion_mask[:, 1:]
        per_token_logps = outputs.log_probs[:, -shift_mask.size(1):]  # prompt-learning PEFT prepends tokens
        return sequence_logps(per_token_logps, shift_mask), outputs

    def iterate_logps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """ℓ_{π_t} of chosen and rejected: precomputed columns, or a no-grad forward of TRL's reference."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, inputs)

    def load_frozen_model(self, model_name_or_path: str):
        """A frozen model prepared for inference the way TRL prepares its reference model (sharded under ZeRO-3)."""
        init_kwargs = dict(self.args.model_init_kwargs or {})
        if self.args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            init_kwargs["device_map"] = None
        init_kwargs.setdefault("dtype", self.model.dtype)
        init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        model = create_model_from_path(model_name_or_path, **init_kwargs)
        model.requires_grad_(False)
        disable_dropout_in_model(model)
        add_fused_lm_head(model)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(model, self.accelerator)
        # Not accelerator.prepare_model: it would keep a reference (accelerator._models) and the model alive after
        # the precompute. Evaluation needs no DDP wrapper anyway; the forward runs under accelerator.autocast().
        return model.to(self.accelerator.device).eval()

    @torch.no_grad()
    def frozen_sequence_logps(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """ℓ of chosen and rejected under a frozen model loaded by ``load_frozen_model``."""
        with self.accelerator.autocast():
            logps, _ = self.policy_sequence_logps(model, inputs)
        return logps.chunk(2)

    def precompute_model_logps(self, dataset: Dataset, model_name_or_path: str, prefix: str, name: str,
                               batch_size: int) -> Dataset:
        """``dataset`` plus ``<prefix>_chosen_logps`` / ``<prefix>_rejected_logps`` of the model at the path.

        Runs on all ranks (each scores its shard; the results are gathered), caches the columns next to the dataset's
        own cache files keyed by the dataset fingerprint and the weight files, and frees the model afterwards.
        """
        dataset = self.on_shared_disk(dataset, name)
        fingerprint = [Hasher.hash((token_fingerprint(dataset), weights_fingerprint(model_name_or_path), prefix,
                                    str(self.model.dtype)))]
        broadcast_object_list(fingerprint, from_process=0)
        cache_file = dataset_cache_file_path(dataset, fingerprint[0])
        if not os.path.exists(cache_file):
            model = self.load_frozen_model(model_name_or_path)
            loader = self.accelerator.prepare(DataLoader(
                dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]), batch_size=batch_size,
                collate_fn=self.data_collator, shuffle=False))
            chosen, rejected = [], []
            for batch in tqdm(loader, desc=f"Computing {prefix} log-probs for the {name} dataset"):
                chosen_logps, rejected_logps = self.accelerator.gather_for_metrics(
                    self.frozen_sequence_logps(model, batch))
                chosen.append(chosen_logps.float().cpu())
                rejected.append(rejected_logps.float().cpu())
            del model, loader
            gc.collect()
            if torch.accelerator.is_available():
                torch.accelerator.empty_cache()
            chosen, rejected = torch.cat(chosen), torch.cat(rejected)
            if self.accelerator.is_main_process:
                dataset.map(lambda _, indices: {f"{prefix}_chosen_logps": chosen[indices],
                                                f"{prefix}_rejected_logps": rejected[indices]},
                            with_indices=True, batched=True, remove_columns=dataset.column_names,
                            new_fingerprint=fingerprint[0], cache_file_name=cache_file,
                            desc=f"Caching {prefix} log-probs for the {name} dataset")
            self.accelerator.wait_for_everyone()
        else:
            logger.info("Using cached %s log-probs for the %s dataset (%s)", prefix, name, cache_file)
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    def with_model_logps(self, dataset, model_name_or_path: str, prefix: str, name: str, batch_size: int):
        """``precompute_model_logps`` for a dataset or a dict of them; columns already there are kept as they are."""
        if isinstance(dataset, dict):
            return {key: self.with_model_logps(split, model_name_or_path, prefix, f"{name}[{key}]", batch_size)
                    for key, split in dataset.items()}
        if {f"{prefix}_chosen_logps", f"{prefix}_rejected_logps"} <= set(dataset.column_names):
            logger.info("The %s dataset already has %s log-probs columns; using them.", name, prefix)
            return dataset
        return self.precompute_model_logps(dataset, model_name_or_path, prefix, name, batch_size)

    def with_logps_columns(self, model_name_or_path: str, prefix: str) -> None:
        """Add ``<prefix>_*_logps`` of the model at the path to the train and eval datasets."""
        batch_size = self.args.precompute_ref_batch_size
        self.train_dataset = self.with_model_logps(self.train_dataset, model_name_or_path, prefix, "train",
                                                   batch_size or self.args.per_device_train_batch_size)
        if self.eval_dataset is not None:
            self.eval_dataset = self.with_model_logps(self.eval_dataset, model_name_or_path, prefix, "eval",
                                                      batch_size or self.args.per_device_eval_batch_size)

    def setup_base_model(self, needed: bool) -> None:
        """The base model μ (``args.base_model_name_or_path``): precomputed columns, a live model, or π_t itself."""
        self.base_model = None
        self.base_is_initial_policy = self.args.base_model_name_or_path is None
        if not needed:
            return
        if self.base_is_initial_policy:
            logger.info("base_model_name_or_path is None: the base model μ is the initial policy π_t (first "
                        "iteration), so π_t's log-probs stand for μ's.")
        elif self.args.precompute_base_log_probs:
            self.with_logps_columns(self.args.base_model_name_or_path, "base")
        else:
            self.base_model = self.load_frozen_model(self.args.base_model_name_or_path)

    def base_logps(self, inputs: dict, iter_chosen: torch.Tensor, iter_rejected: torch.Tensor):
        """ℓ_μ of chosen and rejected, from wherever ``setup_base_model`` put μ."""
        if self.base_is_initial_policy:
            return iter_chosen, iter_rejected
        if self.base_model is None:
            return inputs["base_chosen_logps"], inputs["base_rejected_logps"]
        return self.frozen_sequence_logps(self.base_model, inputs)

    def log_batch_means(self, mode: str, values: dict[str, torch.Tensor]) -> None:
        """Means over the whole batch on all ranks of equally long (B,) tensors, with one reduction."""
        sums = torch.stack([v.detach().float().sum() for v in values.values()])
        count = torch.tensor(float(next(iter(values.values())).numel()), device=sums.device)
        totals = self.accelerator.reduce(torch.cat([sums, count[None]]), reduction="sum")
        for index, name in enumerate(values):
            log_metric(self, mode, name, (totals[index] / totals[-1]).item())
