"""``llmreg ablate``: sweep files, the run grid, resuming a killed sweep, the results table and plots; and
``llmreg report`` on a run's logs."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmreg.ablate import aggregate, load_sweep, write_results
from llmreg.report import run_metrics, write_report
from llmreg.stages import RECORD


REPO = Path(__file__).parents[1]


def write_sweep(tmp_path, spec: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "sweep"), **spec}))
    return path


# --- sweep files -----------------------------------------------------------------------------------------------------

def test_a_sweep_expands_to_methods_times_grid_times_seeds(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"seeds": [0, 1, 2], "experiments": [
        {"method": "rpg", "config": str(REPO / "recipes" / "configs" / "rpg_lab.yaml"),
         "settings": {"max_steps": 5}, "grid": {"divergence": ["fkl", "rkl"], "estimator": ["full", "reinforce"]}},
        {"method": "sft", "grid": {"learning_rate": [1e-4]}},
    ]}))
    assert len(sweep.runs) == (2 * 2 + 1) * 3
    names = [run.name for run in sweep.runs]
    assert len(set(names)) == len(names) and "rpg-divergence=rkl-estimator=reinforce-seed2" in names
    run = sweep.runs[names.index("rpg-divergence=rkl-estimator=reinforce-seed2")]
    # The config file's keys, then the settings, then the grid point, the seed and the run's own directory.
    assert run.config["num_generations"] == 8 and run.config["max_steps"] == 5
    assert run.config["divergence"] == "rkl" and run.config["seed"] == 2
    assert run.config["output_dir"] == str(tmp_path / "sweep" / run.name)
    assert run.configuration == {"method": "rpg", "divergence": "rkl", "estimator": "reinforce"}


@pytest.mark.parametrize(("spec", "message"), [
    ({"experiments": [{"method": "sft"}], "seed": [0]}, r"Unknown keys.*\['seed'\].*valid keys"),
    ({"experiments": [{"method": "rgp"}]}, r"'rgp' is not a recipe; valid methods: .*rpg"),
    ({"experiments": [{"method": "sft", "grid": {"learning_rate": 1e-4}}]}, "must each be a non-empty list"),
    ({"experiments": [{"method": "sft", "settings": {"seed": 3}}]}, "sets 'seed'.*`seeds:`"),
    ({"experiments": [{"method": "sft", "settings": {"num_processes": 2}}]}, "only `launch: separate`"),
    ({"experiments": [{"method": "sft"}], "launch": "parallel"}, "valid: sequential, separate"),
    ({"experiments": [{"method": "sft"}], "metrics": {"loss": "lowest"}}, "min, max or null"),
    ({"experiments": [{"method": "sft"}, {"method": "sft"}]}, "distinct `name:`s"),
    ({"experiments": [{"method": "sft", "config": "missing.yaml"}]}, "missing.yaml.*not found"),
])
def test_a_bad_sweep_file_is_refused_before_anything_runs(tmp_path, spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_sweep(write_sweep(tmp_path, spec))
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "sweeps").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_sweep_names_only_keys_its_recipes_know(path, tmp_path):
    from llmreg.launch import parse_recipe_command_line

    sweep = load_sweep(path)
    assert sweep.runs
    for run in {run.label: run for run in sweep.runs}.values():  # one run per configuration
        config = tmp_path / f"{run.name}.yaml"
        config.write_text(yaml.safe_dump(run.config))
        parse_recipe_command_line(run.method, ["--config", str(config)])  # unknown keys, bad values: errors


def test_every_method_has_an_example_sweep():
    from llmreg.launch import recipe_names

    swept = {experiment["method"] for path in (REPO / "recipes" / "sweeps").glob("*.yaml")
             for experiment in yaml.safe_load(path.read_text())["experiments"]}
    assert swept >= set(recipe_names())


def test_the_rpg_variants_sweep_is_four_divergences_by_two_estimators_by_two_seeds():
    sweep = load_sweep(REPO / "recipes" / "sweeps" / "rpg_variants.yaml")
    configurations = {(run.config["divergence"], run.config["estimator"]) for run in sweep.runs}
    assert configurations == {(d, e) for d in ("fkl", "ufkl", "rkl", "urkl") for e in ("full", "reinforce")}
    assert sweep.seeds == [0, 1] and len(sweep.runs) == 16


# --- the table, from logs written by hand ----------------------------------------------------------------------------

def fake_run(run_dir: Path, losses: list[float], accuracy: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    history = [{"step": step, "loss": loss, "learning_rate": 0.1, "reward_std": 1.0}
               for step, loss in enumerate(losses, start=1)]
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (run_dir / "all_results.json").write_text(json.dumps({"accuracy": accuracy, "train_runtime": 3.0}))


def test_the_table_holds_final_and_best_mean_and_std_over_seeds(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"seeds": [0, 1], "experiments": [
        {"method": "sft", "grid": {"learning_rate": [0.1, 0.2]}}]}))
    # Hand-written logs: final loss 0.5 and 0.7 (best 0.4 and 0.6) at lr 0.1; 1.0 and 1.0 (best 0.9 twice) at 0.2.
    logs = {(0.1, 0): ([0.9, 0.4, 0.5], 10.0), (0.1, 1): ([0.8, 0.6, 0.7], 20.0),
            (0.2, 0): ([0.9, 1.0], 30.0), (0.2, 1): ([0.9, 1.0], 30.0)}
    for run in sweep.runs:
        with run.stage().build() as work:  # finished, as a run leaves it
            fake_run(work, *logs[(run.config["learning_rate"], run.seed)])
    _, table = aggregate(sweep)
    by_lr = {entry["learning_rate"]: entry["metrics"] for entry in table}
    assert by_lr[0.1]["loss (final)"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1414213562), "n": 2}
    assert by_lr[0.1]["loss (best)"]["mean"] == pytest.approx(0.5)
    assert by_lr[0.1]["accuracy (final)"] == {"mean": 15.0, "std": pytest.approx(7.0710678), "n": 2}
    assert by_lr[0.2]["loss (final)"] == {"mean": pytest.approx(1.0), "std": 0.0, "n": 2}
    # Bookkeeping (learning_rate, runtime) is not a result; a spread (reward_std) has no best.
    assert not any("learning_rate" in key or "runtime" in key for key in by_lr[0.1])
    assert "reward_std (best)" not in by_lr[0.1]

    files = write_results(sweep, {run.name: "finished" for run in sweep.runs})
    markdown = (tmp_path / "sweep" / "results.md").read_text()
    assert "| sft | 0.1 | 2 |" in markdown and "0.6 ± 0.1414" in markdown
    rows = list((tmp_path / "sweep" / "results.csv").read_text().splitlines())
    assert rows[0].startswith("method,learning_rate,n,") and len(rows) == 3
    assert json.loads((tmp_path / "sweep" / "results.json").read_text())["table"][0]["seeds"] == [0, 1]
    loss_plot = tmp_path / "sweep" / "plots" / "loss.png"
    assert loss_plot in files and loss_plot.read_bytes()[:4] == b"\x89PNG"


def test_the_report_reads_every_stage_and_a_killed_stages_last_checkpoint(tmp_path):
    fake_run(tmp_path / "run", [2.0, 1.0], 50.0)
    stage = tmp_path / "run" / "lora" / "checkpoint-2"
    stage.mkdir(parents=True)
    (stage / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"step": 1, "eval_loss": 3.0}, {"step": 2, "eval_loss": 2.5}]}))
    metrics = run_metrics(tmp_path / "run")
    assert metrics["loss"] == {"final": 1.0, "best": 1.0}
    assert metrics["lora/eval_loss"] == {"final": 2.5, "best": 2.5}
    assert metrics["accuracy"] == {"final": 50.0}
    page = write_report(tmp_path / "run").read_text()
    assert "| lora/eval_loss | 2.5 | 2.5 |" in page and "not recorded" in page.lower()
    assert (tmp_path / "run" / "report_plots" / "lora_eval_loss.png").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing was logged"):
        write_report(tmp_path / "empty")


# --- a real sweep: killed, rerun, resumed ----------------------------------------------------------------------------

def finished_runs(out: Path) -> list[Path]:
    """The records of the finished runs (an unfinished one is still named <run>.partial)."""
    return [record for record in out.glob(f"*/{RECORD}") if not record.parent.name.endswith(".partial")]


TINY_RPG = {"max_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 8, "num_generations": 4,
            "max_completion_length": 8, "rpg_beta": 0.05}


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_runs(lab_model_dir, tmp_path):
    path = write_sweep(tmp_path, {"seeds": [0, 1], "metrics": {"loss": "min", "arithmetic_accuracy_after": "max"},
                                  "experiments": [{"method": "rpg", "config": str(REPO / "recipes" / "configs" /
                                                                                  "rpg_lab.yaml"),
                                                   "settings": TINY_RPG, "grid": {"divergence": ["fkl", "urkl"]}}]})
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "llmreg", "ablate", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not finished_runs(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    finished = {done.parent.name: (done.stat().st_mtime_ns, (done.parent / "model.safetensors").stat().st_mtime_ns)
                for done in finished_runs(out)}
    assert 1 <= len(finished) < 4, "the kill should land after the first run and before the last"

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("finished earlier, skipped") == len(finished)
    for name, times in finished.items():  # the finished runs were not redone
        assert ((out / name / RECORD).stat().st_mtime_ns,
                (out / name / "model.safetensors").stat().st_mtime_ns) == times
    assert len(finished_runs(out)) == 4 and not list(out.glob("*.partial"))

    # A rerun with a changed setting is refused before anything runs, naming the setting; --overwrite reruns.
    changed = yaml.safe_load(path.read_text())
    changed["experiments"][0]["settings"]["rpg_beta"] = 0.5
    path.write_text(yaml.safe_dump(changed))
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert refused.returncode == 2 and "config.rpg_beta: 0.05 recorded, 0.5 now" in refused.stderr
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert len(finished_runs(out)) == 4  # nothing deleted

    table = {row["divergence"]: row for row in json.loads((out / "results.json").read_text())["table"]}
    for divergence in ("fkl", "urkl"):
        final_losses = []
        for seed in (0, 1):
            state = json.loads((out / f"rpg-divergence={divergence}-seed{seed}" / "trainer_state.json").read_text())
            final_losses.append([entry["loss"] for entry in state["log_history"] if "loss" in entry][-1])
        assert table[divergence]["seeds"] == [0, 1]
        assert table[divergence]["metrics"]["loss (final)"]["mean"] == pytest.approx(statistics.fmean(final_losses))
        assert table[divergence]["metrics"]["loss (final)"]["std"] == pytest.approx(statistics.stdev(final_losses))
        assert "arithmetic_accuracy_after (final)" in table[divergence]["metrics"]
    assert (out / "plots" / "loss.png").is_file() and "| rpg | urkl | 2 |" in (out / "results.md").read_text()


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    from llmreg.cli import main

    path = write_sweep(tmp_path, {"experiments": [{"method": "rpg", "grid": {"divergence": ["kl"]}}]})
    assert main(["ablate", str(path)]) == 1
    run = tmp_path / "sweep" / "rpg-divergence=kl-seed0.partial"  # unfinished: a rerun retries it
    assert "divergence" in (run / "error.txt").read_text() and not (tmp_path / "sweep" / run.stem).exists()
    assert "Failed: rpg-divergence=kl-seed0" in (tmp_path / "sweep" / "results.md").read_text()


@pytest.mark.slow
def test_separate_launches_run_each_recipe_through_accelerate_with_its_launch_options(lab_model_dir, tmp_path):
    # `launch: separate`: the grid may hold launch options; each run is its own `accelerate launch` (its log in
    # launch.log), and a run refused by its recipe's parser fails alone.
    path = write_sweep(tmp_path, {"launch": "separate", "experiments": [
        {"method": "sft", "settings": {"max_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4,
                                       "max_length": 64, "accelerate_config": "single_process"},
         "grid": {"lr_scheduler_type": ["constant", "no-such-schedule"]}}]})
    from llmreg.ablate import ablate

    assert ablate(path) == 1
    good, bad = tmp_path / "sweep" / "sft-lr_scheduler_type=constant-seed0", tmp_path / "sweep" / (
        "sft-lr_scheduler_type=no-such-schedule-seed0.partial")
    assert (good / RECORD).is_file() and "train_runtime" in (good / "launch.log").read_text()
    record = yaml.safe_load((good / "llmreg_run.yaml").read_text())
    assert record["launch"] == {"accelerate_config": "single_process"} and "--config_file" in record["command"]
    assert len([entry for entry in json.loads((good / "trainer_state.json").read_text())["log_history"]
                if "loss" in entry]) == 2
    assert "no-such-schedule" in (bad / "error.txt").read_text() and not bad.with_suffix("").exists()


def test_an_invalid_sweep_file_names_itself_and_the_line(tmp_path, capsys):
    from llmreg.cli import main

    path = tmp_path / "sweep.yaml"
    path.write_text("seeds: [0,\nexperiments: []\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{path}, line 3, column 1: not valid YAML" in error and "<unicode string>" not in error
