"""WeightPerturbationMixin (llmreg/weight_perturbation.py) on TRL's SFTTrainer: the update equals the one computed by
hand (SAM: −lr·∇L(w + ρĝ); gradient-norm regularization: −lr·((1 − c)g + c·g̃)), ρ = 0 is the base trainer bit for
bit (dropout included: both passes draw the same masks), gradient accumulation 1×8 equals 8×1, the weights come back
before the optimizer steps, and what cannot compose is refused."""

import pytest
import torch
from helpers import SGD_STEP
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.lab import arithmetic_dataset, safety_alignment_dataset, safety_harmful_dataset
from llmreg.reweight import ReweightConfig, ReweightTrainer
from llmreg.weight_perturbation import WeightPerturbationConfig, WeightPerturbationMixin, with_weight_perturbation


pytestmark = pytest.mark.usefixtures("one_torch_thread")

PerturbedSFTTrainer = with_weight_perturbation(SFTTrainer)
COMMON = {**SGD_STEP, "learning_rate": 0.5}


def data(rows=8):
    return arithmetic_dataset(rows)


def config(tmp_path, **overrides):
    return SFTConfig(**{"output_dir": str(tmp_path), "max_steps": 1, "per_device_train_batch_size": 8,
                        **COMMON, **overrides})


def trainer_for(lab_model_dir, args, perturbation=None, trainer_class=PerturbedSFTTrainer, **kwargs):
    if perturbation is not None:
        kwargs["weight_perturbation"] = perturbation
    return trainer_class(str(lab_model_dir), args=args, train_dataset=data(), **kwargs)


def trainable(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def hand_update(lab_model_dir, trainer, rule, learning_rate=0.5, **sizes):
    """−lr × the rule's gradient, on a fresh copy of the weights and the trainer's one batch, by plain autograd."""
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    twin = AutoModelForCausalLM.from_pretrained(lab_model_dir)
    params = dict(twin.named_parameters())
    names = list(params)
    g = torch.autograd.grad(twin(**inputs).loss, list(params.values()))
    norm = torch.sqrt(sum(x.double().square().sum() for x in g))
    radius = sizes["rho"] if rule == "sam" else sizes["epsilon"]
    with torch.no_grad():
        for p, x in zip(params.values(), g):
            p.add_((radius / norm).float() * x)
    g_tilde = torch.autograd.grad(twin(**inputs).loss, list(params.values()))
    if rule == "sam":
        direction = g_tilde
    else:
        c = sizes["gamma"] * norm.item() / sizes["epsilon"]
        direction = [(1 - c) * x + c * y for x, y in zip(g, g_tilde)]
    return {name: -learning_rate * d for name, d in zip(names, direction)}


@pytest.mark.parametrize(("perturbation", "rule", "sizes"), [
    (WeightPerturbationConfig("sam", perturbation_rho=0.5), "sam", {"rho": 0.5}),
    (WeightPerturbationConfig("gradient_norm", gradient_norm_gamma=0.05, gradient_norm_epsilon=0.2),
     "gradient_norm", {"gamma": 0.05, "epsilon": 0.2}),
])
def test_the_update_is_the_rule_computed_by_hand(lab_model_dir, tmp_path, perturbation, rule, sizes):
    trainer = trainer_for(lab_model_dir, config(tmp_path), perturbation)
    before = trainable(trainer)
    expected = hand_update(lab_model_dir, trainer, rule, **sizes)
    trainer.train()
    plain = trainer_for(lab_model_dir, config(tmp_path / "plain"), trainer_class=SFTTrainer)
    plain.train()
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach() - before[name], expected[name], rtol=1e-3, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # ... and it is not SFT's update
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(trainer.model.parameters(), plain.model.parameters()))
    logged = trainer.state.log_history[0]
    assert logged["perturbation/loss"] > logged["loss"]  # the ascent step raised the loss
    assert logged["perturbation/grad_norm"] > 0 and logged["perturbation/norm"] == pytest.approx(
        sizes.get("rho", sizes.get("epsilon")), rel=1e-4)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.5])
