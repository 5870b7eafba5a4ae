"""The plumbing every ``recipes/<method>.py`` shares: one parser, the lab defaults, CPU detection, offline mode.

A recipe calls ``make_recipe_parser`` with its dataclasses and its defaults, then ``parse_recipe_args``:

- YAML configs through TRL's ``TrlParser`` (``--config file.yaml``): precedence is dataclass default < recipe default
  < YAML < command line, and an unknown key in the YAML or on the command line is an error;
- ``model_name_or_path`` defaults to the lab model ``llmreg/tiny`` and ``dataset_name`` to the recipe's lab task;
- on a machine without an accelerator, ``use_cpu=True`` and ``bf16=False`` become the defaults (TRL's configs
  default to bf16, which fails on a CPU-only machine);
- the Hugging Face hub is offline unless ``HF_HUB_OFFLINE`` is set otherwise in the environment;
- ``LaunchArguments`` (``accelerate_config``, ``num_processes``, ...) are keys of every recipe, in YAML and on the
  command line alike, read by ``llmreg run`` to build the ``accelerate launch`` line (so the command line wins over the
  YAML for them too) and refused in a process ``llmreg run`` did not start, where they could only be ignored.
"""

import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset, load_from_disk
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_quantization_config

from llmreg.lab import LAB_DATASETS, LAB_MODEL_ID, load_lab_dataset, resolve_model_name_or_path
from llmreg.lab.prompts import prompt_style_of
from llmreg.trainer_utils import init_deepspeed_distributed_on_cpu


def _recipe_environment() -> None:
    """Offline unless the user set ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``); quiet tokenizers and DeepSpeed."""
    if "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = "1"  # for the processes this one starts
        # huggingface_hub read the variable when a recipe imported TRL, before llmreg: set what it read, too.
        constants.HF_HUB_OFFLINE = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator-detection warning


_recipe_environment()


# Set by `llmreg run` (and `llmreg ablate`) in the environment of the processes it launches.
LAUNCHED_BY_LLMREG = "LLMREG_LAUNCHED"


