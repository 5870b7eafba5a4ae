"""What llmreg's trainers and recipes need alike: dataset column checks and DeepSpeed-on-CPU initialization."""

import os
from contextlib import contextmanager

import torch
from transformers.integrations import deepspeed as hf_deepspeed


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
    raise ValueError(
        f"{method} cannot use this dataset: its columns are {sorted(columns)}, but {method} needs the columns of "
        f"one of these formats: {expected}. Rename or map your columns (datasets.Dataset.rename_column or .map) "
        "to one of them."
    )


def init_deepspeed_distributed_on_cpu() -> None:
    """Initialize ``deepspeed.comm`` over gloo when DeepSpeed is launched on a machine without an accelerator.

    accelerate initializes ``torch.distributed`` directly when ``use_cpu=True`` and skips ``deepspeed.comm``. Any
    model then built under ``deepspeed.zero.Init`` (the reference model TRL loads for DPO, or GRPO with beta > 0)
    reads world size 1 from ``deepspeed.comm`` and fails ZeRO-3's batch-size check. Initializing ``deepspeed.comm``
    first fixes that. It must run before the first TRL config is created; llmreg's recipe parser calls it. On
    machines with GPUs accelerate does this itself, and this function does nothing.
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
    weak_ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    configuration = weak_ref() if weak_ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if configuration is not None:
            hf_deepspeed.set_hf_deepspeed_config(configuration)
