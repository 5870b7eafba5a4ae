"""What llmreg's trainers and recipes need alike: dataset column checks, DeepSpeed-on-CPU initialization, option
checks for trainers that replace a TRL loss or need a chat template TRL can mask, and importing functions named on
the command line."""

import contextlib
import dataclasses
import importlib
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.integrations import deepspeed as hf_deepspeed
from trl.chat_template_utils import get_training_chat_template

from llmreg._compat import has_generation_markers, hf_deepspeed_config, prepare_dataset, reset_accelerate_state
from llmreg.errors import InputError


logger = logging.getLogger(__name__)


# The dataset formats TRL's SFTTrainer takes (the SFT recipe and BoosterTrainer check them).
SFT_FORMATS = {
    "language modeling": ("text",),
    "conversational": ("messages",),
    "prompt-completion": ("prompt", "completion"),
}


def check_dataset_columns(dataset, formats: dict[str, tuple[str, ...]], method: str) -> str:
    """Return the name of the first format in ``formats`` whose columns ``dataset`` has; raise a clear error if none.

    ``formats`` maps a format name to its required columns, e.g. ``{"prompt-completion": ("prompt", "completion")}``.
    Checked before training starts, so a wrong dataset fails in seconds with the fix, not deep inside a collator.
    """
    columns = set(dataset.column_names)
    for name, required in formats.items():
        if columns.issuperset(required):
            return name
    expected = "; ".join(f"{name}: {', '.join(repr(c) for c in required)} (missing "
                         f"{', '.join(repr(c) for c in required if c not in columns)})"
                         for name, required in formats.items())
    raise InputError(
        f"{method} cannot use this dataset: its columns are {sorted(columns)}, but {method} needs the columns of "
        f"one of these formats: {expected}. Rename or map your columns (datasets.Dataset.rename_column or .map) "
        "to one of them."
    )


def check_assistant_only_loss(tokenizer: PreTrainedTokenizerBase | str, args) -> None:
    """With ``args.assistant_only_loss`` (an ``SFTConfig``), raise a ValueError before training if the chat template
    TRL would train with cannot mark the assistant's tokens; otherwise do nothing.

    TRL masks the assistant turns with the tokenizer's ``return_assistant_tokens_mask``, which needs
    ``{% generation %}`` markers (``{%- generation %}`` too) in the template. A template without them is still fine
    when TRL ships a training version of it (Qwen2.5, Llama 3, ...): SFTTrainer swaps that in itself. Otherwise TRL
    fails only after the model has loaded, with an error that does not say what to do; this check says it first.

    ``tokenizer`` is the tokenizer, or a model name or path to load it from as SFTTrainer does; it is loaded only when
    ``assistant_only_loss`` is set. ``args.chat_template_path``, when set, is the template TRL trains with instead.
    """
    if not args.assistant_only_loss:
        return
    if isinstance(tokenizer, str):
        revision = (args.model_init_kwargs or {}).get("revision")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, revision=revision,
                                                  trust_remote_code=args.trust_remote_code)
    template, source = tokenizer.chat_template, f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"
    path = args.chat_template_path
    if path is not None:  # SFTTrainer replaces the template with this one: a Jinja file, or a tokenizer's template
        source = f"the chat template of --chat_template_path {path}"
        if path.endswith((".jinja", ".j2")) and Path(path).is_file():
            template = Path(path).read_text()
        else:
            template = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code).chat_template
    if template is not None and has_generation_markers(template):
        return
    if template is not None and _trl_has_training_version(tokenizer, template):
        logger.info("%s has no {%% generation %%} markers; SFTTrainer swaps in TRL's training version of it for "
                    "--assistant_only_loss.", source[0].upper() + source[1:])
        return
    problem = ("is missing" if template is None else
               "has no {% generation %} ... {% endgeneration %} markers (and TRL has no training version of it)")
    raise InputError(
        "--assistant_only_loss true needs a chat template that marks the assistant's turns with "
        f"{{% generation %}} ... {{% endgeneration %}}, so that TRL can tell which tokens to train on, but {source} "
        f"{problem}. Fixes: use a prompt-completion dataset (`prompt` and `completion` columns) instead, and TRL "
        "leaves the prompt out of the loss itself (completion_only_loss); or pass a chat template with "
        "{% generation %} markers with --chat_template_path (a .jinja file, or a tokenizer whose template has them); "
        "or drop --assistant_only_loss to train on every token.")


