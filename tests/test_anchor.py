"""AnchorMixin (llmreg/anchor.py) on TRL's SFTTrainer: the gradient it adds is λ·F·Δ computed by hand (full
fine-tuning) and the gradient of the penalty on ΔW = s·B·A (LoRA), λ = 0 is SFT bit for bit, the Fisher equals a
per-example computation by hand and is saved and reused, gradient accumulation 1×8 equals 8×1, bad input is refused."""

import json

import pytest
import torch
from helpers import SGD_STEP, sgd_config, small_lora, step_gradients
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from llmreg.anchor import AnchorConfig, with_anchor
from llmreg.lab import arithmetic_dataset, facts_dataset


pytestmark = pytest.mark.usefixtures("one_torch_thread")

AnchoredSFTTrainer = with_anchor(SFTTrainer)
def old_behaviour(rows=6):
    return facts_dataset("retain").select_columns(["prompt", "completion"]).select(range(rows))


def trainer_for(lab_model_dir, args, anchor=None, **kwargs):
    return AnchoredSFTTrainer(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(8), anchor=anchor,
                              **kwargs)


def test_full_fine_tuning_adds_lambda_times_the_distance(lab_model_dir, tmp_path):
    trainer = trainer_for(lab_model_dir, sgd_config(tmp_path), AnchorConfig("l2sp", anchor_lambda=3.0))
    without = step_gradients(trainer)  # at θ₀: Δ = 0, nothing added
    generator = torch.Generator().manual_seed(1)
    moves = {}
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            moves[name] = 0.01 * torch.randn(p.shape, generator=generator)
            p.add_(moves[name])
    moved = step_gradients(trainer)
    trainer.anchor_config.anchor_lambda = 1e-12  # the same weights, the anchor's gradient ~0
    plain = step_gradients(trainer)
    for name in moved:
        torch.testing.assert_close(moved[name] - plain[name], 3.0 * moves[name], rtol=1e-4, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(without.values(), plain.values())) > 0  # the move mattered
    logged = trainer._metrics["train"]
    assert logged["anchor/distance"][1] == pytest.approx(float(sum(m.double().square().sum() for m in moves.values())),
                                                         rel=1e-4)


def test_lora_adds_the_gradient_of_the_penalty_on_delta_w(lab_model_dir, tmp_path):
    trainer = trainer_for(lab_model_dir, sgd_config(tmp_path), AnchorConfig("l2sp", anchor_lambda=2.0),
                          peft_config=small_lora())
    # By hand: (λ/2)·Σ‖s·B·A‖² over the adapted layers, differentiated by autograd on copies of A and B.
    penalty, leaves = 0.0, {}
    for name, module in trainer.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach().clone().requires_grad_(True)
            b = module.lora_B["default"].weight.detach().clone().requires_grad_(True)
            penalty = penalty + 2.0 / 2 * (module.scaling["default"] * b @ a).square().sum()
            leaves[f"{name}.lora_A.default.weight"], leaves[f"{name}.lora_B.default.weight"] = a, b
    expected = dict(zip(leaves, torch.autograd.grad(penalty, list(leaves.values()))))
    with_anchor_grads = step_gradients(trainer)
    trainer.anchor_config.anchor_lambda = 1e-12
    plain = step_gradients(trainer)
    layers = trainer.model.config.num_hidden_layers
    assert set(expected) == set(plain) and len(expected) == 4 * layers  # q and v of every layer, A and B
    for name, hand in expected.items():
        torch.testing.assert_close(with_anchor_grads[name] - plain[name], hand, rtol=1e-4, atol=1e-7)
    assert max(hand.abs().max() for hand in expected.values()) > 1e-3