def test_a_zero_radius_is_the_base_trainer_bit_for_bit(lab_model_dir, tmp_path, lora_dropout):
    # With PEFT's lora_dropout the two passes must draw the same masks, or the update differs from SFT's.
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    args = dict(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    runs = []
    for name, cls, kwargs in (("sam", PerturbedSFTTrainer, {"weight_perturbation": WeightPerturbationConfig(
            "sam", perturbation_rho=0.0)}), ("sft", SFTTrainer, {})):
        trainer = trainer_for(lab_model_dir, config(tmp_path / name, **args), trainer_class=cls, peft_config=peft,
                              **kwargs)
        before = trainable(trainer)
        trainer.train()
        runs.append((trainer, before))
    (perturbed, before), (plain, _) = runs
    assert any(not torch.equal(p, before[n]) for n, p in trainable(perturbed).items())
    for (name, a), b in zip(trainable(perturbed).items(), trainable(plain).values()):
        assert torch.equal(a, b), name
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (perturbed, plain)]
    assert losses[0] == losses[1]  # the logged loss is L(w), as SFT's


@pytest.mark.parametrize("perturbation", [
    WeightPerturbationConfig("sam", perturbation_rho=0.5),
    WeightPerturbationConfig("asam", perturbation_rho=1.0),
    WeightPerturbationConfig("gradient_norm", gradient_norm_gamma=0.05, gradient_norm_epsilon=0.2),
    WeightPerturbationConfig("awp", awp_gamma=0.05),
], ids=lambda c: c.weight_perturbation)
def test_gradient_accumulation_does_not_change_the_update(lab_model_dir, tmp_path, perturbation):
    updates, logged = [], []
    for batch, accumulation in ((8, 1), (1, 8)):
        args = config(tmp_path / str(batch), per_device_train_batch_size=batch,
                      gradient_accumulation_steps=accumulation)
        trainer = trainer_for(lab_model_dir, args, perturbation)
        before = trainable(trainer)
        trainer.train()
        updates.append({name: p - before[name] for name, p in trainable(trainer).items()})
        logged.append(trainer.state.log_history[0])
    assert max(u.abs().max() for u in updates[0].values()) > 1e-4
    for name in updates[0]:
        torch.testing.assert_close(updates[1][name], updates[0][name], rtol=1e-4, atol=1e-6)
    for key in ("loss", "perturbation/loss", "perturbation/grad_norm", "perturbation/norm"):  # the step's, both ways
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-4), key


def test_the_perturbation_changes_the_update_and_the_weights_come_back(lab_model_dir, tmp_path):
    # SGD with lr 0: the weights after the step are w, not w + δ.
    args = config(tmp_path, learning_rate=0.0)
    trainer = trainer_for(lab_model_dir, args, WeightPerturbationConfig("awp", awp_gamma=0.05))
    before = trainable(trainer)
    trainer.train()
    for name, p in trainable(trainer).items():
        assert torch.equal(p, before[name]), name
    assert trainer.state.log_history[0]["perturbation/norm"] > 0


def test_awp_moves_each_matrix_by_gamma_times_its_norm(lab_model_dir, tmp_path):
    trainer = trainer_for(lab_model_dir, config(tmp_path, learning_rate=0.0),
                          WeightPerturbationConfig("awp", awp_gamma=0.05))
    matrices = [p for p in trainer.model.parameters() if p.requires_grad and p.dim() >= 2]
    expected = torch.sqrt(sum((0.05 * p.detach().double().norm()) ** 2 for p in matrices)).item()
    trainer.train()
    assert trainer.state.log_history[0]["perturbation/norm"] == pytest.approx(expected, rel=1e-5)


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: none, sam, asam, gradient_norm, awp"):
        WeightPerturbationConfig("sharpness")
    with pytest.raises(ValueError, match="finite-difference step"):
        WeightPerturbationConfig("gradient_norm", gradient_norm_epsilon=0.0)
    assert WeightPerturbationConfig("asam").perturbation_rho == 0.5
    assert WeightPerturbationConfig("sam").perturbation_rho == 0.05


def test_what_cannot_compose_is_refused(lab_model_dir, tmp_path):
    sam = WeightPerturbationConfig("sam")
    booster = type("PerturbedBooster", (WeightPerturbationMixin, BoosterTrainer), {})
    with pytest.raises(ValueError, match="Booster and Vaccine"):
        booster(str(lab_model_dir), args=BoosterConfig(str(tmp_path), **COMMON, booster_lambda=1.0),
                train_dataset=safety_alignment_dataset(), harmful_dataset=safety_harmful_dataset(),
                weight_perturbation=sam)
    reweight = type("PerturbedReweight", (WeightPerturbationMixin, ReweightTrainer), {})
    with pytest.raises(ValueError, match="step-wide counts"):
        reweight(str(lab_model_dir), args=ReweightConfig(str(tmp_path), **COMMON), train_dataset=data(),
                 weight_perturbation=sam)
