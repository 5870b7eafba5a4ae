"""Every private or unexported symbol of TRL, transformers, accelerate, datasets, PEFT and huggingface_hub that llmreg
relies on, in one module (as TRL keeps ``trl/_compat.py``).

llmreg's trainers replace TRL internals (``_compute_loss``, ``_prepare_dataset``, ...) and read private state
(``_metrics``, a dataset's ``_fingerprint``). None of it is API: a minor release may rename it, change its arguments or
drop it, and llmreg would then fail deep inside training, or worse, train on quietly. So:

- ``CHECKED`` lists each such symbol with the signature it had when llmreg was written against it, what llmreg relies
  on, and the library version checked. ``tests/test_compat.py`` fails on any entry that no longer exists or whose
  signature changed, printing that note: the list of what to re-read when a library is upgraded.
- Private functions are imported from here; private attributes are read and written through the small functions
  below. A private method that a trainer overrides stays in the trainer (it must), and so do calls of it through
  ``super()`` inside that override, but its (class, name) is in ``CHECKED``.
- ``tests/test_compat.py`` also fails on a private symbol of these libraries used in llmreg/ or recipes/ outside this
  module, and on an override of a private library attribute missing from ``CHECKED``.

Upgrading a library: run ``pytest tests/test_compat.py``, read the failing notes, fix their users, update the entries.
"""

import copy
from contextlib import contextmanager
from dataclasses import dataclass

from datasets.fingerprint import Hasher
from transformers.integrations import deepspeed as hf_deepspeed
from trl.chat_template_utils import has_generation_markers
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model, pad


__all__ = [
    "CHECKED",
    "Checked",
    "Hasher",
    "accelerate_default_config_file",
    "add_fused_lm_head",
    "add_signature_columns",
    "create_model_from_path",
    "dataset_cache_file_path",
    "dataset_fingerprint",
    "disable_dropout_in_model",
    "has_generation_markers",
    "has_indices_mapping",
    "hf_deepspeed_config",
    "independent_copy",
    "log_metric",
    "logged_metrics",
    "metrics_discarded",
    "pad",
    "per_token_logps_and_entropies",
    "prepare_dataset",
    "prepare_inputs",
    "reset_accelerate_state",
    "training_loss",
]


@dataclass(frozen=True)
class Checked:
    """One private (or unexported) symbol llmreg relies on: ``owner.name``.

    ``owner`` is a dotted path (a module, or a class in one), so that listing a symbol imports nothing.
    ``signature`` is ``str(inspect.signature(owner.name))`` as it was checked; None for data (a class attribute, a
    module global, or an instance attribute that ``owner``'s source assigns).
    """

    owner: str
    name: str
    signature: str | None
    note: str  # what llmreg relies on, one line
    checked: str  # the version it was checked against


TRL, TRANSFORMERS, ACCELERATE, DATASETS, PEFT, HUB = (
    "TRL 1.16.0", "transformers 5.24.0", "accelerate 1.16.0", "datasets 5.2.0", "PEFT 0.21.2", "huggingface_hub 2.4.0")

