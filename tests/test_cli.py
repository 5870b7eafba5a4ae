"""The ``llmreg`` command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmreg
from llmreg.cli import main


def test_version_from_the_installed_entry_point():
    result = subprocess.run([sys.executable, "-m", "llmreg", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"llmreg {llmreg.__version__}"


def test_lab_info_for_a_model_not_built_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMREG_CACHE", str(tmp_path))
    assert main(["lab", "info", "--seed", "7"]) == 1
    printed = capsys.readouterr().out
    assert "not built yet" in printed and "llmreg lab build" in printed and str(tmp_path) in printed


# --- llmreg list / --help -------------------------------------------------------------------------------------------

def test_list_names_every_method_config_sweep_and_accelerate_config(capsys):
    from llmreg.launch import RECIPES_DIR, accelerate_config_names, recipe_names

    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    assert {"rpg", "rspo", "spin", "booster", "sft", "unlearn", "reweight", "lora_dropout", "ftaas"} <= set(
        recipe_names())
    for method in recipe_names():
        assert f"\n  {method} " in printed
    for config in (RECIPES_DIR / "configs").glob("*.yaml"):
        assert f"configs/{config.name}" in printed
    for sweep in (RECIPES_DIR / "sweeps").glob("*.yaml"):
        assert f"sweeps/{sweep.name}" in printed
    for name in accelerate_config_names():
        assert f"\n  {name} " in printed
    assert {"zero2", "zero3", "fsdp2", "multi_process", "single_process"} <= set(accelerate_config_names())


@pytest.mark.parametrize("command", [["list"], ["run"], ["ablate"], ["report"], ["lab"], []])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "examples:" in printed and f"llmreg {command[0] if command else 'run'}" in printed


def test_run_help_is_the_recipes_help_with_its_launch_options(capsys):
    assert main(["run", "rpg", "--help"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: llmreg run rpg")
    for key in ("--accelerate_config", "--num_processes", "--divergence", "--estimator", "--learning_rate"):
        assert key in printed
    # A page, not the 1,400 lines of every training argument: the recipe's own keys, the common ones, and the way to
    # the rest.
    assert len(printed.splitlines()) < 100
    for mention in ("--config FILE.yaml", "--dry_run", "--help-all", "(default: 'ufkl')", "(default: 800)"):
        assert mention in printed
    assert main(["run", "rpg", "--help-all"]) == 0
    everything = capsys.readouterr().out
    assert len(everything.splitlines()) > 500 and "--gradient_checkpointing" in everything


def test_dry_run_prints_the_launch_line_and_no_warning(tmp_path):
    # A fresh process, as a user runs it: no library's warning (bitsandbytes' CPU kernel, accelerate's guessed
    # defaults, deprecations) on a command that only prints.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, "-m", "llmreg", "run", "sft", "--max_steps", "5", "--dry_run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert result.stdout.count("\n") == 1 and "accelerate.commands.launch" in result.stdout
    assert "--quiet" in result.stdout and "--max_steps 5" in result.stdout


def test_run_refuses_an_unknown_method_listing_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["run", "rgp"])
    assert "invalid choice: 'rgp'" in capsys.readouterr().err


def test_run_refuses_bad_recipe_arguments_before_launching(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "rpg", "--divergence", "kl", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "fkl" in capsys.readouterr().err  # the valid choices are listed
    with pytest.raises(SystemExit):
        main(["run", "rpg", "--max_stepz", "3"])
    assert not (tmp_path / "out").exists()


# --- the command line wins over the YAML, for every key -------------------------------------------------------------

# Keys HfArgumentParser cannot take from a command line at all (a dict, an object): YAML only, so no precedence.
YAML_ONLY = {"liger_kernel_config", "parallelism_config", "model_init_kwargs", "gradient_checkpointing_kwargs"}


def yaml_and_command_line_values(action):
    """Two different valid values of a parser action: the YAML's (a Python value) and the command line's (strings,
    and the value they parse to)."""
    if action.choices:
        choices = list(action.choices)
        return choices[0], [str(choices[1])], choices[1]
    element = action.type.__name__
    yaml_value, cli_value = {"int": (3, 5), "float": (0.25, 0.5), "string_to_bool": (True, False)}.get(
        element, ("from-yaml", "from-cli"))
    if action.nargs in ("+", "*"):
        if element == "DebugOption":
            return ["underflow_overflow"], ["tpu_metrics_debug"], [action.type("tpu_metrics_debug")]
        return [yaml_value], [str(cli_value), str(cli_value)], [cli_value, cli_value]
    return yaml_value, [str(cli_value)], cli_value


@pytest.mark.parametrize("method", ["sft", "rpg", "rspo", "spin", "booster", "ftaas", "lora_dropout", "reweight",
                                    "unlearn"])
def test_command_line_wins_over_yaml_for_every_key_of_every_recipe(method, tmp_path):
    # The YAML sets every key one way and the command line every key another: the parsed value is the command line's.
    # (Parsed to argparse's namespace: the values are type-valid but not a coherent config, so no dataclass is built.)
    import argparse

    from llmreg.launch import recipe_parser

    parser = recipe_parser(method)
    yaml_config, argv, expected = {}, [], {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or any(o.startswith("--no_") for o in action.option_strings):
            continue
        if action.dest in YAML_ONLY or action.type is None:
            assert action.dest in YAML_ONLY, f"{action.dest} has no type: how would the command line set it?"
            continue
        yaml_value, cli_strings, cli_value = yaml_and_command_line_values(action)
        yaml_config[action.dest] = yaml_value
        argv += [action.option_strings[0], *cli_strings]
        expected[action.dest] = cli_value
    assert {"accelerate_config", "num_processes", "learning_rate", "output_dir", "model_name_or_path"} <= set(expected)
    unknown = parser.set_defaults_with_config(**yaml_config)  # what parse_args_and_config does with --config
    assert not unknown
    namespace, remaining = argparse.ArgumentParser.parse_known_args(parser, argv)
    assert not remaining
    wrong = {key: (getattr(namespace, key), value) for key, value in expected.items()
             if getattr(namespace, key) != value}
    assert not wrong, f"the YAML's value won for {sorted(wrong)}"


def test_command_line_wins_over_yaml_for_launch_options_and_recipe_keys(tmp_path, capsys):
    # huggingface/trl#7031: there, a YAML accelerate_config wins over --accelerate_config on the command line.
    config = tmp_path / "run.yaml"
    config.write_text("accelerate_config: zero2\nnum_processes: 1\nmain_process_port: 29600\nmax_steps: 7\n"
                      f"output_dir: {tmp_path / 'yaml-out'}\n")
    assert main(["run", "sft", "--config", str(config), "--accelerate_config", "zero3", "--num_processes", "2",
                 "--dry_run"]) == 0
    command = capsys.readouterr().out.split()
    config_file = command[command.index("--config_file") + 1]
    assert config_file.endswith("deepspeed_zero3.yaml")
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("--main_process_port") + 1] == "29600"  # the YAML's, where the CLI is silent
    assert not (tmp_path / "yaml-out").exists()  # a dry run writes nothing

    from llmreg.launch import parse_recipe_command_line

    _, launch, settings = parse_recipe_command_line("sft", ["--config", str(config), "--max_steps", "9"])
    assert launch == {"accelerate_config": "zero2", "num_processes": 1, "main_process_port": 29600}
    assert settings["max_steps"] == 9 and settings["output_dir"] == str(tmp_path / "yaml-out")
    assert settings["learning_rate"] == 5e-4  # the recipe's default, recorded as a setting


def test_launch_options_are_refused_where_llmreg_did_not_launch_the_recipe(monkeypatch):
    # `accelerate launch recipes/sft.py --num_processes 2` would ignore the 2: refused, with the way to do it.
    from llmreg.launch import recipe_parser
    from llmreg.recipe_utils import LAUNCHED_BY_LLMREG, parse_recipe_args

    monkeypatch.delenv(LAUNCHED_BY_LLMREG, raising=False)
    with pytest.raises(ValueError, match=r"num_processes.*llmreg run"):
        parse_recipe_args(recipe_parser("sft"), ["--num_processes", "2"])


def test_an_unknown_accelerate_config_lists_the_shipped_ones():
    from llmreg.launch import accelerate_config_path

    assert accelerate_config_path("deepspeed_zero3").name == "deepspeed_zero3.yaml"
    assert accelerate_config_path("zero3").name == "deepspeed_zero3.yaml"
    with pytest.raises(ValueError, match="zero3_offload.*single_process|single_process.*zero3_offload"):
        accelerate_config_path("zero4")


def test_lab_info_lists_the_real_lab_models_built_or_how_to_build_them(lab_model_dir, capsys):
    from llmreg.lab.model import LAB_MODEL_DIRS, is_lab_model

    assert main(["lab", "info"]) == 0
    printed = capsys.readouterr().out
    for model_id in ("llmreg/smollm2-135m", "llmreg/smollm2-135m-2layers"):
        path = LAB_MODEL_DIRS[model_id]()
        expected = f"  path        {path}" if is_lab_model(path) else f"`llmreg lab build --model {model_id}`"
        assert f"\n{model_id}  (" in printed and expected in printed


@pytest.mark.slow
def test_the_wheel_builds_without_setuptools_warnings_and_ships_the_recipes(tmp_path):
    repo = Path(llmreg.__file__).parents[1]
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", str(repo), "-w",
               str(tmp_path / "wheel")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BuildBackendWarning" not in result.stdout + result.stderr
    import zipfile

    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("llmreg-*.whl"))).namelist()
    for shipped in ("llmreg/recipes/rspo.py", "llmreg/recipes/configs/rspo.yaml",
                    "llmreg/recipes/sweeps/rpg_variants.yaml", "llmreg/accelerate_configs/single_process.yaml"):
        assert shipped in names, shipped