@dataclass
class LaunchArguments:
    """How ``llmreg run`` launches a recipe: ``accelerate launch`` options, settable in the YAML or on the command
    line like any other key. Unset (None) means accelerate's own default."""

    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "accelerate config: a name from `llmreg list` (single_process, multi_process, zero2, zero3, "
                          "zero3_offload, fsdp2, multi_node) or a path to an accelerate YAML. Read by `llmreg run`."},
    )
    num_processes: int | None = field(default=None, metadata={"help": "Processes per machine (accelerate launch)."})
    num_machines: int | None = field(default=None, metadata={"help": "Machines (accelerate launch)."})
    machine_rank: int | None = field(default=None, metadata={"help": "This machine's rank (accelerate launch)."})
    main_process_ip: str | None = field(default=None, metadata={"help": "Rank 0's address (accelerate launch)."})
    main_process_port: int | None = field(default=None, metadata={"help": "Rank 0's port (accelerate launch)."})

    def given(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


class RecipeParser(TrlParser):
    """A ``TrlParser`` whose every recipe also takes ``LaunchArguments``: ``parse_args_and_config`` returns the
    recipe's own dataclasses, as before, and keeps the launch options in ``launch_arguments``."""

    launch_arguments: LaunchArguments | None = None

    def parse_args_and_config(self, args=None, **kwargs) -> tuple:
        launch_arguments, *parsed = super().parse_args_and_config(args, **kwargs)
        self.launch_arguments = launch_arguments
        return tuple(parsed)


@dataclass
class LabEvalArguments:
    """The size and decoding of a recipe's before/after evaluation on the lab's held-out prompts."""

    num_eval_prompts: int = field(
        default=200, metadata={"help": "Held-out prompts scored before and after training (0: no evaluation)."}
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Length limit of the evaluation answers."})
    eval_temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature of the evaluation (0: greedy)."}
    )
    eval_generation_batch_size: int = field(default=64, metadata={"help": "Prompts per generate call."})

    def __post_init__(self):
        if self.num_eval_prompts < 0 or self.eval_max_new_tokens < 1 or self.eval_generation_batch_size < 1:
            raise ValueError("num_eval_prompts must be >= 0 (0: no evaluation), eval_max_new_tokens and "
                             "eval_generation_batch_size >= 1.")
        if self.eval_temperature < 0:
            raise ValueError(f"eval_temperature must be >= 0 (0: greedy), got {self.eval_temperature}.")

    def generation(self) -> dict:
        """``llmreg.lab.generate_completions`` keyword arguments."""
        return {"max_new_tokens": self.eval_max_new_tokens, "temperature": self.eval_temperature,
                "batch_size": self.eval_generation_batch_size}


def load_for_evaluation(path: str):
    """(model, tokenizer) of a saved model directory, or of a PEFT adapter directory on its base model."""
    if (Path(path) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    return model, AutoTokenizer.from_pretrained(path)


def make_recipe_parser(dataclass_types, *, dataset_name: str, output_dir: str, **defaults) -> RecipeParser:
    """A ``RecipeParser`` over ``dataclass_types`` with llmreg's defaults, overridable by YAML and command line.

    ``dataset_name`` is the recipe's default dataset (a lab dataset name), ``output_dir`` its default output
    directory; ``defaults`` sets any other field's default for this recipe.
    """
    parser = RecipeParser((LaunchArguments, *dataclass_types))
    recipe_defaults = {"model_name_or_path": LAB_MODEL_ID, "dataset_name": dataset_name, "output_dir": output_dir}
    if not torch.accelerator.is_available():
        recipe_defaults.update(use_cpu=True, bf16=False)
    recipe_defaults.update(defaults)
    unknown = parser.set_defaults_with_config(**recipe_defaults)
    if unknown:
        raise ValueError(f"Recipe defaults name fields none of {[t.__name__ for t in dataclass_types]} has: {unknown}")
    return parser


def parse_recipe_args(parser: RecipeParser, args: list[str] | None = None) -> tuple:
    """Parse the command line (and ``--config``); resolve the model name to a local directory.

    Also initializes ``deepspeed.comm`` under a DeepSpeed launch on CPU, which must happen before the first TRL
    config is created (see ``init_deepspeed_distributed_on_cpu``).
    """
    init_deepspeed_distributed_on_cpu()
    parsed = parser.parse_args_and_config(args)
    launch = parser.launch_arguments.given()
    if launch and os.environ.get(LAUNCHED_BY_LLMREG) != "1":
        raise ValueError(f"{', '.join(launch)} choose how `llmreg run` launches a recipe, but this process was not "
                         "started by `llmreg run`, so they would be ignored. Launch with `llmreg run <method> ...`, "
                         "or remove them and pass accelerate's own options (accelerate launch --config_file ...).")
    for arguments in parsed:
        if isinstance(arguments, ModelConfig):
            arguments.model_name_or_path = resolve_model_name_or_path(arguments.model_name_or_path)
    return parsed


def load_recipe_dataset(script_args, split: str, *, model_name_or_path: str) -> Dataset:
    """Split ``split`` of ``script_args.dataset_name``: a lab dataset, a directory written by ``save_to_disk``, or
    anything ``datasets.load_dataset`` takes (a hub id, a local data directory).

    A lab dataset's prompts are phrased for the model that will train on them (``llmreg.lab.prompts``): as
    ``llmreg/tiny`` learned them for a model with the lab tokenizer, asking for the scorer's answer form otherwise.
    """
    name = script_args.dataset_name
    if name in LAB_DATASETS:
        return load_lab_dataset(name, split=split, style=prompt_style_of(model_name_or_path))
    if name.startswith("llmreg/"):
        raise ValueError(f"Unknown lab dataset {name!r}; valid lab datasets: {', '.join(LAB_DATASETS)}.")
    path = Path(name).expanduser()
    if (path / "dataset_dict.json").is_file():
        return load_from_disk(path)[split]
    if (path / "state.json").is_file():  # a single Dataset: it is the split asked for
        return load_from_disk(path)
    return load_dataset(name, name=script_args.dataset_config, split=split)


def model_init_kwargs(model_args, training_args) -> dict:
    """``from_pretrained`` keyword arguments from TRL's ``ModelConfig``, merged under ``training_args``' own.

    ``--load_in_4bit`` / ``--load_in_8bit`` add a bitsandbytes ``quantization_config`` (QLoRA with ``--use_peft``).
    """
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        if not model_args.use_peft:
            raise ValueError("--load_in_4bit / --load_in_8bit quantize the base model, whose weights then cannot be "
                             "trained: add --use_peft to train a LoRA adapter on it (QLoRA).")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--load_in_4bit / --load_in_8bit need bitsandbytes: pip install 'llmreg[bnb]'.")
        kwargs["quantization_config"] = quantization_config
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs
