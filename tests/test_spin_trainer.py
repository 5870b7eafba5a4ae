"""SPINTrainer on the lab model, against hand computations on the same batches.

- config checks: every refused option names the fix;
- the loss at init, where the policy is π_t: SPIN is log 2 (hinge: 1); α-SPIN against a different base model μ is
  −log σ(βα[(ℓ_t − ℓ_μ)(real) − (ℓ_t − ℓ_μ)(generated)]) from the precomputed columns, α = 0 never touches μ, and
  α = 1 is TRL's DPO loss with μ as the reference model (Alami et al.);
- fictitious play: the older iterate's log-probs become columns and the opponent is their arithmetic or geometric
  mixture with π_t;
- one training step widens the reward margin on its batch, and the SPIN metrics are logged.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from llmreg.lab import arithmetic_dataset
from llmreg.preference_utils import PrecomputedColumnsDPOTrainer
from llmreg.spin import SPINConfig, SPINTrainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(lab_model_dir, tmp_path_factory):
    """A base model μ ≠ π_t (also used as an older iterate): the lab model with small Gaussian noise on its weights."""
    path = tmp_path_factory.mktemp("perturbed-base")
    model = AutoModelForCausalLM.from_pretrained(lab_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(lab_model_dir).save_pretrained(path)
    return str(path)


def real_vs_generated(n):
    """n pairs on distinct arithmetic prompts: chosen = the real answer, rejected = a "generated" wrong one."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for row in arithmetic_dataset(4 * n):
        if len(rows["prompt"]) == n:
            break
        if row["prompt"] in rows["prompt"]:
            continue
        question = row["completion"][0]["content"].rsplit("=", 1)[0]
        rows["prompt"].append(row["prompt"])
        rows["chosen"].append(row["completion"])
        rows["rejected"].append([{"role": "assistant", "content": f"{question}= {int(row['answer']) + 1}"}])
    return Dataset.from_dict(rows)


def training_args(tmp_path, config=SPINConfig, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none",
        save_strategy="no", max_steps=1, per_device_train_batch_size=4, learning_rate=1e-4, beta=0.1,
        logging_steps=1, seed=0,
    )
    return config(**{**kwargs, **overrides})


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def train_loss(trainer, batch):
    trainer.model.train()
    return trainer.compute_loss(trainer.model, batch)


@torch.no_grad()
def eval_loss(trainer, batch):
    trainer.model.eval()
    return trainer.compute_loss(trainer.model, batch)


def sigmoid_loss(beta, real_logratio, generated_logratio):
    return -F.logsigmoid(beta * (real_logratio - generated_logratio)).mean()


# --- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"loss_type": "ipo"}, "Unknown SPIN loss_type 'ipo'; valid values: sigmoid, hinge"),
    ({"loss_type": ["sigmoid", "hinge"]}, "SPIN uses one loss"),
    ({"alpha": 1.5}, r"lies in \[0, 1\]"),
    ({"alpha": -0.1}, r"lies in \[0, 1\]"),
    ({"history_models": ["older/iterate"]}, "drop history_models or choose 'arith'/'geom'"),
    ({"opponent_mixture": "mean"}, "valid values: data, arith, geom"),
    ({"label_smoothing": 0.1}, "would do nothing: label_smoothing"),
])
def test_bad_configurations_fail_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        SPINConfig(str(tmp_path), use_cpu=True, **overrides)


# --- the loss at init -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss_type", "expected"), [("sigmoid", math.log(2)), ("hinge", 1.0)])
def test_spin_at_init_is_the_loss_of_a_zero_logit(lab_model_dir, tmp_path, loss_type, expected):
    trainer = SPINTrainer(str(lab_model_dir), args=training_args(tmp_path, loss_type=loss_type),
                          train_dataset=real_vs_generated(4))
    assert trainer.ref_model is None and trainer.base_model is None
    loss = train_loss(trainer, first_batch(trainer))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_alpha_spin_at_init_is_the_dpo_term_against_the_base(lab_model_dir, base_dir, tmp_path):
    # ℓ_θ = ℓ_t at init, so z = β[(1 − α)·0 + α·((ℓ_t − ℓ_μ)(real) − (ℓ_t − ℓ_μ)(generated))].
    alpha = 0.3
    trainer = SPINTrainer(str(lab_model_dir), args=training_args(tmp_path, alpha=alpha,
                                                                  base_model_name_or_path=base_dir),
                          train_dataset=real_vs_generated(8))
    batch = first_batch(trainer)
    expected = sigmoid_loss(trainer.args.beta * alpha, batch["ref_chosen_logps"] - batch["base_chosen_logps"],
                            batch["ref_rejected_logps"] - batch["base_rejected_logps"])
    assert abs(expected.item() - math.log(2)) > 1e-4  # μ ≠ π_t moves the loss off log 2
    torch.testing.assert_close(train_loss(trainer, batch), expected, rtol=1e-5, atol=1e-6)


