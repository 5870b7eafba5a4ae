"""The claims scripts' shared parts (benchmarks/claims/common.py): the standard error they report, and running arms
(skipping finished ones, stopping with the failed one's log). The scripts themselves take tens of minutes on the real
model; their tables come from ``python benchmarks/claims/<method>.py`` (docs/<method>.md says which run)."""

import math
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "claims"))
import common


def claims_script(name: str):
    """``benchmarks/claims/<name>.py`` as a module of its own name (a recipe may hold the plain name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"claims_{name}", Path(common.__file__).parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_and_standard_error_by_hand():
    from llmreg.report import mean_se

    mean, se = mean_se([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(math.sqrt(7.0) / math.sqrt(3.0))  # sample variance (4 + 1 + 9) / 2 = 7
    assert common.fmt([1.0, 2.0, 6.0], 2) == "3.00 ± 1.53"  # the claims' fmt is llmreg.report.format_mean_se
    assert math.isnan(mean_se([5.0])[1]) and common.fmt([5.0], 1) == "5.0"  # one seed: no error bar


def test_run_arms_skips_finished_runs_runs_the_rest_and_stops_on_a_failure(tmp_path):
    def arm(name, code, done):
        return {"name": name, "command": ["-c", code], "log": tmp_path / f"{name}.log", "done": tmp_path / done}

    (tmp_path / "a.done").write_text("finished before")
    write_b = f"open({str(tmp_path / 'b.done')!r}, 'w').write('ok')"
    common.run_arms([arm("a", "raise SystemExit(3)", "a.done"), arm("b", write_b, "b.done")], jobs=2)
    assert (tmp_path / "a.done").read_text() == "finished before"  # not rerun (it would have failed)
    assert (tmp_path / "b.done").read_text() == "ok"
    with pytest.raises(SystemExit, match=r"c failed \(exit 3\)[\s\S]*the reason"):
        common.run_arms([arm("c", "import sys; print('the reason'); sys.exit(3)", "c.done")], jobs=1)


def test_selfplay_claims_score_each_iterations_held_out_responses_with_the_rule_judge(tmp_path):
    import json

    selfplay = claims_script("selfplay")
    responses = {"base": ["2 + 2 = 4", "9 - 3 = 5"], "iter_1": ["2 + 2 = 4, a long answer", "9 - 3 = 6"]}
    for model, texts in responses.items():
        (tmp_path / model).mkdir()
        (tmp_path / model / "eval_samples.jsonl").write_text(
            "".join(json.dumps([{"text": text, "ids": [1, 2]}]) + "\n" for text in texts))
    rows = selfplay.with_accuracy(tmp_path, [{"model": "base"}, {"model": "iter_1"}], ["4", "6", "unused"])
    assert [row["accuracy"] for row in rows] == [50.0, 100.0]


def test_rpg_claims_kl_to_the_start_is_zero_for_the_start_and_grows_with_a_perturbation(lab_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmreg.lab import arithmetic_dataset

    rpg = claims_script("rpg")  # by path: recipes/rpg.py is importable as ``rpg`` in the same test session

    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    start = AutoModelForCausalLM.from_pretrained(lab_model_dir).eval()
    prompts = arithmetic_dataset(8, split="test")["prompt"]
    assert rpg.kl_to_start(start, start, tokenizer, prompts, 8, seed=0) == pytest.approx(0.0, abs=1e-6)
    kls = []
    for scale in (0.01, 0.05):
        moved = AutoModelForCausalLM.from_pretrained(lab_model_dir)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            moved.lm_head.weight.add_(scale * torch.randn(moved.lm_head.weight.shape, generator=generator))
        kls.append(rpg.kl_to_start(moved, start, tokenizer, prompts, 8, seed=0))
    assert 0 < kls[0] < kls[1]


def test_unlearn_claims_table_means_over_seeds_and_pairs_l1_with_its_objective_by_seed():
    unlearn = claims_script("unlearn")  # by path: recipes/unlearn.py is importable as ``unlearn`` in the same session

    def row(forget, retain, utility, quality, near_zero=None, model="arm"):
        return {"model": model, "forget_accuracy": forget, "retain_accuracy": retain, "world_accuracy": 50.0,
                "model_utility": utility, "forget_quality": quality, "b_near_zero": near_zero}

    reference = [row(100.0, 100.0, 0.6, 1e-4, model="original"), row(0.0, 100.0, 0.6, 1.0, model="gold")]
    arms = {("ga", 0.0): [row(0.0, 0.0, 0.1, 1e-2, 10.0), row(0.0, 10.0, 0.2, 1e-1, 20.0)],
            ("ga", 0.001): [row(25.0, 80.0, 0.5, 1e-3, 90.0), row(50.0, 60.0, 0.4, 1e-3, 80.0)]}
    table, summary = unlearn.tables(reference, arms)
    assert "| original | 1 | 100.0 | 100.0 | 50.0 | -4.00 | 0.600 | — |" in table
    assert "| gold | 1 | 0.0 | 100.0 | 50.0 | 0.00 | 0.600 | — |" in table
    assert "| ga | 2 | 0.0 ± 0.0 | 5.0 ± 5.0 | 50.0 ± 0.0 | -1.50 ± 0.50 | 0.150 ± 0.050 | 15.0 ± 5.0 |" in table
    effect = summary["l1_effect"]["ga + ℓ1 (λ1 = 0.001)"]  # paired: seed 0 with seed 0, seed 1 with seed 1
    assert effect["retain_accuracy"] == [80.0, 50.0] and effect["forget_accuracy"] == [25.0, 50.0]
    assert effect["model_utility"] == pytest.approx([0.4, 0.2])
    assert effect["log10_forget_quality"] == pytest.approx([-1.0, -2.0])
    assert "| ga + ℓ1 (λ1 = 0.001) | 37.5 ± 12.5 | 65.0 ± 15.0 | 0.0 ± 0.0 | 0.300 ± 0.100 | -1.50 ± 0.50 |" in table