CHECKED = [
    # --- TRL: unexported helpers, imported from here -----------------------------------------------------------------
    Checked("trl.trainer.utils", "pad",
            "(tensors: list[torch.Tensor], padding_value: int = 0, padding_side: str = 'right', "
            "pad_to_multiple_of: int | None = None) -> torch.Tensor",
            "ColumnPassingCollator right-pads the base-sample ids and masks (lists of 1-D tensors) with it", TRL),
    Checked("trl.trainer.utils", "create_model_from_path",
            "(model_id: str, architecture: transformers.models.auto.auto_factory._BaseAutoModelClass | None = None, "
            "**kwargs) -> transformers.modeling_utils.PreTrainedModel",
            "load_frozen_model loads μ and older iterates with args.model_init_kwargs, as TRL loads its reference",
            TRL),
    Checked("trl.trainer.utils", "disable_dropout_in_model", "(model: torch.nn.modules.module.Module) -> None",
            "load_frozen_model: frozen models score without dropout, as TRL's reference model does", TRL),
    Checked("trl.trainer.utils", "add_fused_lm_head",
            "(model: transformers.modeling_utils.PreTrainedModel, temperature: float = 1.0, "
            "cast_lm_head_to_fp32: bool = False, outputs: tuple[str, ...] = ('log_probs',)) -> None",
            "policy_sequence_logps calls model(..., labels=, fused_lm_head=True) and reads outputs.log_probs; it sets "
            "the instance's forward to a closure over the model, which independent_copy drops", TRL),
    Checked("trl.chat_template_utils", "has_generation_markers", "(chat_template: str | dict[str, str]) -> bool",
            "check_assistant_only_loss: whether SFTTrainer can mask a template's assistant turns", TRL),
    # --- TRL: the trainers' model card, set by every llmreg trainer --------------------------------------------------
    Checked("trl.trainer.base_trainer._BaseTrainer", "_tag_names", None,
            "llmreg's trainers set their own: the tags create_model_card writes", TRL),
    Checked("trl.trainer.base_trainer._BaseTrainer", "_name", None,
            "llmreg's trainers set their own: the trainer name create_model_card writes", TRL),
    Checked("trl.trainer.base_trainer._BaseTrainer", "_paper", None,
            "RSPO and SPIN set their own: the title, id and citation create_model_card writes", TRL),
    # --- TRL: GRPOTrainer (RPGTrainer) -------------------------------------------------------------------------------
    Checked("trl.GRPOTrainer", "_set_signature_columns_if_needed", "(self)",
            "KLToBaseMixin overrides it (super()); it refuses GRPO-style trainers before any dataloader", TRL),
    Checked("trl.GRPOTrainer", "_compute_loss", "(self, model, inputs)",
            "RPGTrainer replaces it; reads inputs' prompt_ids/mask, completion_ids/mask, tool_mask, advantages, "
            "old_per_token_logps, ref_per_token_logps, num_items_in_batch", TRL),
    Checked("trl.GRPOTrainer", "_get_per_token_logps_and_entropies",
            "(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, "
            "compute_aux_loss=False, pixel_values=None, image_grid_thw=None, num_images=None, "
            "pixel_attention_mask=None, spatial_shapes=None, num_tiles=None, image_sizes=None, token_type_ids=None, "
            "mm_token_type_ids=None, image_position_ids=None) -> tuple[torch.Tensor, torch.Tensor | None, "
            "torch.Tensor | None]",
            "RPGTrainer: (model, ids, mask, logits_to_keep, compute_entropy=True, compute_aux_loss=) -> "
            "(logps, entropies, aux_loss)", TRL),
    Checked("trl.GRPOTrainer", "_generate_and_score_completions",
            "(self, inputs: list[dict[str, torch.Tensor | typing.Any]]) -> dict[str, torch.Tensor | typing.Any]",
            "RPGTrainer calls it through super(), then reads the reward metrics it logged for the batch", TRL),
    Checked("trl.GRPOTrainer", "_prepare_inputs",
            "(self, generation_batch: dict[str, torch.Tensor | typing.Any]) -> dict[str, torch.Tensor | typing.Any]",
            "LoRADropoutMixin overrides it (super()) to generate and score rollouts with the expected adapter", TRL),
    Checked("trl.GRPOTrainer", "_metrics", None,
            "{mode: {name: [values]}}; RPGTrainer reads frac_reward_zero_std, completions/clipped_ratio, reward",
            TRL),
    # --- TRL: DPOTrainer (RSPOTrainer, SPINTrainer through PrecomputedColumnsDPOTrainer) -----------------------------
    Checked("trl.DPOTrainer", "_compute_loss", "(self, model, inputs, return_outputs)",
            "RSPO and SPIN replace it: the collated [chosen; rejected] batch in, loss or (loss, outputs) out", TRL),
    Checked("trl.DPOTrainer", "compute_ref_log_probs", "(self, model, inputs)",
            "overridden (super()) to pass input_ids, attention_mask, completion_mask only; returns (chosen, rejected)",
            TRL),
    Checked("trl.DPOTrainer", "_prepare_dataset",
            "(self, dataset: datasets.arrow_dataset.Dataset | datasets.iterable_dataset.IterableDataset, "
            "processing_class: transformers.tokenization_utils_base.PreTrainedTokenizerBase | "
            "transformers.processing_utils.ProcessorMixin, args: trl.trainer.dpo_config.DPOConfig, "
            "dataset_name: str) -> datasets.arrow_dataset.Dataset | datasets.iterable_dataset.IterableDataset",
            "RSPOTrainer tokenizes base samples with it, positionally; reads prompt_ids and chosen_ids", TRL),
    Checked("trl.DPOTrainer", "_precompute_ref_logps",
            "(self, dataset: datasets.arrow_dataset.Dataset, name: str, batch_size: int) -> "
            "datasets.arrow_dataset.Dataset",
            "overridden (super()) to move the dataset onto a disk every process reads first", TRL),
    Checked("trl.DPOTrainer", "_set_signature_columns_if_needed", "(self)",
            "overridden (super()) to keep the extra float columns and base samples (add_signature_columns)", TRL),
    Checked("trl.DPOTrainer", "_metrics", None, "{mode: {name: [values]}}; RSPO and SPIN append their means", TRL),
    # --- TRL: SFTTrainer (Booster, Reweight, Unlearn, and the ℓ1 and LoRA Dropout mixins) ----------------------------
    Checked("trl.SFTTrainer", "_prepare_dataset",
            "(self, dataset: datasets.arrow_dataset.Dataset | datasets.iterable_dataset.IterableDataset, "
            "processing_class: transformers.tokenization_utils_base.PreTrainedTokenizerBase | "
            "transformers.processing_utils.ProcessorMixin, args: trl.trainer.sft_config.SFTConfig, packing: bool, "
            "formatting_func: collections.abc.Callable[[dict], str] | None, dataset_name: str) -> "
            "datasets.arrow_dataset.Dataset | datasets.iterable_dataset.IterableDataset",
            "prepare_side_dataset tokenizes side sets with it; it reads self.completion_only_loss, set per set", TRL),
    Checked("trl.SFTTrainer", "_set_signature_columns_if_needed", "(self)",
            "UnlearnTrainer and KLToBaseMixin override it (super()) to keep their columns (add_signature_columns)",
            TRL),
    Checked("trl.SFTTrainer", "_metrics", None,
            "{mode: {name: [values]}}; Booster, Reweight, Unlearn, ℓ1 and LoRA Dropout append theirs", TRL),
    # --- transformers ------------------------------------------------------------------------------------------------
    Checked("transformers.Trainer", "_prepare_inputs",
            "(self, inputs: dict[str, torch.Tensor | typing.Any]) -> dict[str, torch.Tensor | typing.Any]",
            "side batches go to the device through it (prepare_inputs); LoRADropoutMixin overrides it (super())",
            TRANSFORMERS),
    Checked("transformers.Trainer", "get_batch_samples",
            "(self, epoch_iterator: collections.abc.Iterator, num_batches: int, device: torch.device) -> "
            "tuple[list, torch.Tensor | int | None]",
            "PrefetchedStepMixin and BoosterTrainer override it (super()) to see all the step's micro-batches first",
            TRANSFORMERS),
    Checked("transformers.Trainer", "training_step",
            "(self, model: torch.nn.modules.module.Module, inputs: dict[str, torch.Tensor | typing.Any], "
            "num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor",
            "training_loss mirrors how it scales compute_loss's loss (n_gpu mean, ÷ accumulation unless "
            "loss_is_scaled_for_ga) before accelerator.backward, and returns that loss", TRANSFORMERS),
    Checked("transformers.Trainer", "_set_signature_columns_if_needed", "(self) -> None",
            "KLToBaseMixin overrides it (super()) to keep the precomputed base top-k columns", TRANSFORMERS),
    Checked("transformers.Trainer", "_signature_columns", None,
            "the columns the dataloaders keep, a list set by _set_signature_columns_if_needed", TRANSFORMERS),
    Checked("transformers.integrations.deepspeed", "_hf_deepspeed_config_weak_ref", None,
            "a weakref to the run's HfDeepSpeedConfig, or None; without_zero3 reads it to set it back", TRANSFORMERS),
    # --- accelerate --------------------------------------------------------------------------------------------------
    Checked("accelerate.state.AcceleratorState", "_reset_state", "(reset_partial_state: 'bool' = False)",
            "reset_accelerator_state: the next Trainer builds its own Accelerator (one DeepSpeed plugin each)",
            ACCELERATE),
    Checked("accelerate.commands.config.config_args", "default_config_file", None,
            "the path `accelerate config` saves the machine's default to (llmreg run, llmreg accelerate-default)",
            ACCELERATE),
    # --- datasets ----------------------------------------------------------------------------------------------------
    Checked("datasets.Dataset", "_get_cache_file_path", "(self, fingerprint)",
            "the cache file of a fingerprint, next to the dataset's own: precomputed log-prob columns", DATASETS),
    Checked("datasets.Dataset", "_fingerprint", None,
            "names the copy of a dataset that on_shared_disk saves for every process", DATASETS),
    Checked("datasets.Dataset", "_indices", None,
            "None unless select()ed: token_fingerprint flattens the indices before hashing the arrow table", DATASETS),
    Checked("datasets.fingerprint.Hasher", "hash", "(value: Any) -> str",
            "precompute_model_logps names its cache file by the hash of the data, weights, prefix and dtype",
            DATASETS),
    # --- PEFT --------------------------------------------------------------------------------------------------------
    # LoRADropout (llmreg/lora_dropout/lora_dropout.py) swaps classes and shadows methods where it acts: public
    # names, but PEFT's internals decide whether that works.
    Checked("peft.tuners.lora.Linear", "forward", "(self, x: 'torch.Tensor', *args: 'Any', **kwargs: 'Any') -> "
            "'torch.Tensor'",
            "LoRADropout swaps the class of lora_A/lora_B (plain nn.Linear) in place; forward must call them", PEFT),
    Checked("peft.tuners.lora.LoraModel", "merge_and_unload",
            "(self, progressbar: 'bool' = False, safe_merge: 'bool' = False, adapter_names: "
            "'Optional[list[str]]' = None) -> 'torch.nn.Module'",
            "LoRADropout shadows it on the PeftModel (refusing a plain merge); lora_dropout.merge_and_unload calls it",
            PEFT),
    Checked("peft.tuners.lora.LoraModel", "merge_adapter",
            "(self, adapter_names: 'Optional[list[str]]' = None, safe_merge: 'bool' = False) -> 'None'",
            "LoRADropout shadows it on the PeftModel, as merge_and_unload", PEFT),
    Checked("peft.PeftModel", "__getattr__", "(self, name: 'str') -> 'Any'",
            "forwards merge_and_unload/merge_adapter to the tuner: an instance attribute of the name shadows them",
            PEFT),
    # --- huggingface_hub ---------------------------------------------------------------------------------------------
    # Set when a recipe builds its parser (llmreg/recipe_utils.py, recipe_environment), not at import.
    Checked("huggingface_hub.constants", "HF_HUB_OFFLINE", None,
            "recipe_environment sets it (no variable set) after the hub's import: read at call time", HUB),
]