def _trl_has_training_version(tokenizer: PreTrainedTokenizerBase, template) -> bool:
    """Whether SFTTrainer would swap TRL's training version in for ``template`` (set on ``tokenizer``)."""
    saved = tokenizer.chat_template
    tokenizer.chat_template = template  # as SFTTrainer sets --chat_template_path's; put back below
    try:
        get_training_chat_template(tokenizer)
    except ValueError:  # TRL's answer for a template it has no training version of
        return False
    finally:
        tokenizer.chat_template = saved
    return True


# The columns of a tokenized SFT dataset that TRL's collators read: the tokens, the loss mask under the names TRL has
# given it (``labels`` with -100 since TRL 1.16; ``completion_mask`` / ``assistant_masks`` before), and packing's
# document lengths. Everything else (the text columns) is dropped.
SFT_MODEL_COLUMNS = ("input_ids", "labels", "completion_mask", "assistant_masks", "seq_lengths")


def prepare_side_dataset(trainer, dataset, name: str):
    """Tokenize a second SFT-style dataset of an ``SFTTrainer`` subclass (Booster's harmful data, unlearning's retain
    and "I don't know" sets) as the trainer tokenizes its training data, keeping what its collator needs to build
    ``labels``: the loss falls on the answer tokens only, as in training.

    Whether a prompt is left out of the loss is decided per dataset, as SFTTrainer decides it for ``train_dataset``:
    ``completion_only_loss`` when set, else for prompt-completion rows only. (SFTTrainer's ``_prepare_dataset`` reads
    the decision it made for ``train_dataset``: a language-modeling training set would put a side set's prompts in
    its loss.) Where prompts must be left out, the trainer's own collator is asked: if it puts every token of the
    first rows in the loss (a TRL that renamed the mask, say), this raises instead of training on the prompts.
    """
    completion_only = trainer.args.completion_only_loss
    if completion_only is None:
        completion_only = {"prompt", "completion"} <= set(dataset.column_names)
    decided_for_training = trainer.completion_only_loss  # SFTTrainer's decision for train_dataset (TRL >= 1.0)
    trainer.completion_only_loss = completion_only
    try:
        prepared = prepare_dataset(trainer, dataset, trainer.processing_class, trainer.args, packing=False,
                                   formatting_func=None, dataset_name=name)
    finally:
        trainer.completion_only_loss = decided_for_training
    prepared = prepared.select_columns([c for c in prepared.column_names if c in SFT_MODEL_COLUMNS])
    if completion_only or trainer.args.assistant_only_loss:
        # One row per batch: no padding, whose -100 labels would hide a missing mask. Label 0 is never predicted.
        first_rows = prepared.select(range(min(8, len(prepared))))
        if not any((trainer.data_collator([row])["labels"][0, 1:] == -100).any() for row in first_rows):
            raise RuntimeError(
                f"The tokenized {name} dataset puts every token of its first rows in the loss, prompts included, "
                f"though only the answers should be (its columns: {prepared.column_names}). This TRL version "
                "names the loss mask differently: add its name to llmreg.trainer_utils.SFT_MODEL_COLUMNS.")
    return prepared


def init_deepspeed_distributed_on_cpu() -> None:
    """Initialize ``deepspeed.comm`` over gloo when DeepSpeed is launched on a machine without an accelerator.

    accelerate initializes ``torch.distributed`` directly when ``use_cpu=True`` and skips ``deepspeed.comm``. Any
    model then built under ``deepspeed.zero.Init`` (the reference model TRL loads for DPO, or GRPO with beta > 0)
    reads world size 1 from ``deepspeed.comm`` and fails ZeRO-3's batch-size check. Initializing ``deepspeed.comm``
    first fixes that. It must run before the first TRL config is created: llmreg's recipe parser calls it, and a
    script that builds its configs without the parser calls it first (the configs do not, so that creating a config
    starts no process group). On machines with GPUs accelerate does this itself, and this function does nothing.
    """
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not launched_with_deepspeed or int(os.environ.get("WORLD_SIZE", "1")) < 2 or torch.accelerator.is_available():
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


