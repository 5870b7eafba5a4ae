"""recipes/forgetting.py: each arm trains with its regularizer and is scored, the table and plot are written, a
rerun reuses the stages, and bad arms are refused before anything trains."""

import json
import sys
from pathlib import Path

import pytest

from llmreg.errors import InputError
from llmreg.recipe_utils import parse_recipe_args


sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
import forgetting


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(lab_model_dir, tmp_path, *extra):
    args = ["--model_name_or_path", str(lab_model_dir), "--output_dir", str(tmp_path), "--max_steps", "6",
            "--per_device_train_batch_size", "8", "--num_eval_samples", "8", "--fisher_num_samples", "8",
            "--seeds", "0", "--disable_tqdm", "true", *extra]
    return forgetting.main(*parse_recipe_args(forgetting.make_parser(), args))


def test_every_arm_trains_with_its_regularizer_and_is_scored(lab_model_dir, tmp_path):
    arms = ["sft", "l2sp:0.01", "ewc:10", "kl_to_base:1", "replay:0.5", "ewc_decoupled:1000"]
    result = run(lab_model_dir, tmp_path, "--arms", *arms)
    assert set(result["arms"]) == set(arms)
    for row in [result["base"], *(rows[0] for rows in result["arms"].values())]:
        assert set(row) == {"arithmetic_accuracy", "old_facts_accuracy", "heldout_facts_accuracy"}
    logged = {arm: json.loads((tmp_path / arm.replace(":", "=") / "seed0" / "train" / "trainer_state.json")
                              .read_text())["log_history"][0] for arm in arms}
    assert "anchor/distance" in logged["l2sp:0.01"] and "anchor/distance" in logged["ewc:10"]
    assert "anchor/distance" in logged["ewc_decoupled:1000"]
    decoupled = json.loads((tmp_path / "ewc_decoupled=1000" / "seed0" / "llmreg_stage.json").read_text())
    assert decoupled["settings"]["anchor"] == {**decoupled["settings"]["anchor"], "anchor": "ewc",
                                               "anchor_decoupled": True}
    assert "kl_to_base/kl" in logged["kl_to_base:1"] and "anchor/distance" not in logged["sft"]
    assert (tmp_path / "fisher.safetensors").is_file()  # estimated once, under the output directory
    table = (tmp_path / "forgetting_results.md").read_text()
    assert "| base (before fine-tuning) |" in table and "Each arm minus SFT" in table
    assert (tmp_path / "forgetting_pareto.png").read_bytes()[:4] == b"\x89PNG"
    # The replay arm trained on old rows: half of its 48 rows (6 steps of 8) came from the facts.
    replay_data = json.loads((tmp_path / "replay=0.5" / "seed0" / "llmreg_stage.json").read_text())
    assert replay_data["settings"]["data"]["train"] != replay_data["settings"]["data"]["old"]
    again = run(lab_model_dir, tmp_path, "--arms", *arms)  # reused, not retrained
    assert again["arms"] == result["arms"]


@pytest.mark.parametrize(("arms", "message"), [
    (["sft", "ewc"], "needs its strength"),
    (["dropout:1"], "valid arms: sft, l2sp, ewc, kl_to_base, replay, l2sp_decoupled, ewc_decoupled"),
    (["replay:1"], "replay share below 1"), (["sft", "sft"], "must not repeat"),
])
def test_bad_arms_are_refused_before_training(lab_model_dir, tmp_path, arms, message):
    with pytest.raises(InputError, match=message):
        run(lab_model_dir, tmp_path, "--arms", *arms)
    assert not (tmp_path / "base").exists()


def test_without_seeds_a_run_trains_its_own_seed_as_llmreg_ablate_runs_it(lab_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("seeds: null\nseed: 3\narms: [sft]\n")
    args = ["--config", str(config), "--model_name_or_path", str(lab_model_dir), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "2", "--num_eval_samples", "4", "--disable_tqdm", "true"]
    result = forgetting.main(*parse_recipe_args(forgetting.make_parser(), args))
    stage = json.loads((tmp_path / "out" / "sft" / "llmreg_stage.json").read_text())  # <arm>/, no seed level
    assert stage["settings"]["training"]["seed"] == 3 and len(result["arms"]["sft"]) == 1


def test_the_held_out_facts_are_an_option_and_must_name_their_facts(lab_model_dir, tmp_path):
    # A real model knows real capitals, not the lab's facts: the old and held-out sets are world facts' halves.
    from llmreg.lab.facts import world_facts_dataset
    from llmreg.stages import dataset_digest

    world = ["--old_dataset_name", "llmreg/world-facts", "--old_dataset_split", "old",
             "--heldout_dataset_name", "llmreg/world-facts", "--heldout_dataset_split", "heldout"]
    run(lab_model_dir, tmp_path / "world", "--arms", "kl_to_base:1", "--kl_to_base_top_k", "8", "--max_steps", "2",
        *world)
    arm = tmp_path / "world" / "kl_to_base=1" / "seed0"
    settings = json.loads((arm / "llmreg_stage.json").read_text())["settings"]
    assert settings["data"]["heldout"] == dataset_digest(world_facts_dataset("heldout"))
    assert settings["data"]["old"] == dataset_digest(world_facts_dataset("old"))
    assert settings["kl_to_base"]["kl_to_base_top_k"] == 8  # the KL against the base's precomputed top 8
    assert "kl_to_base/kl" in json.loads((arm / "train" / "trainer_state.json").read_text())["log_history"][0]
    with pytest.raises(InputError, match=r"held-out data lacks \['value'\]"):
        run(lab_model_dir, tmp_path / "bad", "--arms", "sft", "--heldout_dataset_name", "llmreg/arithmetic",
            "--heldout_dataset_split", "test")
    assert not (tmp_path / "bad" / "base").exists()
