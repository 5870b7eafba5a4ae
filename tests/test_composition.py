"""Regularizers composed in one run: reweighted SFT + LoRA Dropout + ℓ1, RPG + LoRA Dropout, Booster + LoRA Dropout,
SAM + LoRA Dropout, EWC + the KL to the base, reweighting + the KL to the base, SAM and gradient-norm regularization
with the anchor and the ℓ1 penalty (whose gradients are of w, not of the moved weights). For each combination and each
regularizer in it: its metric is in the log history of a training step, and its term is in the step's gradient — the
gradient with it on differs from the gradient with it off, from the same weights, batch and seed (ℓ1: by exactly
λ1·sign(θ); Booster: by exactly the λ·(∇h(w) − ∇h(w̃)) it computed). The combinations that cannot work are refused
before training, with the reason and the fix."""

import pytest
import torch
from helpers import length_reward
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from llmreg.anchor import AnchorConfig, AnchorMixin, with_anchor
from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.kl_to_base import KLToBaseConfig, KLToBaseMixin, with_kl_to_base
from llmreg.l1_penalty import with_l1_penalty
from llmreg.lab import (
    arithmetic_dataset,
    corpus_dataset,
    facts_dataset,
    safety_alignment_dataset,
    safety_harmful_dataset,
)
from llmreg.lora_dropout import LoRADropoutConfig, with_lora_dropout
from llmreg.reweight import ReweightConfig, ReweightTrainer
from llmreg.rpg import RPGConfig, RPGTrainer
from llmreg.weight_perturbation import WeightPerturbationConfig, with_weight_perturbation


pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
              max_steps=1, logging_steps=1, seed=0, learning_rate=1e-2)
P, L1_LAMBDA = 0.5, 0.01


def lora() -> LoraConfig:
    # init_lora_weights=False: B is random too, as after some training, so the masks change the forward at step 0.
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)


def gradients(trainer, step, seed=0) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients after ``step()`` from zero, with torch's generator at ``seed``."""
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    step()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def largest_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def assert_logged(trainer, *keys):
    trainer._metrics["train"].clear()  # only what the training step logs
    trainer.train()
    logged = trainer.state.log_history[0]
    assert trainer.state.global_step == 1 and all(key in logged for key in keys), (keys, logged)
    assert 1 - P - 0.2 < logged["lora_dropout/kept_fraction"] < 1 - P + 0.2
    return logged


@pytest.fixture
def switch():
    """``switch(obj, name, value)`` sets an attribute for the rest of the test and restores it after."""
    saved = []

    def set_(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    yield set_
    for obj, name, value in reversed(saved):
        setattr(obj, name, value)


# --- reweighted SFT + LoRA Dropout + ℓ1 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reweighted(lab_model_dir, tmp_path_factory):
    args = ReweightConfig(str(tmp_path_factory.mktemp("reweight")), **COMMON, per_device_train_batch_size=4,
                          max_length=64, optim="sgd", max_grad_norm=0.0, reweight_strategy="linupper",
                          reweight_r=0.4)
    torch.manual_seed(0)
    return with_l1_penalty(with_lora_dropout(ReweightTrainer))(
        str(lab_model_dir), args=args, train_dataset=corpus_dataset(8), peft_config=lora(),
        lora_dropout=LoRADropoutConfig(lora_dropout_p=P), l1_lambda=L1_LAMBDA)


@pytest.mark.slow
def test_reweighting_lora_dropout_and_l1_in_one_run(reweighted, switch):
    trainer = reweighted
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()

    def step():
        trainer.training_step(trainer.model, dict(batch))

    every = gradients(trainer, step)
    switch(trainer, "l1_lambda", 0.0)
    without_l1 = gradients(trainer, step)
    for name, p in trainer.model.named_parameters():  # the same masks and weights: the difference is λ1·sign(θ)
        if p.requires_grad:
            torch.testing.assert_close(every[name] - without_l1[name], L1_LAMBDA * p.detach().sign(), rtol=1e-4,
                                       atol=1e-6)
    switch(trainer.args, "reweight_strategy", "uniform")
    uniform = gradients(trainer, step)
    assert largest_difference(uniform, without_l1) > 1e-5
    switch(trainer.args, "reweight_strategy", "linupper")
    switch(trainer.lora_dropout_config, "lora_dropout_p", 0.0)
    without_masks = gradients(trainer, step)
    assert largest_difference(without_masks, without_l1) > 1e-4
    switch(trainer.lora_dropout_config, "lora_dropout_p", P)
    switch(trainer, "l1_lambda", L1_LAMBDA)

    logged = assert_logged(trainer, "l1/penalty", "l1/norm", "lora_dropout/kept_fraction",
                           "reweight/effective_sample_size")
    assert logged["l1/penalty"] > 0 and logged["reweight/effective_sample_size"] < 4.0  # not uniform


# --- RPG + LoRA Dropout ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rpg(lab_model_dir, tmp_path_factory):
    args = RPGConfig(str(tmp_path_factory.mktemp("rpg")), **COMMON, per_device_train_batch_size=4, num_generations=4,
                     steps_per_generation=2, max_completion_length=8, rpg_beta=0.1)
    torch.manual_seed(0)
    return with_lora_dropout(RPGTrainer)(str(lab_model_dir), length_reward, args=args,
                                         train_dataset=arithmetic_dataset(16), peft_config=lora(),
                                         lora_dropout=LoRADropoutConfig(lora_dropout_p=P))


@pytest.mark.slow
def test_rpg_with_lora_dropout_samples_with_the_expected_adapter_and_trains_a_sub_network(rpg, switch):
    trainer, model = rpg, rpg.model
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # rollouts, old log-probs
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].size(1)
    with torch.no_grad():
        masked, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, width)
        model.eval()  # the expected adapter (1−p)²·BA, in one deterministic pass
        expected, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, width)
        model.train()
    # The old policy is the one that generated, the expected adapter, even in training mode; the loss's forward is a
    # sampled sub-network, so the ratio π_θ,m/π_old is not 1 from the first step.
    completion = inputs["completion_mask"].bool()
    torch.testing.assert_close(inputs["old_per_token_logps"][completion], expected[completion], rtol=1e-4, atol=1e-5)
    assert (masked - expected)[completion].abs().max() > 1e-3

    def step():
        trainer.compute_loss(model, dict(inputs)).backward()

    every = gradients(trainer, step)
    switch(trainer.args, "rpg_beta", 0.0)
    assert largest_difference(gradients(trainer, step), every) > 1e-6  # the KL term
    switch(trainer.args, "rpg_beta", 0.1)
    switch(trainer.lora_dropout_config, "lora_dropout_p", 0.0)
    assert largest_difference(gradients(trainer, step), every) > 1e-5  # the masks
    switch(trainer.lora_dropout_config, "lora_dropout_p", P)

    logged = assert_logged(trainer, "rpg/ufkl", "rpg/ratio_mean", "lora_dropout/kept_fraction")
    assert logged["rpg/ufkl"] != 0.0