@contextmanager
def without_zero3():
    """Inside, a model can be loaded and used by this process alone even while a ZeRO-3 run is configured.

    Once a ZeRO-3 TrainingArguments exists, transformers builds every model under ``deepspeed.zero.Init``
    (partitioned across ranks) and ``generate`` syncs every step with the other ranks (``synced_gpus``): collectives
    that every rank must join. An evaluation copy on the main process must be loaded and run outside that, or it
    hangs. The run's configuration is restored on exit.
    """
    configuration = hf_deepspeed_config()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if configuration is not None:
            hf_deepspeed.set_hf_deepspeed_config(configuration)


def changed_dpo_loss_options(config) -> list[str]:
    """The DPO loss options of a ``DPOConfig`` that differ from their defaults.

    For trainers that replace the DPO loss (RSPO, SPIN): these options would be ignored, so their configs refuse them.
    """
    used = {
        "loss_weights": config.loss_weights is not None,
        "f_divergence_type": config.f_divergence_type != "reverse_kl",
        "ld_alpha": config.ld_alpha is not None,
        "use_weighting": config.use_weighting,
        "label_smoothing": config.label_smoothing != 0.0,
        "sync_ref_model": config.sync_ref_model,
        "use_liger_kernel": config.use_liger_kernel,
    }
    return [name for name, is_set in used.items() if is_set]


def derived_config(config_class, source, **changes):
    """A ``config_class`` (a ``TrainingArguments`` subclass) for a later stage of a pipeline: every setting of
    ``source`` that ``config_class`` has (precision, optimizer, clipping, accumulation, ...), then ``changes``. The
    stage trains as the user asked for the run, except where it says; a field-by-field copy drops what it forgot."""
    kept = {field.name: getattr(source, field.name) for field in dataclasses.fields(config_class)
            if field.init and hasattr(source, field.name)}
    return config_class(**{**kept, **changes})


def import_object(path: str):
    """``module.name`` → the object (a reward function, a judge), with an error that says what was expected."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"Cannot import {path!r} (expected an importable module.name): {error}") from error


def write_atomically(path: Path, content: str | bytes) -> None:
    """Write ``content`` to a temporary name next to ``path``, then rename: a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    if isinstance(content, bytes):
        temporary.write_bytes(content)
    else:
        temporary.write_text(content)
    os.replace(temporary, path)


