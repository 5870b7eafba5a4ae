"""Booster: the regularizer's math against the closed form of a quadratic, and BoosterTrainer's wiring —
the gradient it adds equals λ(∇h(w) − ∇h(w̃)) computed by hand, the parameters come back bit for bit, λ = 0 is
SFTTrainer, and gradient accumulation does not change the update."""

import json

import pytest
import torch
from helpers import REPO, launch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.lab import safety_alignment_dataset, safety_harmful_dataset
from llmreg.losses.booster import global_norm, perturbation, regularizer_gradient


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the math --------------------------------------------------------------------------------------------------------

def test_quadratic_harmful_loss_gives_the_closed_form():
    # h(w) = ½‖w − c‖²: ∇h = w − c, and the regularizer's gradient is λα(w − c)/‖w − c‖ (the Hessian is I).
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    c = torch.tensor([3.0, -1.0], dtype=torch.float64)
    grad = w - c
    step = perturbation([grad], alpha=0.1, eps=0.0)[0]
    perturbed_grad = (w + step) - c
    reg = regularizer_gradient([grad], [perturbed_grad], lam=5.0)[0]
    torch.testing.assert_close(reg, torch.tensor([-0.27735, 0.41603], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(reg, 5.0 * 0.1 * grad / grad.norm())

    def h(v):
        return 0.5 * (v - c).square().sum()

    # The value the regularizer penalizes: h(w) − h(w̃) = α‖∇h‖ − α²/2.
    assert (h(w) - h(w + step)).item() == pytest.approx(0.1 * 3.605551 - 0.005, abs=1e-6)


def test_the_norm_is_global_over_all_parameters_and_small_alpha_vanishes():
    grads = [torch.tensor([3.0]), torch.tensor([[4.0, 0.0]])]
    assert global_norm(grads).item() == pytest.approx(5.0)
    steps = perturbation(grads, alpha=1.0, eps=0.0)
    assert steps[0].item() == pytest.approx(-0.6) and steps[1][0, 0].item() == pytest.approx(-0.8)
    assert all(s.abs().max() < 1e-8 for s in perturbation(grads, alpha=1e-8))


# --- the trainer -----------------------------------------------------------------------------------------------------

SFT_ARGS = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
                max_steps=1, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1, seed=0, max_length=64)


def booster_config(tmp_path, **overrides):
    return BoosterConfig(**{"output_dir": str(tmp_path), **SFT_ARGS, "harmful_batch_size": 4, **overrides})


def make_trainer(lab_model_dir, args):
    return BoosterTrainer(str(lab_model_dir), args=args, train_dataset=safety_alignment_dataset(),
                          harmful_dataset=safety_harmful_dataset())


def parameters(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_added_gradient_is_lambda_times_the_harmful_gradient_difference(lab_model_dir, tmp_path):
    trainer = make_trainer(lab_model_dir, booster_config(tmp_path, booster_lambda=3.0, booster_alpha=0.2))
    model = trainer.model
    before = parameters(trainer)
    batch = trainer._harmful_batch(0)  # what the trainer draws at step 0

    # By hand, on a fresh copy of the same weights: g at w, w̃ = w − α g/‖g‖, g̃ at w̃.
    twin = AutoModelForCausalLM.from_pretrained(lab_model_dir)
    params = [p for p in twin.parameters() if p.requires_grad]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
    grads = torch.autograd.grad(twin(**inputs).loss, params)
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(0.2 * g / (norm + 1e-7))
    perturbed = torch.autograd.grad(twin(**inputs).loss, params)
    expected = [3.0 * (g - gt) for g, gt in zip(grads, perturbed)]

    model.train()
    params, extras = trainer._booster_gradient(model)

    assert params == [p for p in model.parameters() if p.requires_grad]
    for (name, p), extra, hand in zip(model.named_parameters(), extras, expected):
        assert torch.equal(p.detach(), before[name]), f"{name} was not restored bit for bit"
        torch.testing.assert_close(extra, hand, rtol=1e-4, atol=1e-6)
    assert any(extra.abs().max() > 1e-4 for extra in expected)
    metrics = trainer._metrics["train"]
    assert metrics["booster/gap"][-1] == pytest.approx(
        metrics["booster/harmful_loss"][-1] - metrics["booster/harmful_loss_perturbed"][-1])
    assert metrics["booster/gap"][-1] > 0  # a step along the harmful gradient lowers the harmful loss
    assert metrics["booster/harmful_grad_norm"][-1] == pytest.approx(norm.item(), rel=1e-5)

    # training_step adds exactly that gradient to the alignment loss's, once, in the step's backward.
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop
    grads = {}
    for lam in (3.0, 0.0):
        trainer.args.booster_lambda = lam
        model.zero_grad(set_to_none=True)
        trainer.training_step(model, inputs)
        grads[lam] = [p.grad.clone() for p in params]
    for with_booster, without, extra in zip(grads[3.0], grads[0.0], extras):
        torch.testing.assert_close(with_booster - without, extra, rtol=1e-4, atol=1e-6)


def test_harmful_batches_are_a_function_of_the_step_and_cover_each_pass(lab_model_dir, tmp_path):
    trainer = make_trainer(lab_model_dir, booster_config(tmp_path, harmful_batch_size=100))
    steps = len(trainer._harmful_rows) // 100
    drawn = [trainer._harmful_indices(step) for step in range(2 * steps)]
    first = [i for batch in drawn[:steps] for i in batch]
    second = [i for batch in drawn[steps:] for i in batch]
    assert len(set(first)) == len(first) == 100 * steps and len(set(second)) == len(second)  # a pass: no repeats
    assert first != second  # reshuffled for the next pass
    again = make_trainer(lab_model_dir, booster_config(tmp_path, harmful_batch_size=100))
    assert again._harmful_indices(steps + 1) == drawn[steps + 1]  # a fresh trainer at step s draws the same rows
    batch = again._harmful_batch(3)
    expected = again.data_collator(list(again._harmful_rows.select(drawn[3])))
    assert torch.equal(batch["input_ids"], expected["input_ids"])


class StopAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_resuming_from_a_checkpoint_gives_the_straight_run(lab_model_dir, tmp_path):
    # Booster's own state is the harmful sampler's position: a function of the step, so nothing extra is saved.
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, vaccine_rho=2.0, learning_rate=1e-3)
    straight = make_trainer(lab_model_dir, booster_config(tmp_path / "straight", **common))
    straight.train()
    interrupted = make_trainer(lab_model_dir, booster_config(tmp_path / "resumed", **common))
    interrupted.add_callback(StopAfterStep(2))  # killed after the checkpoint at step 2, schedule and all unchanged
    interrupted.train()
    resumed = make_trainer(lab_model_dir, booster_config(tmp_path / "resumed", **common))
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    gaps = [[e["booster/gap"] for e in t.state.log_history if "booster/gap" in e] for t in (straight, resumed)]
    assert len(gaps[0]) == 4 and gaps[1] == pytest.approx(gaps[0], rel=1e-5)  # the checkpoint's 2, then 2 new


def test_lambda_zero_is_sft(lab_model_dir, tmp_path):
    booster = make_trainer(lab_model_dir, booster_config(tmp_path / "b", booster_lambda=0.0, max_steps=2))
    booster.train()
    sft_args = SFTConfig(**{"output_dir": str(tmp_path / "s"), **SFT_ARGS, "max_steps": 2})
    sft = SFTTrainer(str(lab_model_dir), args=sft_args, train_dataset=safety_alignment_dataset())
    sft.train()
    for (name, a), b in zip(booster.model.named_parameters(), sft.model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("vaccine_rho", [0.0, 2.0])
def test_gradient_accumulation_does_not_change_the_update(lab_model_dir, tmp_path, vaccine_rho):
    # Booster's direction is computed once per step; Vaccine's ε is normalized over the step's micro-batches.
    updates = []
    for batch, accumulation in ((8, 1), (1, 8)):
        args = booster_config(tmp_path / str(batch), per_device_train_batch_size=batch,
                              gradient_accumulation_steps=accumulation, optim="sgd", max_grad_norm=0.0,
                              vaccine_rho=vaccine_rho)
        trainer = make_trainer(lab_model_dir, args)
        before = parameters(trainer)
        trainer.train()
        updates.append({name: p.detach() - before[name] for name, p in trainer.model.named_parameters()})
    assert max(u.abs().max() for u in updates[0].values()) > 1e-4
    for name in updates[0]:
        torch.testing.assert_close(updates[1][name], updates[0][name], rtol=1e-4, atol=1e-6)


def test_the_regularizer_changes_the_update_and_is_logged(lab_model_dir, tmp_path):
    runs = {}
    for lam in (0.0, 5.0):
        trainer = make_trainer(lab_model_dir, booster_config(tmp_path / str(lam), booster_lambda=lam))
        trainer.train()
        runs[lam] = trainer
    logged = runs[5.0].state.log_history[0]
    assert {"booster/harmful_loss", "booster/harmful_loss_perturbed", "booster/gap",
            "booster/harmful_grad_norm"} <= set(logged)
    assert "booster/gap" not in runs[0.0].state.log_history[0]
    differs = [not torch.equal(a, b) for a, b in zip(runs[0.0].model.parameters(), runs[5.0].model.parameters())]
    assert any(differs)


@pytest.mark.parametrize(("accumulation", "lam", "rho", "forwards"), [
    (1, 5.0, 0.0, 3),   # Booster: h(w), h(w̃), f(w)
    (4, 5.0, 0.0, 6),   # the harmful passes once per step, f per micro-batch
    (1, 0.0, 2.0, 2),   # Vaccine: f(w) for the hidden gradient, f with perturbed hidden states
    (1, 5.0, 2.0, 4),
    (4, 5.0, 2.0, 10),
])
def test_forward_passes_per_step(lab_model_dir, tmp_path, accumulation, lam, rho, forwards):
    args = booster_config(tmp_path, per_device_train_batch_size=8 // accumulation,
                          gradient_accumulation_steps=accumulation, booster_lambda=lam, vaccine_rho=rho)
    trainer = make_trainer(lab_model_dir, args)
    count = []
    trainer.model.model.register_forward_pre_hook(lambda module, inputs: count.append(1))
    trainer.train()
    assert trainer.state.global_step == 1 and len(count) == forwards


# --- Vaccine ---------------------------------------------------------------------------------------------------------

def test_vaccine_moves_hidden_states_by_rho_along_the_normalized_hidden_gradient(lab_model_dir, tmp_path):
    trainer = make_trainer(lab_model_dir, booster_config(tmp_path, booster_lambda=0.0, vaccine_rho=2.0))
    model = trainer.model
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    trainer.training_step(model, inputs)
    got = [p.grad for p in model.parameters()]

    # By hand on a twin: ε_l = ρ·∂f/∂e_l / ‖∂f/∂e‖ (norm over all layers), then ∇f with e_l + ε_l.
    twin = AutoModelForCausalLM.from_pretrained(lab_model_dir)
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out)) for layer in twin.model.layers]
    loss = twin(**batch).loss
    for handle in handles:
        handle.remove()
    hidden_grads = torch.autograd.grad(loss, outputs)
    norm = torch.sqrt(sum(g.square().sum() for g in hidden_grads))
    for layer, g in zip(twin.model.layers, hidden_grads):
        layer.register_forward_hook(lambda m, a, out, eps=2.0 * g / norm: out + eps)
    expected = torch.autograd.grad(twin(**batch).loss, list(twin.parameters()))
    plain = AutoModelForCausalLM.from_pretrained(lab_model_dir)
    unperturbed = torch.autograd.grad(plain(**batch).loss, list(plain.parameters()))

    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert max((e - u).abs().max() for e, u in zip(expected, unperturbed)) > 1e-4
    metrics = trainer._metrics["train"]
    assert metrics["vaccine/hidden_grad_norm"][-1] == pytest.approx(norm.item(), rel=1e-5)
    assert metrics["vaccine/loss_unperturbed"][-1] == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"booster_lambda": -1.0}, "booster_lambda, booster_alpha and vaccine_rho must be >= 0"),
    ({"vaccine_rho": -2.0}, "booster_lambda, booster_alpha and vaccine_rho must be >= 0"),
    ({"harmful_batch_size": 0}, "harmful_batch_size must be >= 1"),
])
def test_bad_configurations_fail_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        booster_config(tmp_path, **overrides)


