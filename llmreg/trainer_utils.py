"""What llmreg's trainers and recipes need alike: dataset column checks and DeepSpeed-on-CPU initialization."""

import os

import torch


def check_dataset_columns(dataset, formats: dict[str, tuple[str, ...]], method: str) -> str:
    """Return the name of the first format in ``formats`` whose columns ``dataset`` has; raise a clear error if none.

    ``formats`` maps a format name to its required columns, e.g. ``{"prompt-completion": ("prompt", "completion")}``.
    Checked before training starts, so a wrong dataset fails in seconds with the fix, not deep inside a collator.
    """
    columns = set(dataset.column_names)
    for name, required in formats.items():
        if columns.issuperset(required):
            return name
    expected = "; ".join(f"{name}: {', '.join(repr(c) for c in required)}" for name, required in formats.items())
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
