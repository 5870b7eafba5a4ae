"""The launch matrix: every recipe under every shipped accelerate config, a few steps each on the lab model.

One launch per config runs all of that config's jobs (``jobs.py``, ``run_jobs.py``). For each recipe: the losses are
finite, the saved models moved away from the lab model (adapters are whole, with a non-zero B: under ZeRO-3 a LoRA
save can come out empty), and a checkpoint reloads and runs. A run resumed from its checkpoint ends where the
straight run did. The LoRA recipes also train on a bitsandbytes 4-bit base (QLoRA) and with bitsandbytes' 8-bit
AdamW. What llmreg refuses fails before training, with the reason.
"""

import json
import math

import pytest
import torch
from jobs import ALL_CONFIGS, CONFIGS_TWO_PROCESSES, QUANTIZED_CONFIGS, RECIPE_ARGS, REFUSED, SINGLE
from safetensors.torch import load_file


pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RESULT_FILES = {"booster": "booster_results.json", "ftaas": "results.json",
                "lora_dropout": "lora_dropout_results.json", "reweight": "reweight_results.json",
                "rpg": "rpg_results.json", "rspo": "summary.json", "spin": "summary.json",
                "unlearn": "unlearn_results.json"}


def losses(directory):
    return [entry["loss"] for state in directory.rglob("trainer_state.json")
            for entry in json.loads(state.read_text())["log_history"] if "loss" in entry]


def reload_and_run(checkpoint):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    if (checkpoint / "adapter_config.json").is_file():
        model = AutoPeftModelForCausalLM.from_pretrained(checkpoint)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 40, 41, 42, 2]])).logits
    assert torch.isfinite(logits).all(), checkpoint


def assert_trained(directory, lab_model_dir) -> None:
    found = losses(directory)
    assert found and all(math.isfinite(loss) for loss in found), found
    base = load_file(lab_model_dir / "model.safetensors")
    models, adapters = list(directory.rglob("model.safetensors")), list(directory.rglob("adapter_model.safetensors"))
    assert models or adapters, f"nothing saved in {directory}"
    for path in models:
        weights = load_file(path)
        assert {name: base[name].shape for name in base} == {name: weights[name].shape for name in base}, path
        assert any(not weights[name].equal(base[name].to(weights[name].dtype)) for name in base), f"untrained {path}"
    for path in adapters:
        weights = load_file(path)
        b_matrices = [value for name, value in weights.items() if "lora_B" in name]
        assert b_matrices and all(value.numel() > 0 for value in weights.values()), f"empty adapter {path}"
        assert any(value.abs().max() > 0 for value in b_matrices), f"B is still zero in {path}"
    saved = sorted(path for path in directory.rglob("checkpoint-*") if path.is_dir())
    assert saved, f"no checkpoint in {directory}"
    reload_and_run(saved[-1])


def recipe_cases():
    for config in ALL_CONFIGS:
        for recipe in RECIPE_ARGS:
            if f"recipe_{recipe}" not in REFUSED.get(config, {}):
                yield pytest.param(config, recipe, id=f"{config.removesuffix('.yaml')}-{recipe}")


@pytest.mark.parametrize(("config", "recipe"), list(recipe_cases()))
def test_every_recipe_trains_saves_and_reloads(matrix, lab_model_dir, config, recipe):
    launch = matrix(config)
    output = launch.output(f"recipe_{recipe}")
    assert_trained(output, lab_model_dir)
    if recipe in RESULT_FILES:
        assert (output / RESULT_FILES[recipe]).is_file()
    if recipe == "sft":
        # 3 steps of 4 rows per process over the 2000 lab rows: the epoch fraction counts the processes that trained.
        state = json.loads((output / "trainer_state.json").read_text())
        assert state["log_history"][-1]["epoch"] == pytest.approx(3 * 4 * launch.processes / 2000, rel=0.02)
    if recipe in ("rspo", "spin"):
        # Each process samples whole generation batches, seeded by their position: every prompt has its samples, in
        # prompt order, and the same ones as on one process.
        rows = (output / "iter_1" / "generations.jsonl").read_text().splitlines()
        assert len(rows) == (64 if recipe == "rspo" else 16)  # jobs.RECIPE_ARGS' prompts_per_iteration
        if config != SINGLE:
            single = matrix(SINGLE).output(f"recipe_{recipe}") / "iter_1" / "generations.jsonl"
            assert rows == single.read_text().splitlines()
    if recipe == "unlearn" and config == "deepspeed_zero3.yaml":  # the whole protocol (jobs.UNLEARN_PROTOCOL)
        rows = {row["model"]: row for row in json.loads((output / "unlearn_results.json").read_text())["rows"]}
        assert list(rows) == ["original", "gold (never saw the forget split)", "ga + ℓ1 (λ1 = 0.001)"]
        original, gold, unlearned = rows.values()
        assert original["forget_accuracy"] > gold["forget_accuracy"]  # the fine-tune taught the forget split
        assert gold["forget_quality"] == 1.0
        assert unlearned["forget_accuracy"] < original["forget_accuracy"]  # gradient ascent unlearned some of it
        # What llmreg report and llmreg ablate read: each model's scores, flat, in its own directory.
        from llmreg.report import run_metrics

        metrics = run_metrics(output)
        assert metrics["unlearned/forget_quality"]["final"] == unlearned["forget_quality"]
        assert metrics["gold/forget_accuracy"]["final"] == gold["forget_accuracy"]