# --- Booster + LoRA Dropout ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def booster(lab_model_dir, tmp_path_factory):
    args = BoosterConfig(str(tmp_path_factory.mktemp("booster")), **COMMON, per_device_train_batch_size=4,
                         max_length=64, harmful_batch_size=4, booster_lambda=5.0, booster_alpha=0.1)
    torch.manual_seed(0)
    return with_lora_dropout(BoosterTrainer)(str(lab_model_dir), args=args, train_dataset=safety_alignment_dataset(8),
                                             harmful_dataset=safety_harmful_dataset(8), peft_config=lora(),
                                             lora_dropout=LoRADropoutConfig(lora_dropout_p=P))


@pytest.mark.slow
def test_booster_with_lora_dropout_evaluates_both_harmful_passes_on_one_sub_network(booster, switch):
    trainer, model = booster, booster.model
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    # h(w) and h(w̃) with the same masks: the masks of the second pass are those of the first.
    with trainer.lora_dropout.recorded_masks() as masks:
        _, extras = trainer._booster_gradient(model)
    half = len(masks) // 2
    assert half > 0 and len(masks) == 2 * half and any((m == 0).any() for m in masks[:half])
    assert all(torch.equal(first, second) for first, second in zip(masks[:half], masks[half:]))

    def step():
        trainer.training_step(model, dict(batch))

    def alignment_only():  # the same draws as step(): Booster's passes (kept apart), then the alignment loss alone
        extras[:] = trainer._booster_gradient(model)[1]
        trainer.compute_loss(model, dict(batch)).backward()

    every = gradients(trainer, step)
    alignment = gradients(trainer, alignment_only)
    assert largest_difference(every, alignment) > 1e-5  # Booster's term is in the step's gradient ...
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(extras) == len(names) and max(extra.abs().max() for extra in extras) > 0
    for name, extra in zip(names, extras, strict=True):  # ... and it is exactly λ·(∇h_m(w) − ∇h_m(w̃))
        torch.testing.assert_close(every[name] - alignment[name], extra, rtol=1e-4, atol=1e-6)
    switch(trainer.lora_dropout_config, "lora_dropout_p", 0.0)
    assert largest_difference(gradients(trainer, step), every) > 1e-4  # the masks
    switch(trainer.lora_dropout_config, "lora_dropout_p", P)

    assert_logged(trainer, "booster/gap", "booster/harmful_loss", "lora_dropout/kept_fraction")


