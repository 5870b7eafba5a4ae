"""The ℓ1 penalty (CLEAR §3): a hand value, gradient λ·sign(θ) on the trainable parameters only, λ = 0 is
the plain trainer, gradient accumulation does not change it, and full fine-tuning penalizes θ − θ₀."""

import pytest
import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from llmreg.l1_penalty import with_l1_penalty
from llmreg.lab import arithmetic_dataset
from llmreg.losses.unlearning import l1_penalty


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hand_value_and_gradient():
    a = torch.tensor([[0.5, -0.25], [0.0, 1.0]], requires_grad=True)
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    penalty = l1_penalty([a, b], 0.01)
    assert penalty.item() == pytest.approx(0.0475)
    penalty.backward()
    assert torch.equal(a.grad, 0.01 * torch.tensor([[1.0, -1.0], [0.0, 1.0]]))  # sign(0) = 0
    assert torch.equal(b.grad, 0.01 * torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


def trainer(lab_model_dir, tmp_path, l1_lambda, lora=True, **overrides):
    args = SFTConfig(**{"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "activation_checkpointing": False,
                        "report_to": "none", "save_strategy": "no", "max_steps": 1, "per_device_train_batch_size": 8,
                        "max_length": 64, "seed": 0, "logging_steps": 1, "learning_rate": 1e-2, **overrides})
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False) if lora else None
    torch.manual_seed(0)
    return with_l1_penalty(SFTTrainer)(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(16),
                                       peft_config=peft_config, l1_lambda=l1_lambda)


def test_the_gradient_is_lambda_sign_on_trainable_parameters_only(lab_model_dir, tmp_path):
    grads = {}
    for lam in (0.0, 0.5):
        t = trainer(lab_model_dir, tmp_path / str(lam), lam)
        t.current_gradient_accumulation_steps = 1
        batch = next(iter(t.get_train_dataloader()))
        t.model.train()
        t.training_step(t.model, batch)
        grads[lam] = {n: (p.grad, p.detach()) for n, p in t.model.named_parameters()}
    for name, (grad, value) in grads[0.5].items():
        if "lora_" in name:
            torch.testing.assert_close(grad - grads[0.0][name][0], 0.5 * torch.sign(value), rtol=1e-4, atol=1e-6)
        else:
            assert grad is None  # frozen base weights: nothing
    assert t.state.log_history == [] and t._metrics["train"]["l1/norm"][-1] > 0


def test_lambda_zero_is_the_plain_trainer(lab_model_dir, tmp_path):
    penalized = trainer(lab_model_dir, tmp_path / "l1", 0.0)
    penalized.train()
    args = SFTConfig(str(tmp_path / "plain"), use_cpu=True, bf16=False, activation_checkpointing=False,
                     report_to="none", save_strategy="no", max_steps=1, per_device_train_batch_size=8, max_length=64,
                     seed=0, logging_steps=1, learning_rate=1e-2)
    torch.manual_seed(0)
    plain = SFTTrainer(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(16),
                       peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False))
    plain.train()
    for (name, a), b in zip(penalized.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(a, b), name


def test_gradient_accumulation_does_not_change_the_update(lab_model_dir, tmp_path):
    updates = []
    for batch, accumulation in ((8, 1), (1, 8)):
        t = trainer(lab_model_dir, tmp_path / str(batch), 0.05, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=accumulation, optim="sgd", max_grad_norm=0.0)
        before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
        t.train()
        updates.append({n: p.detach() - before[n] for n, p in t.model.named_parameters() if p.requires_grad})
        assert "l1/penalty" in t.state.log_history[0]
    for name in updates[0]:
        torch.testing.assert_close(updates[1][name], updates[0][name], rtol=1e-4, atol=1e-7)


def test_full_fine_tuning_penalizes_the_distance_from_the_start(lab_model_dir, tmp_path):
    t = trainer(lab_model_dir, tmp_path, 0.1, lora=False, max_steps=2)
    t.train()
    norms = [entry["l1/norm"] for entry in t.state.log_history if "l1/norm" in entry]
    assert norms[0] == 0.0 and norms[1] > 0  # ‖θ − θ₀‖₁: zero at the start, then the distance travelled


SCRIPT = "lora_regularizers_step.py"
