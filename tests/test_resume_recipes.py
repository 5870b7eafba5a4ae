"""Every recipe resumes on rerun: SFT and RPG killed (SIGKILL) mid-training continue, when the same command is run
again, from the last complete checkpoint, and log the straight run's losses."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
from helpers import KILLER, REPO
from safetensors.torch import load_file


RECIPES = {
    "sft": ["--max_steps", "8", "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4",
            "--max_length", "64", "--save_total_limit", "2"],
    "rpg": ["--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size", "8",
            "--num_generations", "4", "--rpg_beta", "0.05", "--num_eval_prompts", "0", "--save_total_limit", "2"],
}


def run(command, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
                          **kwargs)


def losses(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_killed_recipe_rerun_resumes_from_its_last_checkpoint(recipe, lab_model_dir, tmp_path):
    script = f"recipes/{recipe}.py"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = run([sys.executable, script, *RECIPES[recipe], "--output_dir", str(straight)])
    assert result.returncode == 0, result.stderr[-4000:]

    kill_at = 4
    command = [script, *RECIPES[recipe], "--output_dir", str(killed)]
    first = run([sys.executable, "-c", KILLER, str(kill_at), *command])
    assert first.returncode == -signal.SIGKILL, first.stderr[-4000:]
    assert (killed / f"checkpoint-{kill_at}").is_dir() and not (killed / "model.safetensors").exists()

    rerun = run([sys.executable, *command])  # the same command again
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"Resuming from {killed / f'checkpoint-{kill_at}'}" in rerun.stderr
    state = json.loads((killed / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    expected, got = losses(straight), losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:  # the steps before the kill come from the checkpoint, the rest were trained after it
        assert math.isclose(got[step], expected[step], rel_tol=1e-4, abs_tol=1e-6), (step, got, expected)
    weights, reference = load_file(killed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(math.isclose(float((weights[k] - reference[k]).abs().max()), 0.0, abs_tol=1e-5) for k in reference)


@pytest.mark.slow
def test_resume_from_checkpoint_true_without_checkpoints_and_false_with_them(lab_model_dir, tmp_path):
    args = ["recipes/sft.py", *RECIPES["sft"], "--output_dir", str(tmp_path), "--max_steps", "2"]
    result = run([sys.executable, *args, "--resume_from_checkpoint", "true"])
    assert result.returncode != 0
    assert "holds no complete checkpoint" in result.stderr and "Traceback" not in result.stderr[-300:]
    assert run([sys.executable, *args]).returncode == 0
    fresh = run([sys.executable, *args, "--resume_from_checkpoint", "false"])  # starts over: no resume line
    assert fresh.returncode == 0 and "Resuming from" not in fresh.stderr