# --- what is refused -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lora_dropout_without_an_adapter_is_refused_before_the_model_loads_and_p_0_is_off(lab_model_dir, tmp_path):
    kwargs = dict(args=SFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none"),
                  train_dataset=arithmetic_dataset(4))
    with pytest.raises(ValueError, match="without one. Pass peft_config=LoraConfig.*--use_peft"):
        with_lora_dropout(SFTTrainer)("no-model-is-loaded", lora_dropout=LoRADropoutConfig(lora_dropout_p=0.1),
                                      **kwargs)
    # lora_dropout_p = 0 is off: nothing attached, no adapter needed (the recipes compose the mixin unconditionally).
    trainer = with_lora_dropout(SFTTrainer)(str(lab_model_dir), lora_dropout=LoRADropoutConfig(), **kwargs)
    assert trainer.lora_dropout is None


def test_several_training_samples_with_reweighting_are_refused():
    with pytest.raises(ValueError, match="normalizes each micro-batch by step-wide counts.*"
                                         "lora_dropout_train_samples=1"):
        with_l1_penalty(with_lora_dropout(ReweightTrainer))(
            "no-model-is-loaded", lora_dropout=LoRADropoutConfig(lora_dropout_p=0.1, lora_dropout_train_samples=2),
            l1_lambda=L1_LAMBDA)


@pytest.mark.slow
def test_vaccine_with_lora_dropout_is_refused_with_the_reason(lab_model_dir, tmp_path):
    args = BoosterConfig(str(tmp_path), **COMMON, harmful_batch_size=4, vaccine_rho=2.0)
    with pytest.raises(ValueError, match="Vaccine.*different masks.*vaccine_rho=0.*lora_dropout_p=0"):
        with_lora_dropout(BoosterTrainer)(str(lab_model_dir), args=args, train_dataset=safety_alignment_dataset(8),
                                          harmful_dataset=safety_harmful_dataset(8), peft_config=lora(),
                                          lora_dropout=LoRADropoutConfig(lora_dropout_p=P))


# --- weight perturbation and the anti-forgetting regularizers --------------------------------------------------------