def replace_directory(temporary: Path, final: Path) -> None:
    """Move a finished directory into place, replacing any older one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)


def loss_scale(accelerator) -> float:
    """The factor torch's fp16 gradient scaler multiplies this step's loss by (1 without one: fp32, bf16). The
    gradient in ``.grad`` is scaled by it until the optimizer unscales it, so a gradient added to it in or after the
    backward must be scaled too, or it arrives divided by it. (DeepSpeed scales inside its engine: see
    ``refuse_fp16_under_deepspeed``.)"""
    return 1.0 if accelerator.scaler is None else accelerator.scaler.get_scale()


def refuse_fp16_under_deepspeed(trainer, what: str) -> None:
    """``what`` adds a gradient to the loss's inside DeepSpeed's backward, whose fp16 loss scale (DeepSpeed's own, and
    dynamic) this does not read: refused before training, rather than added unscaled."""
    if trainer.is_deepspeed_enabled and trainer.args.fp16:
        raise ValueError(f"{what} is added to the loss's gradient inside the backward, and fp16 under DeepSpeed "
                         "scales that gradient by DeepSpeed's own loss scale, which llmreg does not read. Use bf16 "
                         "under DeepSpeed, or fp16 without it (DDP or one process).")


@contextmanager
def gradients_added_in_backward(params: list[torch.nn.Parameter], extras: list[torch.Tensor], what: str,
                                scale: float = 1.0):
    """Add ``scale``·``extras[i]`` to the gradient of ``params[i]`` in the backward run inside the block, once,
    through hooks on the parameters: the addition reaches ``.grad`` the way the loss's own gradient does, whoever owns
    ``.grad`` (plain PyTorch, DDP's buckets, DeepSpeed ZeRO-2/3's partitions), and is averaged over processes with it.
    ``scale``: the loss scale of that backward (``loss_scale``). Raises if a parameter got no gradient in that backward
    (the loss does not reach it), naming ``what`` was lost."""
    pending = dict(enumerate(extras))

    def add_once(index):
        def hook(grad):
            extra = pending.pop(index, None)  # once: a re-entrant checkpoint may fire the hook again
            return grad if extra is None else grad.add(extra.to(grad.dtype), alpha=scale)
        return hook

    handles = [p.register_hook(add_once(i)) for i, p in enumerate(params)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if pending:
        raise RuntimeError(f"{what} could not be added to {len(pending)} trainable parameters: the loss does not "
                           "reach them, so no gradient flows into them in its backward. Freeze those parameters "
                           "(requires_grad=False).")


def add_to_gradients(params: list[torch.nn.Parameter], extras: list[torch.Tensor], what: str,
                     alpha: float = 1.0) -> None:
    """``.grad`` of ``params[i]`` += alpha·``extras[i]``, all at once: after the step's last backward, outside
    DeepSpeed (which owns ``.grad``: use ``gradients_added_in_backward`` there). ``alpha`` includes the loss scale
    (``loss_scale``). Raises if a parameter has no gradient, naming ``what`` was lost."""
    if any(p.grad is None for p in params):
        raise RuntimeError(f"{what} could not be added: some trainable parameters got no gradient from the loss. "
                           "Freeze those parameters (requires_grad=False).")
    torch._foreach_add_([p.grad for p in params], [e.to(p.grad.dtype) for p, e in zip(params, extras)], alpha=alpha)


class StepRegularizerMixin:
    """Base of the mixins that add the gradient of a penalty on the weights, ∇R(w), once per optimizer step (the
    anchor, the ℓ1 penalty). The gradient joins the loss's at the step's last micro-batch: straight into the
    synchronized ``.grad`` after its backward, or under DeepSpeed, which owns ``.grad``, inside that backward through
    hooks on the parameters, so that DDP or ZeRO averages it with the loss's. Either way gradient accumulation and
    data parallelism leave it ∇R(w).

    R is of w even when a weight perturbation (``llmreg.weight_perturbation``) runs the step's passes at w + δ. The
    perturbation keeps w for the step in ``_weights_at_w``, and the penalty reads its parameters through
    ``parameters_at_w``, as weight decay is of w under SAM."""

    _weights_at_w: dict[int, torch.Tensor] | None = None  # id(parameter) → its value at w, while it is moved

    @contextmanager
    def parameters_at_w(self, params: list[torch.nn.Parameter]):
        """The values of ``params`` at w, whole (gathered under ZeRO-3), to be read, not changed."""
        if self._weights_at_w is not None:
            yield [self._weights_at_w[id(p)] for p in params]
            return
        with gathered_parameters(self.accelerator, params), torch.no_grad():
            yield params

    def training_step_adding(self, model, inputs, num_items_in_batch, params: list[torch.nn.Parameter],
                             extras: list[torch.Tensor], what: str):
        """The trainer's own ``training_step``, with ``extras[i]`` added to the gradient of ``params[i]``."""
        if self.is_deepspeed_enabled:  # fp16 refused there (refuse_fp16_under_deepspeed)
            with gradients_added_in_backward(params, extras, what):
                return super().training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)
        add_to_gradients(params, extras, what, alpha=loss_scale(self.accelerator))
        return loss


def adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of a PEFT model that its adapter changes (LoRA's layers, ``modules_to_save`` wrappers): what
    ``PeftModel.disable_adapter`` switches off. Found once, for ``adapters_disabled``."""
    return [module for module in model.modules() if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextmanager
def adapters_disabled(layers: list[torch.nn.Module]):
    """``PeftModel.disable_adapter`` for LoRA-style adapters, over ``layers`` found once (``adapter_layers``): the same
    switch of each layer (``enable_adapters``), without the two walks over every module and the status check over
    every parameter that it makes on each call, which on a small model cost a sixth of a training step. Layers already
    disabled stay so."""
    enabled = [layer for layer in layers if not layer.disable_adapters]
    for layer in enabled:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in enabled:
            layer.enable_adapters(True)


def loss_token_mask(batch: dict) -> torch.Tensor:
    """The tokens that count in a causal LM's loss: the labels shifted by one, where not -100."""
    return batch["labels"][:, 1:] != -100


class PrefetchedStepMixin:
    """Keeps the micro-batches the Trainer fetches for an optimizer step (``get_batch_samples``, before the step's
    first micro-batch trains), for trainers that normalize by step-wide counts."""

    _step_batches: list | None = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches = batch_samples
        return batch_samples, num_items

    def take_step_batches(self, inputs: dict) -> list[dict]:
        """At a step's first micro-batch: the step's micro-batches, or ``[inputs]`` when ``training_step`` is called
        outside the Trainer's loop (then the step is that batch)."""
        batches = self._step_batches if self._step_batches is not None else [inputs]
        self._step_batches = None
        return batches


class StepIndexedRows:
    """The rows of a side dataset (Booster's harmful data, unlearning's retain data) that batch ``index`` draws: a
    function of the index alone, so that a run resumed from a checkpoint draws what a straight run does. Each pass over
    the rows is a permutation seeded with seed + pass; a batch index takes the next ``num_processes`` batches of it,
    process r the r-th (as accelerate shards a dataloader); a pass drops the rows that do not fill one such index."""

    def __init__(self, num_rows: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.per_pass = num_rows // (batch_size * num_processes)
        if self.per_pass == 0:
            raise ValueError(f"{num_rows} rows are fewer than one batch of all processes "
                             f"({batch_size} × {num_processes}).")
        self._order = (-1, None)  # (pass, its permutation)

    def __call__(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.per_pass)
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(self.num_rows, generator=generator).tolist())
        start = (position * self.num_processes + self.process_index) * self.batch_size
        return self._order[1][start:start + self.batch_size]


def is_zero3(accelerator) -> bool:
    return accelerator.distributed_type == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3


def gathered_parameters(accelerator, params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Under ZeRO-3, a context in which ``params`` hold their full values on every process (with ``modifier_rank``,
    that process's in-place changes are kept and shared on exit); elsewhere the parameters are whole already."""
    if not is_zero3(accelerator):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def reset_accelerator_state() -> None:
    """Let the next Trainer build its own ``Accelerator``: a script that trains one model after another under DeepSpeed
    (the FTaaS pipeline's stages) otherwise fails, as accelerate refuses a second DeepSpeed plugin. The process group
    stays; transformers resets the same state between its hyperparameter-search trials."""
    reset_accelerate_state()


def save_trained_model(trainer, final: Path) -> None:
    """Save the trainer's model (a LoRA adapter, or the whole model) and tokenizer to ``final`` atomically. Every
    process must call it (``save_model`` gathers sharded weights); the main process renames."""
    temporary = final.with_name(final.name + ".tmp")
    trainer.save_model(str(temporary))
    if trainer.accelerator.is_main_process:
        replace_directory(temporary, final)
    trainer.accelerator.wait_for_everyone()


def merge_saved_adapter(adapter: Path, final: Path, tokenizer) -> None:
    """Merge the LoRA adapter saved in ``adapter`` into its base and save the whole model to ``final`` atomically.
    Main process only."""
    from peft import AutoPeftModelForCausalLM

    temporary = final.with_name(final.name + ".tmp")
    with without_zero3():
        AutoPeftModelForCausalLM.from_pretrained(str(adapter)).merge_and_unload().save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    replace_directory(temporary, final)


def save_whole_model(trainer, final: Path, merge_adapter: bool) -> None:
    """Save the trained model to ``final`` atomically, as a whole model: with ``merge_adapter``, its LoRA adapter is
    merged into the base first, so that the next stage can load it (or put a fresh adapter on it) like any model.
    Every process must call it."""
    if not merge_adapter:
        save_trained_model(trainer, final)
        return
    adapter = final.with_name(final.name + ".adapter")
    save_trained_model(trainer, adapter)
    if trainer.accelerator.is_main_process:
        merge_saved_adapter(adapter, final, trainer.processing_class)
        shutil.rmtree(adapter)
    trainer.accelerator.wait_for_everyone()
