"""recipes/rpg.py end to end, launched as users do, through ``llmreg run`` (then ``llmreg report`` on its output).
Under DDP and DeepSpeed it runs in the launch matrix (tests/distributed)."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from helpers import REPO
from safetensors.torch import load_file


SMALL = ["--max_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
         "--rpg_beta", "0.05"]


def assert_trained(output_dir, lab_model_dir, divergence="ufkl"):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if f"rpg/{divergence}" in entry]
    assert state["global_step"] == 4 and len(steps) == 4
    assert all(math.isfinite(entry["loss"]) for entry in steps)
    before, after = load_file(lab_model_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert all(not before[name].equal(after[name].to(before[name].dtype)) for name in before)
    return json.loads((output_dir / "rpg_results.json").read_text())


@pytest.mark.slow
def test_llmreg_run_rpg_reports_accuracy_before_and_after_and_the_kl(lab_model_dir, tmp_path):
    # `llmreg run` with the YAML's accelerate_config (multi_process) overridden on the command line (one process).
    config = tmp_path / "rpg.yaml"
    lab_config = (REPO / "recipes" / "configs" / "rpg_lab.yaml").read_text()
    config.write_text(lab_config + "accelerate_config: multi_process\n")
    command = [sys.executable, "-m", "llmreg", "run", "rpg", "--config", str(config), *SMALL, "--output_dir",
               str(tmp_path), "--divergence", "urkl", "--estimator", "reinforce", "--accelerate_config",
               "single_process"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-6000:]
    summary = assert_trained(tmp_path, lab_model_dir, "urkl")
    assert summary["variant"] == "urkl/reinforce/ref=old/clip=rpg"
    baseline = json.loads((lab_model_dir / "lab_info.json").read_text())["baseline_scores"]["arithmetic_accuracy"]
    assert summary["arithmetic_accuracy_before"] == baseline
    assert 0.0 <= summary["arithmetic_accuracy_after"] <= 100.0
    assert summary["mean_kl_to_reference"] > 0  # URKL's estimate is non-negative, positive once the policy moved

    record = yaml.safe_load((tmp_path / "llmreg_run.yaml").read_text())
    assert record["method"] == "rpg" and record["launch"]["accelerate_config"] == "single_process"
    assert record["settings"]["divergence"] == "urkl" and record["settings"]["max_steps"] == 4

    # llmreg report: the settings, the final table (the recipe's summary and the logged metrics), one curve each.
    report = subprocess.run([sys.executable, "-m", "llmreg", "report", str(tmp_path)], capture_output=True,
                            text=True, check=True)
    assert "report.md" in report.stdout
    page = (tmp_path / "report.md").read_text()
    assert "divergence: urkl" in page and "max_steps: 4" in page
    rows = {line.split(" | ")[0].strip("| "): line for line in page.splitlines() if line.startswith("| ")}
    assert f"{summary['arithmetic_accuracy_after']:.4g}" in rows["arithmetic_accuracy_after"]
    losses = [entry["loss"] for entry in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert f"| {losses[-1]:.4g} |" in rows["loss"]
    for metric in ("loss", "reward", "rpg_urkl"):
        assert f"](report_plots/{metric}.png)" in page
        assert (tmp_path / "report_plots" / f"{metric}.png").read_bytes()[:4] == b"\x89PNG"
