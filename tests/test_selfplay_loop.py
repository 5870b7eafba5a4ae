"""The self-play loop (llmreg/selfplay): judges' preference matrices, and recipes/rspo.py and recipes/spin.py end to
end — artifacts, resuming after a kill with the same files, LoRA, and 2-process DDP / DeepSpeed ZeRO-3 launches."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from helpers import KILLER, REPO
from safetensors.torch import load_file

from llmreg.lab import arithmetic_dataset
from llmreg.rspo import RSPOConfig
from llmreg.selfplay import SelfPlayArguments, SelfPlayLoop
from llmreg.selfplay.judges import PairwiseJudge, RewardFunctionJudge, make_judge, pair_from_preferences
from llmreg.spin import SPINConfig
from llmreg.stages import StageSettingsError


# A few seconds per iteration on one CPU process.
TINY = ["--iterations", "2", "--prompts_per_iteration", "32", "--num_samples", "3", "--num_eval_prompts", "16",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--generation_batch_size", "16",
        "--logging_steps", "1", "--seed", "3"]


# --- judges ---------------------------------------------------------------------------------------------------------

def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_reward_function_judge_gives_bradley_terry_preferences_and_sppo_pairs():
    judge = RewardFunctionJudge(length_reward, temperature=2.0)
    groups = [["a", "abc", "ab"], ["xx", "x", "xx"]]
    matrix = judge.preferences(["p", "q"], groups, {"prompt": ["p", "q"]})
    scores = torch.tensor([[1.0, 3.0, 2.0], [2.0, 1.0, 2.0]], dtype=torch.float64)
    expected = torch.sigmoid((scores[:, :, None] - scores[:, None, :]) / 2.0)
    torch.testing.assert_close(matrix, expected)
    torch.testing.assert_close(matrix + matrix.transpose(1, 2), torch.ones_like(matrix))

    pairs = pair_from_preferences(matrix)
    p = expected.mean(-1)
    assert pairs["winner"] == [1, 0] and pairs["loser"] == [0, 1]  # ties go to the lowest index
    assert pairs["chosen_probs_win"] == pytest.approx([p[0, 1].item(), p[1, 0].item()])
    assert pairs["chosen_probs_lose"] == pytest.approx([p[0, 0].item(), p[1, 1].item()])
    assert pairs["chosen_probs"] == pytest.approx([expected[0, 1, 0].item(), expected[1, 0, 1].item()])


def test_reward_function_judge_passes_dataset_columns_and_lab_scorer_judges_answers():
    judge = make_judge("reward_func:llmreg.lab.arithmetic_reward")
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]]
    scores = judge.scores(prompts, [["2 + 3 = 5", "2 + 3 = 6"]], {"prompt": prompts, "answer": ["5"]})
    assert scores.tolist() == [[1.0, 0.0]]


def test_pairwise_judge_fills_an_antisymmetric_matrix_and_checks_probabilities():
    matrix = PairwiseJudge(lambda prompt, a, b: 0.9 if len(a) > len(b) else 0.2).preferences(
        ["p"], [["aaa", "a", "aa"]], {})
    assert matrix[0, 0, 1] == 0.9 and matrix[0, 1, 0] == pytest.approx(0.1)
    assert matrix[0, 1, 2] == 0.2 and matrix[0, 2, 1] == pytest.approx(0.8)
    torch.testing.assert_close(matrix.diagonal(dim1=1, dim2=2), torch.full((1, 3), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a probability"):
        PairwiseJudge(lambda prompt, a, b: 2.0).preferences(["p"], [["a", "b"]], {})


def test_reward_model_judge_scores_prompt_and_completion_with_the_chat_template(lab_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    config = AutoConfig.from_pretrained(lab_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge = make_judge(f"reward_model:{tmp_path / 'rm'}", temperature=0.5)

    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]]
    groups = [["2 + 3 = 5", "2 + 3 = 6", "I do not know"]]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    texts = [tokenizer.apply_chat_template(prompts[0] + [{"role": "assistant", "content": c}], tokenize=False)
             for c in groups[0]]
    with torch.no_grad():
        expected = torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0, 0] for t in texts]).double()
    scores = judge.scores(prompts, groups, {})
    torch.testing.assert_close(scores[0], expected, rtol=1e-4, atol=1e-5)  # padding in the batch changes nothing
    assert len(set(scores[0].tolist())) == 3
    torch.testing.assert_close(judge.preferences(prompts, groups, {})[0],
                               torch.sigmoid((expected[:, None] - expected[None, :]) / 0.5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["pairrm", "reward_func:", "reward_func:llmreg.lab.no_such_function"])
def test_bad_judge_specs_fail_with_the_fix(spec):
    with pytest.raises(ValueError, match="reward_func|Cannot import"):
        make_judge(spec)


def test_a_rerun_with_other_settings_is_refused_but_more_iterations_are_fine(lab_model_dir, tmp_path):
    def loop(iterations, **overrides):
        args = RSPOConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                          **{"regularizers": "reverse_kl=0.05", **overrides})
        return SelfPlayLoop("rspo", SelfPlayArguments(iterations=iterations), args, str(lab_model_dir),
                            arithmetic_dataset(4), arithmetic_dataset(4, split="test"))

    first = loop(2)
    for name in ("base", "iter_1"):  # as a run leaves them (their contents do not matter here)
        with first._stage(name).build():
            pass
    loop(3)  # extending a finished run
    with pytest.raises(StageSettingsError, match=r"training.regularizers.reverse_kl: 0.05 recorded, 0.5 now"):
        loop(2, regularizers="reverse_kl=0.5")  # refused when the loop is made, before any model loads
    with pytest.raises(StageSettingsError, match=r"loop.temperature: 0.7 recorded, 1.0 now"):
        SelfPlayLoop("rspo", SelfPlayArguments(temperature=1.0), first.training_args, str(lab_model_dir),
                     arithmetic_dataset(4), arithmetic_dataset(4, split="test"))
    overwritten = SelfPlayLoop("rspo", SelfPlayArguments(temperature=1.0, overwrite=True), first.training_args,
                               str(lab_model_dir), arithmetic_dataset(4), arithmetic_dataset(4, split="test"))
    assert not (tmp_path / "base").exists() and not (tmp_path / "iter_1").exists()  # deleted, to be recomputed
    assert overwritten.settings["loop"]["temperature"] == 1.0


# --- the loop through the recipes -----------------------------------------------------------------------------------

def recipe_command(method: str, output_dir, *extra) -> list[str]:
    return [sys.executable, str(REPO / "recipes" / f"{method}.py"), *TINY, "--output_dir", str(output_dir), *extra]


def run_recipe(method: str, output_dir, *extra) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(recipe_command(method, output_dir, *extra), cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout


def assert_iterations(output_dir, lab_model_dir, iterations=2):
    summary = json.loads((output_dir / "summary.json").read_text())
    assert [row["model"] for row in summary] == ["base"] + [f"iter_{t}" for t in range(1, iterations + 1)]
    assert summary[0]["win_rate_vs_base"] == 50.0 and summary[0]["kl_to_base"] == 0.0
    base = load_file(lab_model_dir / "model.safetensors")
    for t in range(1, iterations + 1):
        directory = output_dir / f"iter_{t}"
        assert (directory / "generations.jsonl").is_file() and (directory / "eval.json").is_file()
        trained = load_file(directory / "model" / "model.safetensors")
        assert any(not base[name].equal(trained[name]) for name in base), f"iteration {t} did not train"
        assert summary[t]["kl_to_base"] != 0.0 and summary[t]["mean_length"] > 0
    assert not list(output_dir.rglob("*.tmp"))  # every artifact was renamed into place
    return summary


@pytest.mark.slow
def test_rspo_recipe_runs_iterations_and_prints_the_table(lab_model_dir, tmp_path):
    # Launched as the README's main command is, with a shipped accelerate config: no library warning on the way.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = recipe_command("rspo", tmp_path, "--regularizers", "reverse_kl=0.05")
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(REPO / "accelerate_configs" / "single_process.yaml"), *command[1:]], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    stdout = result.stdout
    noise = [line for line in result.stderr.splitlines()
             if any(word in line for word in ("Warning", "warn(", "WARNING", "deprecated", "kernels", "defaults"))]
    assert not noise, noise
    summary = assert_iterations(tmp_path, lab_model_dir)
    assert "| iter_2 |" in stdout and "iter_1: win rate vs base" in stdout
    rows = [json.loads(line) for line in (tmp_path / "iter_1" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all(len(group) == 3 for group in rows)
    pairs = json.loads((tmp_path / "iter_1" / "dataset" / "dataset_info.json").read_text())["features"]
    assert {"prompt", "chosen", "rejected", "chosen_probs_win", "chosen_probs_lose", "chosen_probs"} <= set(pairs)
    assert all(0.0 <= row["score"] <= 1.0 for row in summary)
    # What llmreg report and llmreg ablate read: each iteration's evaluation and training curve.
    from llmreg.report import run_metrics

    metrics = run_metrics(tmp_path)
    assert metrics["iter_2/win_rate_vs_base"]["final"] == summary[-1]["win_rate_vs_base"]
    assert "iter_1/train/loss" in metrics


@pytest.mark.slow
def test_spin_recipe_with_lora_merges_each_iterate_and_plays_the_last_two(lab_model_dir, tmp_path):
    run_recipe("spin", tmp_path, "--use_peft", "--lora_r", "8", "--lora_target_modules", "all-linear",
               "--learning_rate", "1e-3", "--history", "2", "--alpha", "0.3")
    assert_iterations(tmp_path, lab_model_dir)
    # Each iterate is a whole model (the adapter merged), so the next iteration starts from it.
    assert not (tmp_path / "iter_1" / "model" / "adapter_config.json").exists()


def test_spin_history_trains_on_the_pairs_of_the_last_h_iterations(lab_model_dir, tmp_path):
    args = SPINConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    loop = SelfPlayLoop("spin", SelfPlayArguments(history=2), args, str(lab_model_dir), arithmetic_dataset(4),
                        arithmetic_dataset(4, split="test"))
    for t in (1, 2, 3):
        Dataset.from_dict({"prompt": [f"p{t}"], "chosen": ["real"], "rejected": [f"generated by iterate {t}"]}
                          ).save_to_disk(tmp_path / f"iter_{t}" / "dataset")
    rejected = loop._training_dataset(3, tmp_path / "iter_3")["rejected"]
    assert sorted(rejected) == ["generated by iterate 2", "generated by iterate 3"]
    assert loop.model_path(3) == str(tmp_path / "iter_2" / "model") and loop.model_path(1) == str(lab_model_dir)


@pytest.mark.slow
def test_killed_loop_resumes_and_writes_the_same_files(lab_model_dir, tmp_path):
    """Kill the loop in the middle of iteration 1's training (after a checkpoint), rerun the same command: it resumes
    from that checkpoint and ends with the same datasets and evaluations as a run that was never interrupted."""
    extra = ["--save_strategy", "steps", "--save_steps", "2", "--num_train_epochs", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_recipe("rspo", straight, *extra)

    # The child kills itself right after iteration 1's Trainer saved checkpoint-2 (deterministic; a polling parent
    # can miss the window on a busy machine and kill only after training ended).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = recipe_command("rspo", resumed, *extra)
    killed = subprocess.run([sys.executable, "-c", KILLER, "2", *command[1:]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    checkpoint = resumed / "iter_1.partial" / "train" / "checkpoint-2"
    assert checkpoint.exists() and not (resumed / "iter_1.partial" / "model").exists(), "not killed mid-training"

    run_recipe("rspo", resumed, *extra)
    for relative in ["iter_1/generations.jsonl", "iter_2/generations.jsonl", "iter_2/eval.json"]:
        assert (resumed / relative).read_text() == (straight / relative).read_text(), relative
    for t in (1, 2):
        arrow = sorted((straight / f"iter_{t}" / "dataset").glob("data-*.arrow"))
        assert arrow and all((resumed / f"iter_{t}" / "dataset" / a.name).read_bytes() == a.read_bytes()
                             for a in arrow)


def test_self_play_and_the_ftaas_pipeline_read_judge_specs_with_one_grammar():
    # KIND:TARGET for both; each consumer's kinds are its own, and its error lists them. The FTaaS pipeline also takes
    # a bare module.function (its default spec is one), self-play does not (it has no default kind).
    from llmreg.ftaas.judges import make_harmful_judge
    from llmreg.judging import HarmfulJudge, PreferenceJudge, parse_judge_spec

    kinds = {"reward_model": "PATH_OR_ID"}
    assert parse_judge_spec("reward_model:path/to/rm", kinds) == ("reward_model", "path/to/rm")
    assert parse_judge_spec("llmreg.lab.is_harmful", {"function": "module.function"}, "function") == (
        "function", "llmreg.lab.is_harmful")
    assert make_harmful_judge("function:llmreg.lab.is_harmful") is make_harmful_judge("llmreg.lab.is_harmful")
    assert isinstance(make_judge("reward_func:llmreg.lab.arithmetic_reward"), PreferenceJudge)
    assert isinstance(make_harmful_judge("llmreg.lab.is_harmful"), HarmfulJudge)
    with pytest.raises(ValueError, match=r"'function:module.function', 'text_classification:PATH_OR_ID'"):
        make_harmful_judge("reward_func:llmreg.lab.is_harmful")
    with pytest.raises(ValueError, match=r"'reward_func:module.function'.*'pairwise:module.function'\.$"):
        make_judge("llmreg.lab.arithmetic_reward")