# --- TRL -------------------------------------------------------------------------------------------------------------
# The trainers keep their log in `_metrics[mode][name]`, a list averaged into the next log line and then cleared.


def log_metric(trainer, mode: str, name: str, value: float) -> None:
    """Log ``value`` under ``name`` for ``mode`` ("train" or "eval"), as TRL's trainers log their own metrics."""
    trainer._metrics[mode][name].append(value)


def logged_metrics(trainer, mode: str) -> dict[str, list[float]]:
    """What the trainer has logged for ``mode`` since its last log line: {name: [values]}."""
    return trainer._metrics[mode]


@contextmanager
def metrics_discarded(trainer, mode: str = "train"):
    """What the trainer logs for ``mode`` inside the block is dropped: a second pass over the same batch (a weight
    perturbation's) would otherwise count its metrics twice. A trainer without TRL's log (a plain transformers
    Trainer) logs nothing there."""
    if "_metrics" not in vars(trainer):
        yield
        return
    lengths = {name: len(values) for name, values in trainer._metrics[mode].items()}
    try:
        yield
    finally:
        for name in list(trainer._metrics[mode]):
            del trainer._metrics[mode][name][lengths.get(name, 0):]
            if not trainer._metrics[mode][name]:
                del trainer._metrics[mode][name]


