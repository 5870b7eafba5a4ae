"""Runs that cannot learn say so: RPG without reward spread warns and then stops; self-play drops tied pairs and
stops when none is left; RSPO never trains on chosen == rejected."""

import json
import logging

import pytest
import torch

from llmreg.lab import arithmetic_dataset
from llmreg.rpg import RPGConfig, RPGTrainer
from llmreg.selfplay.judges import pair_from_preferences


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def constant_reward(completions, **kwargs):
    return [0.0] * len(completions)


def text_reward(completions, **kwargs):
    """Differs between any two different texts (almost surely): every group with distinct samples has spread."""
    return [float(sum(map(ord, completion[0]["content"])) % 97) for completion in completions]


def rpg_trainer(lab_model_dir, tmp_path, reward, **overrides):
    args = RPGConfig(**{**dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none",
        save_strategy="no", max_steps=6, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        learning_rate=1e-4, logging_steps=1, seed=0, steps_per_generation=2,
    ), **overrides})
    return RPGTrainer(str(lab_model_dir), reward, args=args, train_dataset=arithmetic_dataset(64))


def test_rpg_without_reward_spread_warns_then_stops_with_the_causes(lab_model_dir, tmp_path, caplog):
    trainer = rpg_trainer(lab_model_dir, tmp_path, constant_reward, max_zero_spread_generations=2)
    with caplog.at_level(logging.WARNING, logger="llmreg.rpg.rpg_trainer"), \
            pytest.raises(RuntimeError, match="max_completion_length") as error:
        trainer.train()
    # 6 steps at 2 steps per generation would be 3 generations; it stops at the second one.
    assert trainer.state.global_step == 2
    assert "2 such batch(es) in a row" in str(error.value)
    warnings = [r.getMessage() for r in caplog.records if "No reward signal" in r.getMessage()]
    assert len(warnings) == 1 and "1 such batch(es) in a row; training stops at 2" in warnings[0]


def test_rpg_zero_spread_limit_0_warns_every_batch_and_trains_on(lab_model_dir, tmp_path, caplog):
    trainer = rpg_trainer(lab_model_dir, tmp_path, constant_reward, max_zero_spread_generations=0)
    with caplog.at_level(logging.WARNING, logger="llmreg.rpg.rpg_trainer"):
        trainer.train()
    assert trainer.state.global_step == 6
    assert sum("No reward signal" in r.getMessage() for r in caplog.records) == 3


def test_rpg_with_reward_spread_does_not_warn(lab_model_dir, tmp_path, caplog):
    trainer = rpg_trainer(lab_model_dir, tmp_path, text_reward, max_zero_spread_generations=1)
    with caplog.at_level(logging.WARNING, logger="llmreg.rpg.rpg_trainer"):
        trainer.train()
    assert trainer.state.global_step == 6
    assert not any("No reward signal" in r.getMessage() for r in caplog.records)


def test_rpg_zero_spread_limit_is_checked():
    with pytest.raises(ValueError, match="max_zero_spread_generations must be >= 0"):
        RPGConfig("out", use_cpu=True, bf16=False, max_zero_spread_generations=-1)


def test_pairs_mark_prompts_whose_responses_all_tie():
    # Prompt 0: all four responses equal (argmax = argmin = 0); prompt 1: responses 2 > 0 = 1 = 3.
    matrix = torch.full((2, 4, 4), 0.5)
    matrix[1, 2, :], matrix[1, :, 2] = 0.9, 0.1
    matrix[1, 2, 2] = 0.5
    pairs = pair_from_preferences(matrix)
    assert pairs["tied"] == [True, False]
    assert (pairs["winner"][1], pairs["loser"][1]) == (2, 0)


# --- self-play: the loop drops tied prompts and refuses an iteration without pairs --------------------------------

def selfplay(tmp_path, lab_model_dir, judge, **loop):
    from llmreg.rspo import RSPOConfig
    from llmreg.selfplay import SelfPlayArguments, run_selfplay

    loop_args = SelfPlayArguments(**{**dict(iterations=1, num_samples=4, max_new_tokens=8, temperature=1.0, top_p=1.0,
                                            generation_batch_size=16, num_eval_prompts=4, judge=judge), **loop})
    args = RSPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False,
                      report_to="none", save_strategy="no", max_steps=1, per_device_train_batch_size=4,
                      learning_rate=1e-4, regularizers="reverse_kl=0.05", seed=0)
    return run_selfplay("rspo", loop_args, args, str(lab_model_dir), arithmetic_dataset(16),
                        arithmetic_dataset(4, split="test"))


def test_selfplay_drops_tied_prompts_and_counts_them(tmp_path, lab_model_dir):
    # A 0/1 correctness judge: prompts whose 4 samples are all right or all wrong tie, the others give pairs.
    results = selfplay(tmp_path, lab_model_dir, "reward_func:llmreg.lab.arithmetic_reward")
    from datasets import load_from_disk

    dataset = load_from_disk(tmp_path / "iter_1" / "dataset")
    counts = json.loads((tmp_path / "iter_1" / "pairs.json").read_text())
    assert counts["pairs_kept"] == len(dataset) > 0 and counts["pairs_tied"] > 0
    assert counts["pairs_kept"] + counts["pairs_tied"] == 16
    assert all(c != r for c, r in zip(dataset["chosen"], dataset["rejected"]))
    assert all(w > lo for w, lo in zip(dataset["chosen_probs_win"], dataset["chosen_probs_lose"]))
    assert results[-1]["pairs_kept"] == counts["pairs_kept"]


def test_selfplay_without_any_pair_stops_with_the_causes(tmp_path, lab_model_dir):
    with pytest.raises(RuntimeError, match="nothing to train on"):
        selfplay(tmp_path, lab_model_dir, f"reward_func:{__name__}.constant_reward")
    assert not (tmp_path / "iter_1" / "model").exists()


def test_selfplay_evaluation_samples_pi_itself_whatever_the_training_top_p(tmp_path, lab_model_dir, monkeypatch):
    # The KL estimate mean(ℓ_π(y) − ℓ_μ(y)) needs y ~ π: evaluation samples take no nucleus truncation even when
    # training samples do, and run at eval_temperature with eval_max_new_tokens.
    from llmreg.selfplay import loop

    calls = []
    sample = loop.sample_completions

    def recording(*args, **kwargs):
        calls.append({key: kwargs[key] for key in ("top_p", "temperature", "max_new_tokens", "desc")})
        return sample(*args, **kwargs)

    monkeypatch.setattr(loop, "sample_completions", recording)
    selfplay(tmp_path, lab_model_dir, "reward_func:llmreg.lab.arithmetic_reward", top_p=0.5, eval_temperature=0.7,
             eval_max_new_tokens=5)
    evaluation = [c for c in calls if "evaluation" in c["desc"]]
    training = [c for c in calls if "sampling" in c["desc"]]
    assert evaluation and training
    assert all((c["top_p"], c["temperature"], c["max_new_tokens"]) == (1.0, 0.7, 5) for c in evaluation)
    assert all((c["top_p"], c["temperature"], c["max_new_tokens"]) == (0.5, 1.0, 8) for c in training)