def test_sam_with_lora_dropout_perturbs_one_sub_network(lab_model_dir, tmp_path):
    # Both passes of a micro-batch draw the same masks: at ρ = 0, SAM + LoRA Dropout is LoRA Dropout bit for bit; at
    # ρ > 0 its update differs, and both regularizers log their metrics.
    def trained(rho, perturbed=True):
        args = SFTConfig(str(tmp_path / f"{rho}-{perturbed}"), **{**COMMON, "max_steps": 2}, optim="sgd",
                         max_grad_norm=0.0, per_device_train_batch_size=4, max_length=64)
        cls = with_lora_dropout(SFTTrainer)
        kwargs = {"lora_dropout": LoRADropoutConfig(lora_dropout_p=P, lora_dropout_train_samples=2)}
        if perturbed:
            cls, kwargs = with_weight_perturbation(cls), {**kwargs, "weight_perturbation": WeightPerturbationConfig(
                "sam", perturbation_rho=rho)}
        torch.manual_seed(0)
        trainer = cls(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(8), peft_config=lora(),
                      **kwargs)
        trainer.train()
        return trainer

    plain, zero, sam = trained(0.0, perturbed=False), trained(0.0), trained(0.5)
    weights = [{n: p.detach() for n, p in t.model.named_parameters() if p.requires_grad} for t in (plain, zero, sam)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert largest_difference(weights[0], weights[2]) > 1e-4
    logged = sam.state.log_history[0]
    assert {"perturbation/loss", "perturbation/norm", "lora_dropout/kept_fraction"} <= set(logged)


def test_ewc_and_the_kl_to_base_both_reach_the_gradient(lab_model_dir, tmp_path, switch):
    cls = type("Forgetting", (AnchorMixin, KLToBaseMixin, SFTTrainer), {})
    args = SFTConfig(str(tmp_path), **COMMON, optim="sgd", max_grad_norm=0.0, per_device_train_batch_size=4,
                     max_length=64)
    trainer = cls(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(8), peft_config=lora(),
                  anchor=AnchorConfig("ewc", 1000.0, fisher_path=str(tmp_path / "fisher.safetensors")),
                  fisher_dataset=facts_dataset("retain").select_columns(["prompt", "completion"]).select(range(4)),
                  kl_to_base=KLToBaseConfig(1.0))
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    def step():
        trainer.training_step(trainer.model, dict(batch))

    both = gradients(trainer, step)
    switch(trainer.anchor_config, "anchor_lambda", 1e-12)
    without_anchor = gradients(trainer, step)
    switch(trainer.kl_to_base, "kl_to_base_beta", 0.0)
    neither = gradients(trainer, step)
    assert largest_difference(both, without_anchor) > 1e-6  # random B: ΔW ≠ 0 from the start
    assert largest_difference(without_anchor, neither) > 1e-6
    trainer.anchor_config.anchor_lambda, trainer.kl_to_base.kl_to_base_beta = 1000.0, 1.0
    trainer._metrics["train"].clear()
    trainer.train()
    assert {"anchor/distance", "anchor/penalty", "kl_to_base/kl"} <= set(trainer.state.log_history[0])


def test_the_kl_to_base_composes_with_reweighting(lab_model_dir, tmp_path, switch):
    args = ReweightConfig(str(tmp_path), **COMMON, per_device_train_batch_size=4, max_length=64, optim="sgd",
                          max_grad_norm=0.0, reweight_strategy="linupper", reweight_r=0.4)
    trainer = with_kl_to_base(ReweightTrainer)(str(lab_model_dir), args=args, train_dataset=corpus_dataset(8),
                                               peft_config=lora(), kl_to_base=KLToBaseConfig(1.0))
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    def step():
        trainer.training_step(trainer.model, dict(batch))

    with_kl = gradients(trainer, step)
    switch(trainer.kl_to_base, "kl_to_base_beta", 0.0)
    without = gradients(trainer, step)
    assert largest_difference(with_kl, without) > 1e-6
    switch(trainer.kl_to_base, "kl_to_base_beta", 1.0)
    trainer._metrics["train"].clear()
    trainer.train()
    assert {"kl_to_base/kl", "reweight/effective_sample_size"} <= set(trainer.state.log_history[0])


def adapter_weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rule", ["sam", "gradient_norm"])
@pytest.mark.parametrize("penalty", ["anchor", "l1"])
def test_the_penalties_on_the_weights_are_of_w_under_a_weight_perturbation(lab_model_dir, tmp_path, rule, penalty):
    # The perturbation moves the weights to w + δ for the step's passes; the anchor's and the ℓ1 penalty's gradients
    # are of w all the same. One SGD step over 2 micro-batches, with and without the penalty, from the same weights:
    # the difference of the updates is lr times the penalty's gradient at the starting weights, computed by hand.
    lr, lam = 0.1, 0.5
    perturbation = WeightPerturbationConfig(rule, perturbation_rho=0.5, gradient_norm_gamma=0.5)

    def trained(strength):
        args = SFTConfig(str(tmp_path / f"{penalty}-{strength}"), **{**COMMON, "learning_rate": lr}, optim="sgd",
                         max_grad_norm=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_length=64)
        if penalty == "anchor":
            cls, kwargs = with_anchor(SFTTrainer), {"anchor": AnchorConfig("l2sp", anchor_lambda=strength)}
        else:
            cls, kwargs = with_l1_penalty(SFTTrainer), {"l1_lambda": strength}
        trainer = with_weight_perturbation(cls)(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(8),
                                                peft_config=lora(), weight_perturbation=perturbation, **kwargs)
        start = adapter_weights(trainer)
        trainer.train()
        return trainer, start, adapter_weights(trainer)

    penalized, start, after = trained(lam)
    _, plain_start, plain_after = trained(0.0)
    assert all(torch.equal(start[name], plain_start[name]) for name in start)  # the same random adapter
    if penalty == "l1":
        expected = {name: lam * w.sign() for name, w in start.items()}
        distance, key = sum(float(w.abs().sum()) for w in start.values()), "l1/norm"
    else:  # (λ/2)·Σ‖s·B·A‖² at the starting adapter, differentiated by autograd
        leaves = {name: w.clone().requires_grad_(True) for name, w in start.items()}
        squares = 0.0
        for name, module in penalized.model.named_modules():
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and "default" in module.lora_A:
                a, b = leaves[f"{name}.lora_A.default.weight"], leaves[f"{name}.lora_B.default.weight"]
                squares = squares + (module.scaling["default"] * b @ a).square().sum()
        expected = dict(zip(leaves, torch.autograd.grad(lam / 2 * squares, list(leaves.values()))))
        distance, key = float(squares.detach()), "anchor/distance"
    for name in expected:
        torch.testing.assert_close((plain_after[name] - after[name]) / lr, expected[name], rtol=1e-3, atol=1e-5)
    assert max(e.abs().max() for e in expected.values()) > 1e-3
    assert penalized.state.log_history[0][key] == pytest.approx(distance, rel=1e-4)


def test_a_penalty_outside_the_weight_perturbation_is_refused_with_the_order_to_use(lab_model_dir, tmp_path):
    args = SFTConfig(str(tmp_path), **COMMON, per_device_train_batch_size=4, max_length=64)
    with pytest.raises(TypeError, match=r"AnchorMixin must come after.*with_weight_perturbation\(with_anchor"):
        with_anchor(with_weight_perturbation(SFTTrainer))(
            str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(8), peft_config=lora(),
            anchor=AnchorConfig("l2sp", anchor_lambda=1.0), weight_perturbation=WeightPerturbationConfig("sam"))
