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
  YAML for them too) and refused in a process ``llmreg run`` did not start, where they could only be ignored;
- bad input fails before any model loads, once, in one line (``llmreg.errors.InputError``): an unreadable YAML (file,
  line and problem), an unknown or abbreviated option (with the closest valid ones), a model or dataset path that does
  not exist (or a hub id that is neither cached offline nor on the hub). ``run_recipe`` runs a recipe's ``main`` that
  way, and ends a Ctrl-C with one line saying what is kept and how to continue.
"""

import difflib
import importlib.util
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset, load_dataset, load_from_disk
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_quantization_config

from llmreg.errors import InputError
from llmreg.lab import LAB_DATASETS, LAB_MODEL_ID, load_lab_dataset, resolve_model_name_or_path
from llmreg.lab.model import LAB_MODELS
from llmreg.lab.prompts import prompt_style_of
from llmreg.trainer_utils import init_deepspeed_distributed_on_cpu


def recipe_environment() -> None:
    """A recipe's process environment, set when it builds its parser (before any model or dataset loads), not when
    this module is imported: offline unless the user set ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``); quiet
    tokenizers and DeepSpeed."""
    if "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = "1"  # for the processes this one starts
        # huggingface_hub read the variable when a recipe imported TRL, before llmreg: set what it read, too.
        constants.HF_HUB_OFFLINE = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator-detection warning


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
    recipe's own dataclasses, as before, and keeps the launch options in ``launch_arguments``.

    Options must be spelt out: argparse's prefix matching would take ``--max_step 5`` for ``--max_steps``, while a
    misspelt YAML key is an error. Every parsing error is an ``InputError``: one line, no traceback."""

    launch_arguments: LaunchArguments | None = None

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)

    def parse_args_and_config(self, args=None, **kwargs) -> tuple:
        args = list(sys.argv[1:] if args is None else args)
        if "--config" in args:
            index = args.index("--config")
            if index + 1 >= len(args):
                raise InputError("--config needs a YAML file's path.")
            check_yaml_config(args[index + 1])
        try:
            launch_arguments, *parsed = super().parse_args_and_config(args, **kwargs)
        except InputError:
            raise
        except (ValueError, FileNotFoundError) as error:
            raise InputError(self._explain(str(error))) from error
        self.launch_arguments = launch_arguments
        return tuple(parsed)

    def error(self, message: str):
        """argparse's errors (a missing value, a bad choice): an ``InputError``, not argparse's usage line, which would
        list every option of the recipe."""
        raise InputError(f"{message}. `{self.prog} --help` lists the options.")

    def _explain(self, message: str) -> str:
        """HfArgumentParser's message on unknown options, with the closest valid option for each."""
        match = re.match(r"Some specified arguments are not used by the HfArgumentParser: (\[.*\])$", message)
        if match is None:
            return message
        valid = [option for option in self._option_string_actions if option.startswith("--") and "-" not in option[2:]]
        hints = []
        for option in re.findall(r"'(--[^'=]+)", match.group(1)):
            close = difflib.get_close_matches(option, valid, n=3, cutoff=0.6)
            hints.append(f"{option} (did you mean {' or '.join(close)}?)" if close else option)
        return (f"Unknown option{'s' if len(hints) > 1 else ''}: {', '.join(hints)}. Options are spelt out in full "
                f"(no abbreviations); `{self.prog} --help` lists them.")


def check_yaml_config(path: str) -> dict:
    """The YAML config at ``path`` as a mapping, or an ``InputError`` naming the file, the line and the problem."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as error:
        raise InputError(f"Cannot read the config file {path}: {error.strerror or error}.") from error
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InputError(f"{path}{where}: not valid YAML ({problem}).") from error
    if not isinstance(config, dict):
        raise InputError(f"{path} must be a YAML mapping of keys to values (key: value lines); it holds "
                         f"{type(config).__name__}.")
    return config


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
    recipe_environment()
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
        raise InputError(f"{', '.join(launch)} choose how `llmreg run` launches a recipe, but this process was not "
                         "started by `llmreg run`, so they would be ignored. Launch with `llmreg run <method> ...`, "
                         "or remove them and pass accelerate's own options (accelerate launch --config_file ...).")
    check_paths(parsed)
    for arguments in parsed:
        if isinstance(arguments, ModelConfig):
            arguments.model_name_or_path = resolve_model_name_or_path(arguments.model_name_or_path)
    return parsed


def check_paths(parsed: tuple) -> None:
    """Before any model loads: every model and dataset a recipe names exists (a lab id, a local path, or a hub id
    that is cached, or on the hub when online). Lab models are not built here."""
    for arguments in parsed:
        for name, value in vars(arguments).items():
            # "auto" (the recipe picks one) and "none" (no such set): unlearning's world_dataset_name.
            if not isinstance(value, str) or value.lower() in ("", "auto", "none"):
                continue
            if name.endswith("dataset_name"):
                check_dataset_reference(value, f"--{name}")
            elif name in ("model_name_or_path", "base_model_name_or_path", "gold_model") and value not in LAB_MODELS:
                try:
                    resolve_model_name_or_path(value)
                except (ValueError, FileNotFoundError) as error:
                    raise InputError(f"--{name}: {error}") from error


def check_dataset_reference(name: str, option: str = "--dataset_name") -> None:
    """``name`` is something ``load_recipe_dataset`` can load, or an ``InputError`` says why not."""
    if name in LAB_DATASETS or Path(name).expanduser().exists():
        return
    if name.startswith("llmreg/"):
        raise InputError(f"{option}: unknown lab dataset {name!r}; valid lab datasets: {', '.join(LAB_DATASETS)}.")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise InputError(f"{option}: {name} does not exist. Pass an existing dataset directory (save_to_disk, or data "
                         f"files), a hub id, or a lab dataset ({', '.join(LAB_DATASETS)}).")
    hub_cache = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    if hub_cache.is_dir() or any(datasets_cache.glob(f"{name.replace('/', '___')}*")):
        return
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"{option}: {name!r} is not a local path and is not in the Hugging Face cache, and the hub "
                         "is offline (HF_HUB_OFFLINE=1). Download it first (HF_HUB_OFFLINE=0), pass a local directory "
                         f"or use a lab dataset ({', '.join(LAB_DATASETS)}).")


def run_recipe(main, parser: RecipeParser, args: list[str] | None = None) -> None:
    """Parse the command line, then run the recipe's ``main`` with the parsed dataclasses. Bad input ends in one line
    and exit status 2; Ctrl-C in one line saying what is kept in the output directory and how to continue."""
    try:
        parsed = parse_recipe_args(parser, args)
    except InputError as error:
        _exit(2, f"{parser.prog}: error: {error}")
    output_dir = next((arguments.output_dir for arguments in parsed if hasattr(arguments, "output_dir")), None)
    try:
        main(*parsed)
    except InputError as error:
        _exit(2, f"{parser.prog}: error: {error}")
    except KeyboardInterrupt:
        _exit(130, f"Interrupted. What was saved stays in {output_dir} (finished stages and checkpoints); rerun the "
                   "same command to continue from there.")


def _exit(status: int, message: str) -> None:
    """End the process with ``message`` on stderr, written once (by the main process of a distributed launch)."""
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(message + "\n")
    sys.exit(status)


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
