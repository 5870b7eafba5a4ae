"""fp16's loss scaling and the gradients llmreg adds to the loss's (the anchor's, the ℓ1 penalty's, gradient-norm
regularization's (1 − c)·g, Booster's): torch's gradient scaler multiplies the loss by S before the backward, so
``.grad`` holds S·∇L until the optimizer unscales it; an added gradient must be multiplied by S too, or it arrives
divided by S. On the CPU accelerate makes no scaler, so the test gives the Accelerator one (GradScaler("cpu"), as
accelerate makes on a GPU), before training prepares the optimizer: one SGD step with S = 1024 is then the step without
a scaler. Under DeepSpeed, whose fp16 scales inside its own engine, these regularizers are refused with fp16."""

import os

import pytest
import torch
from accelerate.state import AcceleratorState
from helpers import SGD_STEP, small_lora
from transformers.integrations import deepspeed as hf_deepspeed
from trl import SFTConfig, SFTTrainer

from llmreg.anchor import AnchorConfig, with_anchor
from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.l1_penalty import with_l1_penalty
from llmreg.lab import arithmetic_dataset, safety_alignment_dataset, safety_harmful_dataset
from llmreg.weight_perturbation import WeightPerturbationConfig, with_weight_perturbation


pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARGS = {**SGD_STEP, "learning_rate": 0.1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}


def anchored(lab_model_dir, output_dir):
    args = SFTConfig(output_dir, **ARGS, max_steps=1)
    return with_anchor(SFTTrainer)(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(8),
                                   peft_config=small_lora(), anchor=AnchorConfig("l2sp", anchor_lambda=5.0))


def l1_penalized(lab_model_dir, output_dir):
    args = SFTConfig(output_dir, **ARGS, max_steps=1)
    return with_l1_penalty(SFTTrainer)(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(8),
                                       peft_config=small_lora(), l1_lambda=0.5)


def gradient_norm(lab_model_dir, output_dir):
    args = SFTConfig(output_dir, **ARGS, max_steps=1)
    perturbation = WeightPerturbationConfig("gradient_norm", gradient_norm_gamma=0.5, gradient_norm_epsilon=0.2)
    return with_weight_perturbation(SFTTrainer)(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(8),
                                                peft_config=small_lora(), weight_perturbation=perturbation)


def booster(lab_model_dir, output_dir):
    args = BoosterConfig(output_dir, **ARGS, max_steps=1, harmful_batch_size=4, booster_lambda=5.0,
                         booster_alpha=0.1)
    return BoosterTrainer(str(lab_model_dir), args=args, train_dataset=safety_alignment_dataset(),
                          harmful_dataset=safety_harmful_dataset(), peft_config=small_lora())


TRAINERS = {"anchor": anchored, "l1": l1_penalized, "gradient_norm": gradient_norm, "booster": booster}


def update(trainer) -> dict[str, torch.Tensor]:
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    return {name: p.detach() - before[name] for name, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_a_loss_scale_leaves_the_update_unchanged(lab_model_dir, tmp_path, name):
    plain = update(TRAINERS[name](lab_model_dir, str(tmp_path / "plain")))
    trainer = TRAINERS[name](lab_model_dir, str(tmp_path / "scaled"))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled = update(trainer)
    assert trainer.accelerator.scaler.get_scale() == 1024.0  # no overflow: the step was taken, at this scale
    assert max(u.abs().max() for u in plain.values()) > 1e-4
    for key in plain:
        torch.testing.assert_close(scaled[key], plain[key], rtol=1e-4, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")


DEEPSPEED_FP16 = {"zero_optimization": {"stage": 2}, "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
                  "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                  "train_batch_size": "auto"}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_fp16_under_deepspeed_is_refused_before_training(lab_model_dir, tmp_path, name, monkeypatch):
    # A DeepSpeed config in this process: the trainer is built (nothing is prepared before train()), then the state it
    # leaves (accelerate's DeepSpeed plugin, transformers' global DeepSpeed config) is cleared for the next tests.
    monkeypatch.setitem(ARGS, "fp16", True)
    monkeypatch.setitem(ARGS, "deepspeed", DEEPSPEED_FP16)
    environment = dict(os.environ)  # the DeepSpeed arguments set ACCELERATE_USE_DEEPSPEED, among others
    try:
        with pytest.raises(ValueError, match="fp16 under DeepSpeed"):
            TRAINERS[name](lab_model_dir, str(tmp_path))
    finally:
        os.environ.clear()
        os.environ.update(environment)
        hf_deepspeed.unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)  # the process's distributed type was DeepSpeed's
