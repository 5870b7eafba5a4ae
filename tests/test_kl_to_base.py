"""KLToBaseMixin (llmreg/kl_to_base.py) on TRL's SFTTrainer with LoRA: the added gradient is β·∇KL computed by hand
(the model with and without its adapter), both directions; β = 0 is SFT bit for bit; gradient accumulation 1×8 equals
8×1; training with it stays closer to the base than SFT does; full fine-tuning compares with a frozen copy of the
start."""

import pytest
import torch
from helpers import pairs
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from llmreg.kl_to_base import KLToBaseConfig, with_kl_to_base
from llmreg.lab import arithmetic_dataset


pytestmark = pytest.mark.usefixtures("one_torch_thread")

KLSFTTrainer = with_kl_to_base(SFTTrainer)
COMMON = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
              logging_steps=1, seed=0, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
              learning_rate=0.05, max_length=64)


def config(tmp_path, **overrides):
    return SFTConfig(**{"output_dir": str(tmp_path), "max_steps": 1, "per_device_train_batch_size": 8, **COMMON,
                        **overrides})


def lora(random_b=True):
    # A random B moves the model off the base at once, so the KL and its gradient are not 0 at the first step.
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=not random_b)


def trainer_for(lab_model_dir, args, beta, direction="forward", cls=KLSFTTrainer, rows=8, random_b=True):
    kwargs = {"kl_to_base": KLToBaseConfig(beta, direction)} if cls is KLSFTTrainer else {}
    return cls(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(rows), peft_config=lora(random_b),
               **kwargs)


def gradients(trainer, inputs):
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop
    trainer.model.zero_grad(set_to_none=True)
    trainer.training_step(trainer.model, inputs)
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def hand_kl(model, inputs, direction):
    """The token mean over the answer tokens of KL, summed over the vocabulary by hand, with gradients."""
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    policy = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double().log_softmax(-1)
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double().log_softmax(-1)
    p, q = (base, policy) if direction == "forward" else (policy, base)
    per_token = (p.exp() * (p - q)).sum(-1)
    mask = inputs["labels"][:, 1:] != -100
    return per_token[mask].sum() / mask.sum()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_the_added_gradient_is_beta_times_the_kl_gradient(lab_model_dir, tmp_path, direction):
    trainer = trainer_for(lab_model_dir, config(tmp_path), 2.0, direction)
    inputs = next(iter(trainer.get_train_dataloader()))
    with_kl = gradients(trainer, inputs)
    trainer.kl_to_base.kl_to_base_beta = 1e-12
    plain = gradients(trainer, inputs)
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    kl = hand_kl(trainer.model, inputs, direction)
    expected = dict(zip(params, torch.autograd.grad(kl, list(params.values()))))
    assert kl.item() > 1e-4  # the random B moved the model off the base
    for name, hand in expected.items():
        torch.testing.assert_close(with_kl[name] - plain[name], 2.0 * hand.float(), rtol=1e-3, atol=1e-6)
    logged = trainer._metrics["train"]["kl_to_base/kl"][0]
    assert logged == pytest.approx(kl.item(), rel=1e-4)


def test_beta_zero_is_sft_bit_for_bit(lab_model_dir, tmp_path):
    runs = [trainer_for(lab_model_dir, config(tmp_path / "k", max_steps=2), 0.0),
            trainer_for(lab_model_dir, config(tmp_path / "s", max_steps=2), 0.0, cls=SFTTrainer)]
    for trainer in runs:
        trainer.train()
    for (name, a), b in zip(runs[0].model.named_parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b), name


def test_gradient_accumulation_does_not_change_the_update(lab_model_dir, tmp_path):
    updates = []
    for batch, accumulation in ((8, 1), (1, 8)):
        args = config(tmp_path / str(batch), per_device_train_batch_size=batch,
                      gradient_accumulation_steps=accumulation)
        trainer = trainer_for(lab_model_dir, args, 5.0)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        updates.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert max(u.abs().max() for u in updates[0].values()) > 1e-4
    for name in updates[0]:
        torch.testing.assert_close(updates[1][name], updates[0][name], rtol=1e-4, atol=1e-7)


def test_training_with_it_stays_closer_to_the_base(lab_model_dir, tmp_path):
    # From the base (B = 0): SFT on arithmetic moves away from it, the KL term holds it back.
    args = dict(max_steps=20, learning_rate=0.3, per_device_train_batch_size=8)
    kls = {}
    for beta in (0.0, 1.0):  # (β = 5 with plain SGD at this rate diverges)
        trainer = trainer_for(lab_model_dir, config(tmp_path / str(beta), **args), beta, rows=64, random_b=False)
        trainer.train()
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with torch.no_grad():
            kls[beta] = hand_kl(trainer.model, inputs, "forward").item()
    assert kls[0.0] > 0.1 and kls[1.0] < 0.1 * kls[0.0], kls


def test_full_fine_tuning_takes_the_gradient_against_a_frozen_copy_of_the_start(lab_model_dir, tmp_path):
    trainer = KLSFTTrainer(str(lab_model_dir), args=config(tmp_path, max_steps=3, learning_rate=0.1),
                           train_dataset=arithmetic_dataset(24), kl_to_base=KLToBaseConfig(1.0, "reverse"))
    start = AutoModelForCausalLM.from_pretrained(lab_model_dir)
    trainer.train()  # three steps: the model moves, the copy must not
    for (name, frozen), original in zip(trainer._frozen_base.named_parameters(), start.parameters()):
        assert torch.equal(frozen, original) and not frozen.requires_grad, name
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with_kl = gradients(trainer, inputs)
    trainer.kl_to_base.kl_to_base_beta = 1e-12
    plain = gradients(trainer, inputs)
    mask = inputs["labels"][:, 1:] != -100
    policy = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        base = start(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    p, q = policy.double().log_softmax(-1), base.double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)[mask].sum() / mask.sum()
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    expected = dict(zip(params, torch.autograd.grad(kl, list(params.values()))))
    assert kl.item() > 1e-3
    for name, hand in expected.items():  # a difference of float32 gradients: exact up to their rounding
        torch.testing.assert_close(with_kl[name] - plain[name], hand.float(), rtol=1e-3,
                                   atol=1e-4 * hand.abs().max().item())


def test_unknown_directions_and_non_sft_trainers_are_refused(lab_model_dir, tmp_path):
    with pytest.raises(ValueError, match="valid: forward, reverse"):
        KLToBaseConfig(1.0, "both")
    args = DPOConfig(str(tmp_path), **{k: v for k, v in COMMON.items() if k != "max_length"})
    with pytest.raises(TypeError, match="not an SFTTrainer"):
        with_kl_to_base(DPOTrainer)(str(lab_model_dir), args=args, train_dataset=pairs(4),
                                    peft_config=lora(), kl_to_base=KLToBaseConfig(1.0))