@pytest.mark.parametrize("config", ALL_CONFIGS)
@pytest.mark.parametrize("recipe", ["sft", "sft_lora"])
def test_a_run_resumed_from_its_checkpoint_ends_where_the_straight_run_did(matrix, config, recipe):
    launch = matrix(config)
    straight, resumed = launch.output(f"recipe_{recipe}"), launch.output(f"recipe_{recipe}_resumed")
    weights = "adapter_model.safetensors" if recipe.endswith("lora") else "model.safetensors"
    expected, got = load_file(straight / weights), load_file(resumed / weights)
    assert set(expected) == set(got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and losses(resumed)[-1] == pytest.approx(losses(straight)[-1], rel=1e-6)


def last_adapter(directory):
    return load_file(max(directory.rglob("adapter_model.safetensors")))


def holds_bnb_optimizer_state(value, depth=0) -> bool:
    if isinstance(value, dict):
        return "__bnb_optimizer_quant_state__" in value or (
            depth < 6 and any(holds_bnb_optimizer_state(v, depth + 1) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return depth < 6 and any(holds_bnb_optimizer_state(v, depth + 1) for v in value)
    return False


@pytest.mark.parametrize(("config", "recipe"), [(config, recipe) for recipe, configs in QUANTIZED_CONFIGS.items()
                                                for config in configs])
def test_lora_recipes_train_on_a_4bit_base_and_with_an_8bit_optimizer(matrix, lab_model_dir, config, recipe):
    launch = matrix(config)
    plain, qlora, optim8bit = (launch.output(f"recipe_{recipe}{suffix}") for suffix in ("", "_qlora", "_optim8bit"))
    for output in (qlora, optim8bit):
        assert_trained(output, lab_model_dir)
    # The same seed and data: the adapter trained through the 4-bit base's forward differs from the fp32 one.
    reference, quantized = last_adapter(plain), last_adapter(qlora)
    assert any(not quantized[name].equal(value) for name, value in reference.items())
    # The checkpoint holds bitsandbytes' optimizer state (it keeps tensors under 4096 entries, as all of the lab
    # model's LoRA matrices are, in 32 bits; larger ones in 8-bit blocks): optimizer.pt, or DeepSpeed's shards.
    checkpoint = max(path for path in optim8bit.rglob("checkpoint-*") if path.is_dir())
    states = list(checkpoint.rglob("*optim*.pt"))
    assert states and all(holds_bnb_optimizer_state(torch.load(path, weights_only=False)) for path in states)


@pytest.mark.parametrize(("config", "name", "message"),
                         [(config, name, message) for config, refused in REFUSED.items()
                          for name, message in refused.items()])
def test_refused_combinations_fail_before_training_with_the_reason(matrix, config, name, message):
    launch = matrix(config)
    error = launch.error(name)
    assert error is not None and "ValueError" in error and message in error, error
    assert not (launch.root / name).exists() or not losses(launch.root / name)


@pytest.mark.parametrize("config", [config for config in ALL_CONFIGS if config.startswith("deepspeed")])
def test_a_reference_model_that_trl_builds_after_the_user_loaded_the_policy(matrix, config):
    # The script loads its policy before parsing, and runs first in its launch. Without llmreg's deepspeed.comm
    # initialization in the parser, TRL's reference model then fails in DPOTrainer.__init__ under ZeRO-3 with
    # "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size" (checked by disabling
    # it).
    output = matrix(config).output("dpo_reference")
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(math.isfinite(loss) for loss in losses(output))


@pytest.mark.parametrize("config", CONFIGS_TWO_PROCESSES)
def test_lora_dropout_draws_its_masks_on_each_process(matrix, config):
    # With p = 0.5 and PEFT's B starting at 0 (ℓ1's sign(0) is 0), a row of B is non-zero after one SGD step iff some
    # process kept it: about p² of the rows stay zero, not p (one process's masks) nor 0.
    output = matrix(config).output("lora_dropout_masks")
    adapter = load_file(output / "adapter_model.safetensors")
    b_rows = torch.cat([value.abs().amax(dim=1) for name, value in adapter.items() if "lora_B" in name])
    assert 0.1 < (b_rows == 0).float().mean() < 0.5
    assert len(losses(output)) == 1 and 0 < losses(output)[0] < 100