def test_alpha_zero_never_touches_the_base_model(lab_model_dir, base_dir, tmp_path, monkeypatch):
    def refuse(self, path):
        raise AssertionError(f"alpha = 0 loaded the base model {path}")

    monkeypatch.setattr(PrecomputedColumnsDPOTrainer, "load_frozen_model", refuse)
    trainer = SPINTrainer(str(lab_model_dir), args=training_args(tmp_path, alpha=0.0,
                                                                  base_model_name_or_path=base_dir),
                          train_dataset=real_vs_generated(4))
    assert trainer.base_model is None
    assert not any(column.startswith("base_") for column in trainer.train_dataset.column_names)
    assert train_loss(trainer, first_batch(trainer)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_alpha_one_is_trls_dpo_with_the_base_as_reference(lab_model_dir, base_dir, tmp_path):
    dataset = real_vs_generated(8)
    spin = SPINTrainer(str(lab_model_dir), args=training_args(tmp_path / "spin", alpha=1.0,
                                                               base_model_name_or_path=base_dir),
                       train_dataset=dataset)
    dpo = DPOTrainer(str(lab_model_dir), ref_model=AutoModelForCausalLM.from_pretrained(base_dir),
                     args=training_args(tmp_path / "dpo", config=DPOConfig), train_dataset=dataset)
    batch = first_batch(spin)
    dpo_batch = {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
    dpo_loss = train_loss(dpo, dpo_batch)
    assert abs(dpo_loss.item() - math.log(2)) > 1e-4
    torch.testing.assert_close(train_loss(spin, batch), dpo_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixture", ["arith", "geom"])
def test_fictitious_play_mixes_the_older_iterate_into_the_opponent(lab_model_dir, base_dir, tmp_path, mixture):
    trainer = SPINTrainer(str(lab_model_dir), args=training_args(tmp_path, opponent_mixture=mixture,
                                                                  history_models=[base_dir]),
                          train_dataset=real_vs_generated(8))
    assert {"history1_chosen_logps", "history1_rejected_logps"} <= set(trainer.train_dataset.column_names)
    batch = first_batch(trainer)
    assert not torch.allclose(batch["history1_chosen_logps"], batch["ref_chosen_logps"], atol=1e-2)

    def opponent(side):
        current, older = batch[f"ref_{side}_logps"], batch[f"history1_{side}_logps"]
        if mixture == "arith":
            return torch.logaddexp(current, older) - math.log(2)
        return (current + older) / 2

    # ℓ_θ = ℓ_t at init.
    expected = sigmoid_loss(trainer.args.beta, batch["ref_chosen_logps"] - opponent("chosen"),
                            batch["ref_rejected_logps"] - opponent("rejected"))
    torch.testing.assert_close(train_loss(trainer, batch), expected, rtol=1e-5, atol=1e-6)


# --- training -------------------------------------------------------------------------------------------------------


def test_one_step_widens_the_margin_and_logs_the_spin_metrics(lab_model_dir, tmp_path):
    trainer = SPINTrainer(str(lab_model_dir), args=training_args(tmp_path), train_dataset=real_vs_generated(4))
    batch = first_batch(trainer)  # the whole dataset: the step is taken on exactly this batch
    metrics = trainer._metrics["eval"]
    loss_before = eval_loss(trainer, batch).item()
    margin_before, accuracy_before = metrics["rewards/margins"][-1], metrics["rewards/accuracies"][-1]
    trainer.train()
    loss_after = eval_loss(trainer, batch).item()
    margin_after, accuracy_after = metrics["rewards/margins"][-1], metrics["rewards/accuracies"][-1]
    assert margin_before == pytest.approx(0.0, abs=1e-6) and margin_after > 1e-4
    assert loss_before == pytest.approx(math.log(2), abs=1e-6) and loss_after < loss_before
    assert accuracy_after > accuracy_before

    logged = next(entry for entry in trainer.state.log_history if "spin/loss" in entry)
    assert {"rewards/margins", "rewards/accuracies", "rewards/real", "rewards/generated"} <= set(logged)
    assert logged["spin/loss"] == pytest.approx(math.log(2), abs=1e-6)  # the step's own loss, taken at init
    assert logged["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
