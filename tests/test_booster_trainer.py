"""Booster: the regularizer's math against the closed form of a quadratic (spec §8), and BoosterTrainer's wiring —
the gradient it adds equals λ(∇h(w) − ∇h(w̃)) computed by hand, the parameters come back bit for bit, λ = 0 is
SFTTrainer, and gradient accumulation does not change the update."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import REPO, launch
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.lab import safety_alignment_dataset, safety_harmful_dataset
from llmreg.losses.booster import global_norm, perturbation, regularizer_gradient


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    batch = trainer._next_harmful_batch()
    trainer._harmful_batches = iter([batch])  # the trainer uses this same batch next

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

    existing = [torch.full_like(p, 0.5) for p in model.parameters()]  # gradient already accumulated this step
    for p, e in zip(model.parameters(), existing):
        p.grad = e.clone()
    model.train()
    trainer._add_booster_gradient(model)

    for (name, p), e, extra in zip(model.named_parameters(), existing, expected):
        assert torch.equal(p.detach(), before[name]), f"{name} was not restored bit for bit"
        torch.testing.assert_close(p.grad, e + extra, rtol=1e-4, atol=1e-6)
    assert any(extra.abs().max() > 1e-4 for extra in expected)
    metrics = trainer._metrics["train"]
    assert metrics["booster/gap"][-1] == pytest.approx(
        metrics["booster/harmful_loss"][-1] - metrics["booster/harmful_loss_perturbed"][-1])
    assert metrics["booster/gap"][-1] > 0  # a step along the harmful gradient lowers the harmful loss
    assert metrics["booster/harmful_grad_norm"][-1] == pytest.approx(norm.item(), rel=1e-5)


def test_lambda_zero_is_sft(lab_model_dir, tmp_path):
    booster = make_trainer(lab_model_dir, booster_config(tmp_path / "b", booster_lambda=0.0, max_steps=2))
    booster.train()
    sft_args = SFTConfig(**{"output_dir": str(tmp_path / "s"), **SFT_ARGS, "max_steps": 2})
    sft = SFTTrainer(str(lab_model_dir), args=sft_args, train_dataset=safety_alignment_dataset())
    sft.train()
    for (name, a), b in zip(booster.model.named_parameters(), sft.model.parameters()):
        assert torch.equal(a, b), name


def test_gradient_accumulation_does_not_change_the_update(lab_model_dir, tmp_path):
    updates = []
    for batch, accumulation in ((8, 1), (2, 4)):
        args = booster_config(tmp_path / str(batch), per_device_train_batch_size=batch,
                              gradient_accumulation_steps=accumulation, optim="sgd", max_grad_norm=0.0)
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


@pytest.mark.parametrize(("overrides", "message"), [
    ({"booster_lambda": -1.0}, "booster_lambda and booster_alpha must be >= 0"),
    ({"harmful_batch_size": 0}, "harmful_batch_size must be >= 1"),
])
def test_bad_configurations_fail_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        booster_config(tmp_path, **overrides)


def test_a_harmful_dataset_is_required_and_checked(lab_model_dir, tmp_path):
    with pytest.raises(ValueError, match="harmful_dataset"):
        BoosterTrainer(str(lab_model_dir), args=booster_config(tmp_path), train_dataset=safety_alignment_dataset())
    with pytest.raises(ValueError, match="missing"):
        BoosterTrainer(str(lab_model_dir), args=booster_config(tmp_path), train_dataset=safety_alignment_dataset(),
                       harmful_dataset=safety_harmful_dataset().rename_column("completion", "answer"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_same_global_batches(lab_model_dir, tmp_path):
    # 2 processes x (4 alignment, 2 harmful rows) and 1 process x (8, 4) see the same rows per step: accelerate hands
    # consecutive batches of the same sampler to the ranks. The harmful direction is normalized over both ranks'
    # harmful rows and the harmful loss is their global token mean, so the updates match.
    script = REPO / "tests" / "scripts" / "booster_step.py"
    launch("single_process.yaml", script, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8",
           "--harmful_batch_size", "4")
    launch("multi_process.yaml", script, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "4",
           "--harmful_batch_size", "2")
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    before = load_file(lab_model_dir / "model.safetensors")
    assert any(not one[name].equal(before[name]) for name in before)
    for name in before:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    gaps = [[e["booster/gap"] for e in json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
             if "booster/gap" in e] for run in ("one", "two")]
    assert len(gaps[0]) == 2 and gaps[1] == pytest.approx(gaps[0], rel=1e-4)


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
