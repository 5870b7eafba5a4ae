"""Find the shipped recipes and accelerate configs, and launch a recipe the way ``llmreg run`` does.

The recipes (``recipes/<method>.py``) and accelerate configs (``accelerate_configs/*.yaml``) are installed inside the
package as ``llmreg.recipes`` and ``llmreg.accelerate_configs``, so these work from any install, not only from a
clone.

A recipe's launch options (``LaunchArguments``: ``accelerate_config``, ``num_processes``, ...) are parsed by the
recipe's own parser, with its YAML, so the command line wins over the YAML for them as for every other key. (TRL's
CLI reads ``--accelerate_config`` apart from the YAML, where the YAML's value wins: huggingface/trl#7031.)
"""

import argparse
import ast
import dataclasses
import enum
import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from llmreg import accelerate_configs, recipes


logger = logging.getLogger(__name__)

RECIPES_DIR = Path(recipes.__file__).parent
ACCELERATE_CONFIGS_DIR = Path(accelerate_configs.__file__).parent
RUN_RECORD = "llmreg_run.yaml"  # written into a run's output_dir: what was launched, with which settings


def recipe_names() -> list[str]:
    """Every recipe: ``sft``, ``rpg``, ... (the file names of ``recipes/``)."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.py") if path.stem != "__init__")


def recipe_path(method: str) -> Path:
    if method not in recipe_names():
        raise ValueError(f"Unknown method {method!r}; valid methods: {', '.join(recipe_names())}.")
    return RECIPES_DIR / f"{method}.py"


def recipe_summary(method: str) -> str:
    """The first line of the recipe's docstring, read without importing it (``llmreg list`` stays fast)."""
    docstring = ast.get_docstring(ast.parse(recipe_path(method).read_text())) or ""
    return first_sentence(docstring.split("\n\n")[0])


def first_sentence(text: str) -> str:
    return " ".join(text.split()).split(". ")[0].removesuffix(".").rstrip(":")


def recipe_parser(method: str):
    """The recipe's ``make_parser()``, its ``prog`` set to ``llmreg run <method>``."""
    recipe_path(method)  # an unknown method is an error listing the valid ones
    parser = importlib.import_module(f"llmreg.recipes.{method}").make_parser()
    parser.prog = f"llmreg run {method}"
    return parser


def recipe_configs(method: str) -> list[Path]:
    """The shipped YAML configs of a recipe: ``<method>.yaml`` and ``<method>_*.yaml``."""
    configs = RECIPES_DIR / "configs"
    return sorted([*configs.glob(f"{method}.yaml"), *configs.glob(f"{method}_*.yaml")])


def accelerate_config_names() -> dict[str, Path]:
    """Shipped accelerate configs by name: the file's name without ``deepspeed_`` and ``.yaml`` (``zero3``)."""
    return {path.stem.removeprefix("deepspeed_"): path for path in sorted(ACCELERATE_CONFIGS_DIR.glob("*.yaml"))}


def accelerate_config_path(name_or_path: str) -> Path:
    """A shipped config's name (``zero3``, also ``deepspeed_zero3``) or a path to an accelerate YAML."""
    names = accelerate_config_names()
    name = name_or_path.removeprefix("deepspeed_").removesuffix(".yaml")
    if name in names and not Path(name_or_path).is_file():
        return names[name]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"Unknown accelerate config {name_or_path!r}: neither a file nor a shipped config "
                         f"({', '.join(names)}).")
    return path


def yaml_safe(value):
    """A parsed value as plain YAML: enums by their value, tuples and lists as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [yaml_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): yaml_safe(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def without_config_flag(argv: list[str]) -> list[str]:
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        del argv[index:index + 2]
    return argv


def parse_recipe_command_line(method: str, argv: list[str]) -> tuple[tuple, dict, dict]:
    """Parse (and so validate, before anything launches) a recipe's command line and ``--config`` YAML.

    Returns the recipe's dataclasses, the launch options given, and the settings: every key whose value is not its
    dataclass default, set by the recipe's defaults, the YAML or the command line (the run's record).
    """
    from llmreg.recipe_utils import check_paths

    parser = recipe_parser(method)
    parsed = parser.parse_args_and_config(list(argv))  # unknown keys, bad values: errors here
    check_paths(parsed)  # models and datasets exist, before anything launches
    # The parser now holds the recipe's and the YAML's values as its defaults; the command line goes over them.
    namespace, _ = argparse.ArgumentParser.parse_known_args(parser, without_config_flag(argv))
    field_defaults = {}
    for dataclass_type in parser.dataclass_types:
        for field in dataclasses.fields(dataclass_type):
            default = field.default
            if field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            field_defaults[field.name] = None if default is dataclasses.MISSING else default
    unset = (None, "", [])  # HfArgumentParser's None for a field whose default is "" or []: not a setting
    settings = {key: yaml_safe(value) for key, value in vars(namespace).items() if key in field_defaults
                and value != field_defaults[key] and not (value in unset and field_defaults[key] in unset)}
    return parsed, parser.launch_arguments.given(), settings


def accelerate_default_config() -> Path:
    """Where ``accelerate config`` saves the machine's default launch config."""
    from llmreg._compat import accelerate_default_config_file

    return Path(accelerate_default_config_file())


def launch_command(method: str, launch: dict, argv: list[str]) -> list[str]:
    """``accelerate launch [options] recipes/<method>.py ARGV``; ARGV still holds the launch options (the recipe
    accepts them when started by llmreg).

    ``--quiet``: a recipe that fails prints its own error (one line for bad input); accelerate does not add the
    child's traceback again inside a ``CalledProcessError``. Without an accelerate config given or saved on this
    machine (``accelerate config``), the shipped ``single_process`` config: accelerate would otherwise guess every
    option and print a block of "had defaults used instead" warnings."""
    options = ["--quiet"]
    if "accelerate_config" not in launch and not accelerate_default_config().is_file():
        launch = {"accelerate_config": "single_process", **launch}
    for key, value in launch.items():
        if key == "accelerate_config":
            options += ["--config_file", str(accelerate_config_path(value))]
        else:
            options += [f"--{key}", str(value)]
    return [sys.executable, "-m", "accelerate.commands.launch", *options, str(recipe_path(method)), *argv]


def launch_environment() -> dict[str, str]:
    from llmreg.recipe_utils import LAUNCHED_BY_LLMREG

    return {**os.environ, LAUNCHED_BY_LLMREG: "1"}


def output_dir_of(parsed: tuple) -> Path:
    return Path(next(arguments.output_dir for arguments in parsed if hasattr(arguments, "output_dir")))


def write_run_record(output_dir: Path, method: str, command: list[str], launch: dict, settings: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"method": method, "command": command, "launch": launch, "settings": settings}
    (output_dir / RUN_RECORD).write_text(yaml.safe_dump(record, sort_keys=False, allow_unicode=True))


def run_recipe(method: str, argv: list[str], *, dry_run: bool = False, log_file: Path | None = None) -> int:
    """Validate the recipe's arguments here, then run it through ``accelerate launch``; returns its exit status."""
    parsed, launch, settings = parse_recipe_command_line(method, argv)
    command = launch_command(method, launch, argv)
    if dry_run:
        sys.stdout.write(" ".join(command) + "\n")
        return 0
    write_run_record(output_dir_of(parsed), method, command, launch, settings)
    logger.info("Launching: %s", " ".join(command))
    if log_file is None:
        return subprocess.run(command, env=launch_environment(), check=False).returncode
    with open(log_file, "a") as log:
        return subprocess.run(command, env=launch_environment(), stdout=log, stderr=subprocess.STDOUT,
                              check=False).returncode