def prepare_dataset(trainer, *args, **kwargs):
    """The trainer's ``_prepare_dataset`` (SFTTrainer's or DPOTrainer's, see ``CHECKED``): tokenize as for training."""
    return trainer._prepare_dataset(*args, **kwargs)


def per_token_logps_and_entropies(trainer, *args, **kwargs):
    """GRPOTrainer's ``_get_per_token_logps_and_entropies``: its fused log-prob forward, with entropies."""
    return trainer._get_per_token_logps_and_entropies(*args, **kwargs)


def independent_copy(model):
    """A frozen-able deep copy of a model that runs its own weights: TRL's ``add_fused_lm_head`` (SFTTrainer applies
    it) sets the instance's ``forward`` to a closure over the original model, which a deep copy would keep calling."""
    duplicate = copy.deepcopy(model)
    vars(duplicate).pop("forward", None)
    return duplicate


# --- transformers ----------------------------------------------------------------------------------------------------


def prepare_inputs(trainer, inputs: dict) -> dict:
    """A batch as the Trainer prepares its own before ``compute_loss`` (on the device)."""
    return trainer._prepare_inputs(inputs)


def training_loss(trainer, model, inputs: dict, num_items_in_batch=None):
    """The loss ``Trainer.training_step`` backpropagates for the micro-batch ``inputs`` (raw, as the dataloader gives
    them), without backpropagating it: its gradient, averaged over processes and summed over the step's micro-batches,
    is the step's gradient. (accelerate divides by its own accumulation count, 1 under the Trainer.)"""
    inputs = trainer._prepare_inputs(inputs)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
    if trainer.args.n_gpu > 1:
        loss = loss.mean()
    scaled_for_ga = trainer.loss_is_scaled_for_ga
    if scaled_for_ga is None:
        scaled_for_ga = ((trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
                         or trainer.compute_loss_func is not None)
    if not scaled_for_ga:
        loss = loss / trainer.current_gradient_accumulation_steps
    if trainer.accelerator.distributed_type != "DEEPSPEED":
        loss = loss / trainer.accelerator.gradient_accumulation_steps
    return loss


def add_signature_columns(trainer, columns) -> None:
    """Keep ``columns`` in the batches: the Trainer drops every dataset column its model's forward does not take. Call
    after ``super()._set_signature_columns_if_needed()``."""
    missing = [c for c in columns if c not in trainer._signature_columns]
    trainer._signature_columns = [*trainer._signature_columns, *missing]


def hf_deepspeed_config():
    """The DeepSpeed config transformers holds for the run (an ``HfDeepSpeedConfig``), or None. The module's global is
    read at each call: transformers replaces it whenever a config is set."""
    weak_ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    return weak_ref() if weak_ref is not None else None


# --- accelerate ------------------------------------------------------------------------------------------------------
# Imported when called, as they were before this module.


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (``AcceleratorState``); the process group stays."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def accelerate_default_config_file() -> str:
    """Where ``accelerate config`` saves the machine's default launch config."""
    from accelerate.commands.config.config_args import default_config_file

    return default_config_file


# --- datasets --------------------------------------------------------------------------------------------------------


def dataset_fingerprint(dataset) -> str:
    """The dataset's fingerprint: it changes with every transform of the dataset, and with its arguments."""
    return dataset._fingerprint


def has_indices_mapping(dataset) -> bool:
    """Whether the dataset is a view of its arrow table (``select``, ``shuffle``, ...) through an indices mapping."""
    return dataset._indices is not None


def dataset_cache_file_path(dataset, fingerprint: str) -> str:
    """The cache file that a transform of ``dataset`` with this fingerprint writes, next to the dataset's own."""
    return dataset._get_cache_file_path(fingerprint)
