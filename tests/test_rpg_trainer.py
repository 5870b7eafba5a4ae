"""RPGTrainer on the lab model: config checks, the old-policy and fixed references, and GRPO as a special case."""

import pytest
import torch
from helpers import length_reward
from trl import GRPOTrainer

from llmreg.lab import arithmetic_dataset, arithmetic_reward
from llmreg.rpg import RPGConfig, RPGTrainer


def rpg_config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none",
        save_strategy="no", max_steps=4, per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
        learning_rate=1e-4, logging_steps=1, rpg_beta=0.05, seed=0,
    )
    return RPGConfig(**{**kwargs, **overrides})


def make_trainer(lab_model_dir, args, reward_funcs=arithmetic_reward):
    return RPGTrainer(str(lab_model_dir), reward_funcs, args=args, train_dataset=arithmetic_dataset(256))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"divergence": "kl"}, "valid values: fkl, ufkl, rkl, urkl"),
    ({"estimator": "ppo"}, "valid values: full, reinforce"),
    ({"reference": "initial"}, "valid values: old, fixed"),
    ({"clip": "hard"}, "valid values: dual, rpg, none"),
    ({"clip": "rpg", "estimator": "full"}, "REINFORCE"),
    ({"kl_in_advantage": True, "estimator": "reinforce"}, "kl_in_advantage"),
    ({"beta": 0.04}, "rpg_beta"),
    ({"rpg_beta": -1.0}, "rpg_beta must be >= 0"),
    ({"reference": "fixed", "rpg_beta": 0.0}, "reference model for nothing"),
    ({"loss_type": "grpo"}, "loss_type='dapo'"),
    ({"entropy_coef": 0.01}, "entropy_coef"),
    # One optimizer step per generation: the old policy is the current one and the KL term would be inert.
    ({"steps_per_generation": 1}, "the KL term does nothing"),
    ({"gradient_accumulation_steps": 2, "steps_per_generation": 2}, "the KL term does nothing"),
])
def test_bad_configurations_fail_before_training_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        rpg_config(tmp_path, **overrides)


def test_defaults_follow_the_paper_and_keep_the_kl_term_alive(tmp_path):
    full = rpg_config(tmp_path)
    assert (full.divergence, full.estimator, full.reference, full.clip) == ("ufkl", "full", "old", "dual")
    assert (full.epsilon, full.epsilon_high, full.scale_rewards, full.dual_clip_c) == (0.2, 0.28, "none", 10.0)
    assert full.beta == 0.0  # no reference model for the old-policy reference
    assert full.steps_per_generation == 4 * full.gradient_accumulation_steps
    assert rpg_config(tmp_path, estimator="reinforce").clip == "rpg"
    fixed = rpg_config(tmp_path, reference="fixed")
    assert fixed.beta == fixed.rpg_beta and fixed.steps_per_generation == fixed.gradient_accumulation_steps


@pytest.mark.slow
@pytest.mark.parametrize(("divergence", "estimator"), [("ufkl", "full"), ("urkl", "reinforce")])
def test_old_policy_reference_trains_without_a_reference_model(lab_model_dir, tmp_path, divergence, estimator):
    trainer = make_trainer(lab_model_dir, rpg_config(tmp_path, divergence=divergence, estimator=estimator))
    assert trainer.ref_model is None
    before = {name: value.clone() for name, value in trainer.model.named_parameters()}
    trainer.train()
    assert all(not before[name].equal(value) for name, value in trainer.model.named_parameters())
    logs = [entry for entry in trainer.state.log_history if f"rpg/{divergence}" in entry]
    assert len(logs) == 4
    # Step 1 samples with the current policy (ratio 1, KL 0); later steps reuse the generation, so the old policy
    # lags behind and the KL term is alive.
    assert logs[0]["rpg/ratio_min"] == logs[0]["rpg/ratio_max"] == 1.0 and logs[0][f"rpg/{divergence}"] == 0.0
    assert any(entry["rpg/ratio_max"] > 1.0 + 1e-6 for entry in logs[1:])
    assert any(entry[f"rpg/{divergence}"] > 0 for entry in logs[1:])


@pytest.mark.slow
def test_fixed_reference_uses_trls_reference_model(lab_model_dir, tmp_path):
    # URKL's per-token estimate w·k3 is non-negative, and positive once the policy leaves the reference.
    trainer = make_trainer(lab_model_dir, rpg_config(tmp_path, reference="fixed", divergence="urkl"), length_reward)
    assert trainer.ref_model is not None
    trainer.train()
    kls = [entry["rpg/urkl"] for entry in trainer.state.log_history if "rpg/urkl" in entry]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert kls[-1] > 0


@pytest.mark.slow
def test_without_kl_and_dual_clip_the_loss_is_grpos(lab_model_dir, tmp_path):
    # rpg_beta = 0 and the full estimator leave -min(wA, w̄A) with a global token mean: TRL's "dapo" loss. (The dual
    # clip differs only for A < 0 and w > 10.)
    trainer = make_trainer(lab_model_dir, rpg_config(tmp_path, rpg_beta=0.0, estimator="full", clip="dual"))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train() otherwise
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)
    # Off-policy old log-probs, so the ratios and the clipping are exercised.
    old = inputs["old_per_token_logps"]
    inputs["old_per_token_logps"] = old + 0.3 * torch.randn_like(old)
    rpg_loss = trainer._compute_loss(trainer.model, inputs)
    grpo_loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    torch.testing.assert_close(rpg_loss, grpo_loss, rtol=1e-6, atol=1e-7)


def test_checkpoints_inside_a_generation_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4"):
        rpg_config(tmp_path, save_strategy="steps", save_steps=6)
    assert rpg_config(tmp_path, save_strategy="steps", save_steps=8).save_steps == 8


@pytest.mark.slow
def test_resume_from_a_checkpoint_equals_the_straight_run(lab_model_dir, tmp_path):
    def losses(trainer):
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and "step" in entry]

    straight = make_trainer(lab_model_dir, rpg_config(tmp_path / "straight", max_steps=8), length_reward)
    straight.train()
    first = make_trainer(lab_model_dir, rpg_config(tmp_path / "resumed", max_steps=8, save_strategy="steps",
                                                    save_steps=4), length_reward)
    first.train()
    resumed = make_trainer(lab_model_dir, rpg_config(tmp_path / "resumed", max_steps=8), length_reward)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    assert len(losses(straight)) == 8 and len(losses(resumed)) == 8
    assert max(abs(a - b) for a, b in zip(losses(straight)[4:], losses(resumed)[4:])) < 1e-5
    for name, value in straight.model.named_parameters():
        torch.testing.assert_close(resumed.model.get_parameter(name), value, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fixed_reference_under_peft_is_the_base_model_with_the_adapter_disabled(lab_model_dir, tmp_path):
    from peft import LoraConfig

    args = rpg_config(tmp_path, reference="fixed", divergence="urkl", learning_rate=1e-3)
    trainer = RPGTrainer(str(lab_model_dir), length_reward, args=args, train_dataset=arithmetic_dataset(256),
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert trainer.ref_model is None  # TRL disables the adapter instead of keeping a copy
    base = {name: value.clone() for name, value in trainer.model.named_parameters() if "lora" not in name}
    trainer.train()
    assert all(value.equal(base[name]) for name, value in trainer.model.named_parameters() if "lora" not in name)
    kls = [entry["rpg/urkl"] for entry in trainer.state.log_history if "rpg/urkl" in entry]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0  # the adapter moves the policy off the base model
