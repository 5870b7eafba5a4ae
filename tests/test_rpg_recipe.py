"""recipes/rpg.py end to end through ``accelerate launch``: one process, DDP and ZeRO-3, old and fixed reference."""

import json
import math

import pytest
from safetensors.torch import load_file
from test_recipes import REPO, launch


SMALL = ["--max_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
         "--rpg_beta", "0.05"]


def launch_rpg(accelerate_config, output_dir, *extra):
    launch(accelerate_config, REPO / "recipes" / "rpg.py", "--config", str(REPO / "recipes" / "configs" /
                                                                          "rpg_lab.yaml"),
           *SMALL, "--output_dir", str(output_dir), *extra)


def assert_trained(output_dir, lab_model_dir, divergence="ufkl"):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if f"rpg/{divergence}" in entry]
    assert state["global_step"] == 4 and len(steps) == 4
    assert all(math.isfinite(entry["loss"]) for entry in steps)
    before, after = load_file(lab_model_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert all(not before[name].equal(after[name].to(before[name].dtype)) for name in before)
    return json.loads((output_dir / "rpg_results.json").read_text())


@pytest.mark.slow
def test_rpg_recipe_reports_accuracy_before_and_after_and_the_kl(lab_model_dir, tmp_path):
    launch_rpg("single_process.yaml", tmp_path, "--divergence", "urkl", "--estimator", "reinforce")
    summary = assert_trained(tmp_path, lab_model_dir, "urkl")
    assert summary["variant"] == "urkl/reinforce/ref=old/clip=rpg"
    baseline = json.loads((lab_model_dir / "lab_info.json").read_text())["baseline_scores"]["arithmetic_accuracy"]
    assert summary["arithmetic_accuracy_before"] == baseline
    assert 0.0 <= summary["arithmetic_accuracy_after"] <= 100.0
    assert summary["mean_kl_to_reference"] > 0  # URKL's estimate is non-negative, positive once the policy moved