def test_lambda_zero_is_sft_bit_for_bit(lab_model_dir, tmp_path):
    anchored = trainer_for(lab_model_dir, sgd_config(tmp_path / "a", max_steps=2), AnchorConfig("l2sp", 0.0),
                           peft_config=small_lora())
    anchored.train()
    plain = SFTTrainer(str(lab_model_dir), args=sgd_config(tmp_path / "s", max_steps=2),
                       train_dataset=arithmetic_dataset(8), peft_config=small_lora())
    plain.train()
    for (name, a), b in zip(anchored.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(a, b), name


def test_the_fisher_is_the_mean_squared_log_likelihood_gradient_and_is_reused(lab_model_dir, tmp_path):
    path = tmp_path / "fisher.safetensors"
    trainer = trainer_for(lab_model_dir, sgd_config(tmp_path), AnchorConfig("ewc", 1.0, fisher_path=str(path)),
                          peft_config=small_lora(), fisher_dataset=old_behaviour(3))
    fisher = load_file(path)
    layers = trainer.model.config.num_hidden_layers
    assert set(fisher) == {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(layers) for m in "qv"}
    # By hand, apart from the trainer's tokenization and collator: each row rendered in the lab's ChatML by hand, the
    # answer being every token after the prompt (its text, <|im_end|> and the newline, as TRL's completion mask), its
    # log-likelihood from a fresh copy of the model's logits, differentiated w.r.t. the base weights; the Fisher is the
    # mean of the squares.
    twin = AutoModelForCausalLM.from_pretrained(lab_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    weights = {name: p for name, p in twin.named_parameters() if name in fisher}
    hand = {name: torch.zeros_like(p) for name, p in weights.items()}
    for row in old_behaviour(3):
        (question,), (answer,) = row["prompt"], row["completion"]
        prompt = f"<|im_start|>user\n{question['content']}<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(f"{prompt}{answer['content']}<|im_end|>\n")["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids) + 3
        logps = twin(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        log_likelihood = sum(logps[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids)))
        for name, grad in zip(weights, torch.autograd.grad(log_likelihood, list(weights.values()))):
            hand[name] += grad.square() / 3
    for name in fisher:
        torch.testing.assert_close(fisher[name], hand[name], rtol=1e-3, atol=1e-9)
    assert json.loads(path.with_suffix(".json").read_text())["num_samples"] == "3"
    # Reused: a later run loads it (no data needed); other data against the saved record is refused.
    again = trainer_for(lab_model_dir, sgd_config(tmp_path / "again"), AnchorConfig("ewc", 1.0, fisher_path=str(path)),
                        peft_config=small_lora())
    assert torch.equal(again._fisher[0].cpu(), fisher["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ValueError, match="estimated on other data"):
        trainer_for(lab_model_dir, sgd_config(tmp_path / "other"), AnchorConfig("ewc", 1.0, fisher_path=str(path)),
                    peft_config=small_lora(), fisher_dataset=old_behaviour(4))


def moved_and_trained(trainer, seed=1):
    """θ₀ + a random move, then the trainer's training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    trainer.train()


def test_decoupled_full_fine_tuning_takes_the_proximal_step_after_the_optimizer_step(lab_model_dir, tmp_path):
    # One SGD step (η = 0.05) from θ₀ + a move, then θ ← θ₀ + (θ − θ₀)/(1 + η·λ·F): the plain trainer's step from the
    # same weights, and the prox by hand with the saved Fisher.
    fisher_path, lam, lr = tmp_path / "fisher.safetensors", 300.0, SGD_STEP["learning_rate"]
    anchored = trainer_for(lab_model_dir, sgd_config(tmp_path / "a"),
                           AnchorConfig("ewc", lam, fisher_path=str(fisher_path), anchor_decoupled=True),
                           fisher_dataset=old_behaviour(3))
    origin = {n: p.detach().clone() for n, p in anchored.model.named_parameters()}
    moved_and_trained(anchored)
    plain = trainer_for(lab_model_dir, sgd_config(tmp_path / "p"))
    moved_and_trained(plain)
    fisher = load_file(fisher_path)
    shrink = {n: 1 + lr * lam * fisher[n] for n in fisher}
    assert max(s.max() for s in shrink.values()) > 2  # the plain step λ·F·Δ would overshoot θ₀ there
    for name, p in anchored.model.named_parameters():
        stepped = plain.model.get_parameter(name).detach()
        torch.testing.assert_close(p.detach(), origin[name] + (stepped - origin[name]) / shrink[name],
                                   rtol=1e-5, atol=1e-6)
    assert any((p.detach() - origin[name]).abs().max() > 1e-3 for name, p in anchored.model.named_parameters())
    # The logged distance is after the optimizer's step, before the anchor's.
    assert anchored.state.log_history[0]["anchor/distance"] == pytest.approx(float(sum(
        (fisher[n].double() * (plain.model.get_parameter(n).detach().double() - origin[n].double()).square()).sum()
        for n in fisher)), rel=1e-4)


def test_decoupled_lora_moves_b_by_the_least_squares_prox_of_delta_w(lab_model_dir, tmp_path):
    # After the optimizer's step, B ← B − δB, δB the least-squares solution of s·δB·A = η·λ·F/(1 + η·λ·F) ⊙ ΔW at the
    # plain trainer's stepped A and B (lstsq, by hand); A is the optimizer's.
    fisher_path, lam, lr = tmp_path / "fisher.safetensors", 2000.0, SGD_STEP["learning_rate"]
    anchored = trainer_for(lab_model_dir, sgd_config(tmp_path / "a"),
                           AnchorConfig("ewc", lam, fisher_path=str(fisher_path), anchor_decoupled=True),
                           peft_config=small_lora(), fisher_dataset=old_behaviour(3))
    anchored.train()
    plain = trainer_for(lab_model_dir, sgd_config(tmp_path / "p"), peft_config=small_lora())
    plain.train()
    fisher = load_file(fisher_path)
    expected, moved = {}, 0.0
    for name, module in plain.model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
            continue
        a, b = module.lora_A["default"].weight.detach().double(), module.lora_B["default"].weight.detach().double()
        f, scaling = fisher[f"{name.removeprefix('base_model.model.')}.weight"].double(), module.scaling["default"]
        change = lr * lam * f / (1 + lr * lam * f) * (scaling * b @ a)
        update = torch.linalg.lstsq(scaling * a.T, change.T).solution.T
        expected[f"{name}.lora_A.default.weight"] = a.float()
        expected[f"{name}.lora_B.default.weight"] = (b - update).float()
        moved = max(moved, update.abs().max().item())
    layers = anchored.model.config.num_hidden_layers
    assert len(expected) == 4 * layers and moved > 1e-4
    for name, hand in expected.items():
        torch.testing.assert_close(anchored.model.get_parameter(name).detach(), hand, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("anchor", ["l2sp", "ewc"])
def test_gradient_accumulation_does_not_change_the_update(lab_model_dir, tmp_path, anchor, decoupled):
    updates = []
    for batch, accumulation in ((8, 1), (1, 8)):
        args = sgd_config(tmp_path / str(batch), per_device_train_batch_size=batch,
                          gradient_accumulation_steps=accumulation, max_steps=2)
        trainer = trainer_for(lab_model_dir, args, AnchorConfig(anchor, 50.0, fisher_path=str(tmp_path / "f"),
                                                                anchor_decoupled=decoupled),
                              peft_config=small_lora(), fisher_dataset=old_behaviour(3))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        updates.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert max(u.abs().max() for u in updates[0].values()) > 1e-4
    for name in updates[0]:
        # Two steps at λ = 50: float32 sums in another order; the anchor added once per micro-batch would be 8×.
        torch.testing.assert_close(updates[1][name], updates[0][name], rtol=5e-4, atol=1e-6)


def test_bad_input_is_refused(lab_model_dir, tmp_path):
    with pytest.raises(ValueError, match="valid: none, l2sp, ewc"):
        AnchorConfig("sp")
    with pytest.raises(ValueError, match="choose l2sp or ewc"):
        AnchorConfig(anchor_decoupled=True)
    with pytest.raises(ValueError, match="pass fisher_dataset"):
        trainer_for(lab_model_dir, sgd_config(tmp_path), AnchorConfig("ewc", 1.0))