def test_fsdp_is_refused_with_the_reason_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match="does not support FSDP.*DTensors.*deepspeed_zero3.yaml"):
        booster_config(tmp_path)


def test_a_harmful_dataset_is_required_and_checked(lab_model_dir, tmp_path):
    with pytest.raises(ValueError, match="harmful_dataset is too small: .* fewer than one batch"):
        BoosterTrainer(str(lab_model_dir), args=booster_config(tmp_path), train_dataset=safety_alignment_dataset(),
                       harmful_dataset=safety_harmful_dataset(3))
    with pytest.raises(ValueError, match="harmful_dataset"):
        BoosterTrainer(str(lab_model_dir), args=booster_config(tmp_path), train_dataset=safety_alignment_dataset())
    with pytest.raises(ValueError, match="missing"):
        BoosterTrainer(str(lab_model_dir), args=booster_config(tmp_path), train_dataset=safety_alignment_dataset(),
                       harmful_dataset=safety_harmful_dataset().rename_column("completion", "answer"))


STEP_SCRIPT = REPO / "tests" / "scripts" / "booster_step.py"
LORA = ("--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--lora_target_modules", "q_proj",
        "v_proj")


@pytest.mark.slow
def test_booster_recipe_reports_safety_before_and_after(lab_model_dir, tmp_path):
    launch("single_process.yaml", REPO / "recipes" / "booster.py", "--max_steps", "4", "--logging_steps", "1",
           "--output_dir", str(tmp_path))
    summary = json.loads((tmp_path / "booster_results.json").read_text())
    baseline = json.loads((lab_model_dir / "lab_info.json").read_text())["baseline_scores"]
    assert summary["harmful_score_before"] == baseline["harmful_score"]
    assert summary["refusal_rate_before"] == baseline["refusal_rate"]
    assert 0.0 <= summary["harmful_score_after"] <= 100.0 and summary["final_harmful_gap"] is not None
    before, after = load_file(lab_model_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert any(not before[name].equal(after[name]) for name in before)
