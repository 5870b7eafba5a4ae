"""llmreg report: a metric's direction from its own key (not the run directory's name), and the settings and
per-iteration / per-p summaries of multi-stage runs."""

import json

import pytest

from llmreg.report import metric_goal, run_metrics, write_report


@pytest.mark.parametrize(("key", "goal"), [
    ("reward", "max"), ("loss", "min"), ("rpg/ufkl", "min"), ("rewards/arithmetic_reward/mean", "max"),
    ("rewards/arithmetic_reward/std", None), ("win_rate_vs_base", "max"), ("harmful_score", "min"),
    ("kl_to_base", "min"), ("entropy", None), ("eval_accuracy", "max"),
])
def test_metric_goal_reads_the_key(key, goal):
    assert metric_goal(key) == goal


def test_best_follows_the_metric_not_the_directory_name(tmp_path):
    # A sweep's run directories are named after their settings: "divergence=fkl" must not make a reward a KL.
    run = tmp_path / "rpg-divergence=fkl-seed0"
    run.mkdir()
    history = [{"step": step, "reward": reward, "rpg/fkl": kl, "loss": loss}
               for step, reward, kl, loss in ((1, 0.010, 0.5, 2.0), (2, 0.078, 0.2, 1.5), (3, 0.031, 0.3, 1.7))]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    metrics = run_metrics(tmp_path)
    assert metrics["rpg-divergence=fkl-seed0/reward"] == {"final": 0.031, "best": 0.078}
    assert metrics["rpg-divergence=fkl-seed0/rpg/fkl"] == {"final": 0.3, "best": 0.2}
    assert metrics["rpg-divergence=fkl-seed0/loss"] == {"final": 1.7, "best": 1.5}


def test_a_selfplay_report_has_its_settings_and_the_iterations_plotted(tmp_path):
    rows = [{"model": name, "win_rate_vs_base": win, "kl_to_base": kl, "mean_length": length}
            for name, win, kl, length in (("base", 50.0, 0.0, 8.6), ("iter_1", 61.25, 0.36, 9.1))]
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    (tmp_path / "selfplay_settings.json").write_text(json.dumps({"method": "rspo", "loop": {"num_samples": 4}}))
    page = write_report(tmp_path).read_text()
    assert "Not recorded" not in page and "As the run recorded them (selfplay_settings.json)" in page
    assert "method: rspo" in page and "num_samples: 4" in page
    assert "| iter_1 | 61.25 | 0.36 | 9.1 |" in page
    assert (tmp_path / "report_plots" / "iterations.png").read_bytes()[:4] == b"\x89PNG"
    assert "![iterations](report_plots/iterations.png)" in page


def test_an_ftaas_report_has_its_settings_and_the_table_per_p(tmp_path):
    rows = [{"method": "booster", "harmful_ratio": None, "stage": "aligned", "harmful_score": 0.0,
             "finetune_accuracy": 50.0},
            {"method": "booster", "harmful_ratio": 0.1, "stage": "fine-tuned", "harmful_score": 12.5,
             "finetune_accuracy": 91.0}]
    (tmp_path / "results.json").write_text(json.dumps({"settings": {"booster_lambda": 5.0}, "rows": rows}))
    page = write_report(tmp_path).read_text()
    assert "As the run recorded them (results.json)" in page and "booster_lambda: 5.0" in page
    assert "| booster | fine-tuned | 0.1 | 12.5 | 91 |" in page and "| booster | aligned | — | 0 | 50 |" in page


def test_an_evaluation_stage_reports_under_its_models_name(tmp_path):
    # FTaaS and unlearning evaluate each model in <model's stage>/eval: a sweep names the model's metric.
    for stage, score in (("finetune/booster/p0.2", 12.5), ("unlearned", 0.25)):
        (tmp_path / stage / "eval").mkdir(parents=True)
        (tmp_path / stage / "eval" / "eval.json").write_text(json.dumps({"score": score, "ratios": [0.1, 0.2]}))
    metrics = run_metrics(tmp_path)
    assert metrics == {"finetune/booster/p0.2/score": {"final": 12.5}, "unlearned/score": {"final": 0.25}}
