"""Recipe plumbing: YAML + command line precedence, unknown keys, CPU defaults, lab defaults, bad input."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from llmreg.errors import InputError
from llmreg.lab import LAB_MODEL_ID
from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, parse_recipe_args
from llmreg.trainer_utils import check_dataset_columns


sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
import booster
import forgetting
import ftaas
import lora_dropout
import reweight
import rpg
import rspo
import sft
import spin
import unlearn


REPO = Path(__file__).parents[1]


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved (untrained) model directory, so these tests need no lab build."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    path = tmp_path / "model"
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def write_yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_lab_model_the_recipe_dataset_and_cpu(tiny_model_dir):
    parser = sft.make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config([])
    assert model_args.model_name_or_path == LAB_MODEL_ID
    assert script_args.dataset_name == "llmreg/arithmetic"
    assert training_args.output_dir == "outputs/sft"
    if not torch.accelerator.is_available():
        assert training_args.use_cpu and not training_args.bf16


def test_command_line_beats_yaml_beats_recipe_default(tmp_path, tiny_model_dir):
    config = write_yaml(tmp_path, f"model_name_or_path: {tiny_model_dir}\nlearning_rate: 0.25\nmax_steps: 7\n"
                                  "output_dir: from-yaml\n")
    _, training_args, model_args = parse_recipe_args(
        sft.make_parser(), ["--config", config, "--max_steps", "3"]
    )
    assert training_args.max_steps == 3  # command line over YAML
    assert training_args.learning_rate == 0.25  # YAML over the dataclass default
    assert training_args.output_dir == "from-yaml"  # YAML over the recipe default
    assert model_args.model_name_or_path == tiny_model_dir


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    config = write_yaml(tmp_path, "learning_rat: 0.001\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_recipe_args(sft.make_parser(), ["--config", config])


def test_unknown_command_line_flag_is_an_error(tiny_model_dir):
    with pytest.raises(InputError, match="--max_stepz"):
        parse_recipe_args(sft.make_parser(), ["--model_name_or_path", tiny_model_dir, "--max_stepz", "3"])


def test_recipe_default_for_a_field_no_dataclass_has_is_an_error():
    from trl import ModelConfig, ScriptArguments, SFTConfig

    with pytest.raises(ValueError, match="no_such_field"):
        make_recipe_parser((ScriptArguments, SFTConfig, ModelConfig), dataset_name="llmreg/arithmetic",
                           output_dir="x", no_such_field=1)


def test_missing_model_path_fails_before_training(tmp_path):
    with pytest.raises(InputError, match="--model_name_or_path: .* does not exist"):
        parse_recipe_args(sft.make_parser(), ["--model_name_or_path", str(tmp_path / "missing")])


@pytest.mark.parametrize(("args", "message"), [
    (["--max_step", "5"], r"Unknown option: --max_step \(did you mean --max_steps"),
    (["--learnin_rate", "1e-3"], r"--learnin_rate \(did you mean --learning_rate"),
    (["--dataset_name", "/no/such/data"], r"--dataset_name: /no/such/data does not exist"),
    (["--dataset_name", "llmreg/arithmetc"], r"unknown lab dataset 'llmreg/arithmetc'; valid lab datasets: "),
    (["--dataset_name", "nobody/no-such-dataset"], r"is not in the Hugging Face cache, and the hub is offline"),
    (["--resume_from_checkpoint"], r"expected one argument"),
])
def test_bad_command_lines_are_input_errors_naming_the_fix(args, message):
    # An abbreviation is not taken for the option it starts (argparse's default would train 5 steps here).
    with pytest.raises(InputError, match=message):
        parse_recipe_args(sft.make_parser(), args)


@pytest.mark.parametrize(("text", "message"), [
    ("learning_rate: [1e-3,\nmax_steps: 2\n", r"bad.yaml, line 3, column 1: not valid YAML \(expected ',' or ']'"),
    ("- a\n- b\n", r"must be a YAML mapping .* it holds list"),
])
def test_invalid_yaml_names_the_file_and_the_line(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(InputError, match=message):
        parse_recipe_args(sft.make_parser(), ["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(InputError, match="Cannot read the config file .*missing.yaml"):
        parse_recipe_args(sft.make_parser(), ["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("command", [["recipes/sft.py"], ["-m", "llmreg", "run", "sft"]])
def test_bad_input_ends_in_one_line_without_a_traceback_before_any_model_loads(tmp_path, command):
    # The lab model cache points at an empty directory: any model load would build it (minutes), so a quick exit
    # shows that the error came first.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMREG_CACHE": str(tmp_path / "empty-cache")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, *command, "--dataset_name", str(tmp_path / "missing"), "--max_step", "1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error: Unknown option: --max_step (did you mean --max_steps" in lines[0], lines
    assert not (tmp_path / "empty-cache").exists() and time.monotonic() - started < 120


def test_missing_dataset_column_names_the_columns_and_the_formats(tmp_path, tiny_model_dir):
    Dataset.from_dict({"question": ["What is 1 + 1?"], "answer": ["2"]}).save_to_disk(tmp_path / "data")
    script_args, training_args, model_args = parse_recipe_args(
        sft.make_parser(),
        ["--model_name_or_path", tiny_model_dir, "--dataset_name", str(tmp_path / "data"),
         "--output_dir", str(tmp_path / "out")],
    )
    with pytest.raises(ValueError, match=r"columns are \['answer', 'question'\].*'prompt', 'completion'"):
        sft.main(script_args, training_args, model_args)
    assert not (tmp_path / "out").exists()  # failed before the trainer was built


def test_check_dataset_columns_returns_the_matching_format():
    formats = {"conversational": ("messages",), "prompt-completion": ("prompt", "completion")}
    dataset = Dataset.from_dict({"prompt": ["a"], "completion": ["b"], "extra": [1]})
    assert check_dataset_columns(dataset, formats, "SFT") == "prompt-completion"
    with pytest.raises(ValueError, match="SFT cannot use this dataset"):
        check_dataset_columns(Dataset.from_dict({"prompt": ["a"]}), formats, "SFT")


def test_unknown_lab_dataset_is_an_error_listing_the_valid_ones(tiny_model_dir):
    from trl import ScriptArguments

    with pytest.raises(InputError, match="llmreg/arithmetic"):  # when parsed
        parse_recipe_args(sft.make_parser(), ["--model_name_or_path", tiny_model_dir,
                                              "--dataset_name", "llmreg/arithmetik"])
    script_args = ScriptArguments(dataset_name="llmreg/arithmetik")
    with pytest.raises(ValueError, match="llmreg/arithmetic"):  # and when loaded
        load_recipe_dataset(script_args, "train", model_name_or_path=tiny_model_dir)


@pytest.mark.parametrize(("recipe", "config"), [
    (sft, "sft.yaml"), (rpg, "rpg_lab.yaml"), (rspo, "rspo_lab.yaml"), (spin, "spin_lab.yaml"),
    (booster, "booster_lab.yaml"), (ftaas, "ftaas_lab.yaml"), (lora_dropout, "lora_dropout_lab.yaml"),
    (unlearn, "unlearn_lab.yaml"), (reweight, "reweight_lab.yaml"), (forgetting, "forgetting_lab.yaml"),
])
def test_no_arguments_run_what_the_shipped_lab_config_spells_out(recipe, config):
    path = str(Path(__file__).parents[1] / "recipes" / "configs" / config)
    bare = recipe.make_parser().parse_args_and_config([])
    configured = recipe.make_parser().parse_args_and_config(["--config", path])
    assert len(bare) == len(configured)
    for plain, from_yaml in zip(bare, configured):
        if hasattr(plain, "to_dict"):  # TrainingArguments: compare the serializable view
            assert plain.to_dict() == from_yaml.to_dict()
        else:
            assert plain == from_yaml


@pytest.mark.parametrize(("environment", "offline"), [({}, True), ({"HF_HUB_OFFLINE": "0"}, False)])
def test_recipes_are_offline_unless_the_user_says_otherwise(environment, offline):
    # A recipe imports TRL, and so huggingface_hub, before llmreg: offline mode must hold all the same once the recipe
    # builds its parser. Importing llmreg changes nothing in another library (a library user's script stays online).
    code = ("import trl, huggingface_hub, llmreg.recipe_utils, os, sys; "
            "print(huggingface_hub.constants.is_offline_mode(), os.environ.get('HF_HUB_OFFLINE')); "
            "sys.path.insert(0, 'recipes'); import sft; sft.make_parser(); "
            "print(huggingface_hub.constants.is_offline_mode(), os.environ['HF_HUB_OFFLINE'])")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", code], env={**env, **environment}, capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parents[1])
    imported, parser_built = (line.split() for line in result.stdout.splitlines()[-2:])
    assert imported == ["False", "None"] if not environment else imported[0] == str(offline)
    assert parser_built[0] == str(offline)


@pytest.mark.parametrize(("recipe", "config"), [
    (rpg, "rpg.yaml"), (rspo, "rspo.yaml"), (spin, "spin.yaml"), (booster, "booster.yaml"), (ftaas, "ftaas.yaml"),
    (unlearn, "unlearn.yaml"), (reweight, "reweight.yaml"),
])
def test_paper_configs_name_only_known_fields(recipe, config):
    # The paper settings cannot run here (no hub, no GPU), but every key must be a field the recipe knows.
    path = str(Path(__file__).parents[1] / "recipes" / "configs" / config)
    parsed = recipe.make_parser().parse_args_and_config(["--config", path])
    assert any(getattr(arguments, "model_name_or_path", "").count("/") == 1 for arguments in parsed)


def test_the_ftaas_recipe_parses_its_grid_and_both_stages(tiny_model_dir):
    _, grid, alignment, _ = parse_recipe_args(ftaas.make_parser(), [
        "--model_name_or_path", tiny_model_dir, "--harmful_ratios", "0", "0.05", "--booster_lambda", "1",
        "--finetune_learning_rate", "3e-5"])
    assert grid.harmful_ratios == [0.0, 0.05] and grid.methods == ["sft", "booster"]
    assert grid.finetune_learning_rate == 3e-5 and alignment.booster_lambda == 1.0


@pytest.mark.parametrize("recipe", [sft, booster, ftaas, lora_dropout, reweight, rpg, rspo, spin, unlearn,
                                    forgetting])
def test_every_recipe_quantizes_the_base_for_qlora_and_refuses_it_without_lora(recipe, tiny_model_dir):
    # --load_in_4bit reaches from_pretrained through model_init_kwargs in every recipe (none ignores it); without
    # --use_peft the quantized weights could not train, so it is refused before anything loads.
    pytest.importorskip("bitsandbytes", reason="the optional bnb extra: pip install 'llmreg[bnb]'")
    from llmreg.recipe_utils import model_init_kwargs

    model = ["--model_name_or_path", tiny_model_dir]
    parsed = parse_recipe_args(recipe.make_parser(), [*model, "--load_in_4bit", "--use_peft"])
    training_args, model_args = parsed[-2], parsed[-1]
    assert model_init_kwargs(model_args, training_args)["quantization_config"].load_in_4bit
    parsed = parse_recipe_args(recipe.make_parser(), [*model, "--load_in_4bit", "--use_peft", "false"])
    with pytest.raises(ValueError, match="add --use_peft"):
        model_init_kwargs(parsed[-1], parsed[-2])


def test_ctrl_c_and_bad_input_in_a_recipe_end_in_one_line(tmp_path, capsys, tiny_model_dir):
    from llmreg.recipe_utils import run_recipe

    def interrupted(*parsed):
        raise KeyboardInterrupt

    def refused(*parsed):
        raise InputError("the dataset has no 'prompt' column")

    capsys.readouterr()  # what saving the model fixture printed
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(interrupted, sft.make_parser(), ["--output_dir", str(tmp_path / "run"), "--model_name_or_path",
                                                    tiny_model_dir])
    assert exit_info.value.code == 130
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and str(tmp_path / "run") in message and "rerun the same command" in message
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(refused, sft.make_parser(), ["--output_dir", str(tmp_path / "run"), "--model_name_or_path",
                                                tiny_model_dir])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: the dataset has no 'prompt' column")


def test_ctrl_c_in_llmreg_ends_in_one_line(monkeypatch, capsys):
    import llmreg.ablate
    from llmreg.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llmreg.ablate, "ablate", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "sweep.yaml"])
    assert exit_info.value.code == 130
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "rerun the same command to continue" in message and "Traceback" not in message


def test_a_derived_stage_config_keeps_the_runs_settings_and_takes_its_own(tmp_path):
    # The unlearning recipe's fact fine-tune (and the FTaaS customer's) is an SFTConfig derived from the run's config:
    # what the user set for the run (optimizer, clipping, accumulation, weight decay) carries over; the stage's own
    # options replace theirs; the method's own fields (an UnlearnConfig's objective) have no place in it.
    from trl import SFTConfig

    from llmreg.trainer_utils import derived_config
    from llmreg.unlearn import UnlearnConfig

    run = UnlearnConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", objective="npo",
                        optim="adafactor", max_grad_norm=0.3, gradient_accumulation_steps=4, weight_decay=0.05,
                        max_steps=7, learning_rate=1e-5)
    stage = derived_config(SFTConfig, run, output_dir="finetune", max_steps=-1, learning_rate=3e-4)
    assert type(stage) is SFTConfig and not hasattr(stage, "objective")
    assert (stage.optim, stage.max_grad_norm, stage.gradient_accumulation_steps, stage.weight_decay) == (
        run.optim, 0.3, 4, 0.05)
    assert (stage.output_dir, stage.max_steps, stage.learning_rate) == ("finetune", -1, 3e-4)
