"""LoRA Dropout inside Trainers (``with_lora_dropout``): SFTTrainer and an llmreg trainer (RSPO) train with the masks,
N = 2 averages the losses of two mask draws, and evaluation can use the test-time ensemble."""

import pytest
import torch
from helpers import pairs, rspo_config
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from llmreg.lab import arithmetic_dataset
from llmreg.lora_dropout import LoRADropoutConfig, ensemble_forward, with_lora_dropout
from llmreg.rspo import RSPOTrainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora() -> LoraConfig:
    # init_lora_weights=False: B is random too, as after some training, so every mask shows in the gradients.
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)


def sft_trainer(lab_model_dir, tmp_path, **dropout):
    args = SFTConfig(str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none",
                     save_strategy="no", max_steps=1, per_device_train_batch_size=4, max_length=64, seed=0)
    torch.manual_seed(0)  # the same adapter initialization for every trainer of a test
    return with_lora_dropout(SFTTrainer)(str(lab_model_dir), args=args, train_dataset=arithmetic_dataset(16),
                                         eval_dataset=arithmetic_dataset(8, split="test"), peft_config=lora(),
                                         lora_dropout=LoRADropoutConfig(**dropout))


def lora_grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if "lora_" in n and p.grad is not None}


def test_n_samples_average_the_losses_of_n_mask_draws(lab_model_dir, tmp_path):
    batch = next(iter(sft_trainer(lab_model_dir, tmp_path / "data").get_train_dataloader()))
    two = sft_trainer(lab_model_dir, tmp_path / "two", lora_dropout_p=0.3, lora_dropout_train_samples=2)
    two.current_gradient_accumulation_steps = 1
    two.model.train()
    torch.manual_seed(1)
    two.training_step(two.model, dict(batch))

    one = sft_trainer(lab_model_dir, tmp_path / "one", lora_dropout_p=0.3)
    one.model.train()
    torch.manual_seed(1)  # the same two mask draws, by hand: (ℓ(m_1) + ℓ(m_2)) / 2
    losses = [one.compute_loss(one.model, dict(batch)) for _ in range(2)]
    (sum(losses) / 2).backward()
    by_hand = lora_grads(one)
    assert by_hand
    for name, grad in lora_grads(two).items():
        torch.testing.assert_close(grad, by_hand[name], rtol=1e-5, atol=1e-7)
    one.model.zero_grad()
    torch.manual_seed(1)
    losses[0] = one.compute_loss(one.model, dict(batch))
    losses[0].backward()  # a single draw is another gradient
    assert any(not torch.allclose(g, by_hand[n]) for n, g in lora_grads(one).items())


@pytest.mark.parametrize("trainer_name", ["sft", "rspo"])
def test_masks_drop_whole_output_rows_in_a_training_step(lab_model_dir, tmp_path, trainer_name):
    dropout = LoRADropoutConfig(lora_dropout_p=0.5)
    if trainer_name == "sft":
        trainer = sft_trainer(lab_model_dir, tmp_path, lora_dropout_p=0.5)
    else:
        torch.manual_seed(0)
        trainer = with_lora_dropout(RSPOTrainer)(str(lab_model_dir), args=rspo_config(tmp_path),
                                                 train_dataset=pairs(8), peft_config=lora(), lora_dropout=dropout)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    changed = {n: (p.detach() - before[n]) for n, p in trainer.model.named_parameters() if "lora_" in n}
    b_updates = [update for name, update in changed.items() if "lora_B" in name]
    # one step of AdamW: a dropped output row of B got a zero gradient, so only weight decay moved it (by ~lr·wd·B)
    moved = torch.cat([update.abs().amax(dim=1) for update in b_updates])
    frozen = moved < 1e-6
    assert 0.3 < frozen.float().mean() < 0.7  # about p of the rows
    assert trainer.state.global_step == 1 and any(update.abs().max() > 1e-5 for update in b_updates)


def test_evaluation_can_use_the_test_time_ensemble(lab_model_dir, tmp_path):
    ensemble = sft_trainer(lab_model_dir, tmp_path, lora_dropout_p=0.3, lora_dropout_eval_samples=4)
    batch = next(iter(ensemble.get_eval_dataloader()))
    ensemble.model.eval()
    torch.manual_seed(2)
    with torch.no_grad():
        loss = ensemble.compute_loss(ensemble.model, dict(batch))
    torch.manual_seed(2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad(), ensemble.lora_dropout.ensemble():  # by hand: −log of the mean of 4 masked softmaxes
        probs = torch.stack([ensemble.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.softmax(-1)
                             for _ in range(4)]).mean(0)
    labels = inputs["labels"][:, 1:]
    picked = probs[:, :-1].gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = -(picked.log() * (labels != -100)).sum() / (labels != -100).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    torch.manual_seed(2)
    _, direct = ensemble_forward(ensemble.model, ensemble.lora_dropout, 4, **inputs)
    torch.testing.assert_close(direct, loss)

    expected_model = sft_trainer(lab_model_dir, tmp_path / "plain", lora_dropout_p=0.3)  # one pass, (1−p)²·BA
    assert abs(expected_model.evaluate()["eval_loss"] - ensemble.evaluate()["eval_loss"]) > 1e-4


def test_ensemble_generation_averages_next_token_probabilities(lab_model_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmreg.lora_dropout import attach_lora_dropout, ensemble_generate

    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir, padding_side="left")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(lab_model_dir), lora()).eval()
    texts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
             for row in arithmetic_dataset(3, split="test")]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    # p = 0: every mask keeps everything, the ensemble is the model itself, and greedy decoding matches generate().
    identity = attach_lora_dropout(model, LoRADropoutConfig(lora_dropout_p=0.0))
    ours = ensemble_generate(model, identity, 3, ids, mask, max_new_tokens=6, **special)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **special)
    assert ours.shape[1] > ids.shape[1]
    assert torch.equal(ours, reference[:, :ours.shape[1]])
    identity.remove()

    # p > 0: the next token is the argmax of the mean of N masked softmaxes.
    dropout = attach_lora_dropout(model, LoRADropoutConfig(lora_dropout_p=0.5))
    torch.manual_seed(3)
    first = ensemble_generate(model, dropout, 8, ids, mask, max_new_tokens=1, **special)[:, -1]
    torch.manual_seed(3)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), dropout.ensemble():
        probs = torch.stack([model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                   use_cache=False).logits[:, -1].softmax(-1) for _ in range(8)])
    assert torch.equal(first, probs.mean(0).argmax(-1))
    assert probs.std(0).max() > 0  # the masks differed between the 8 passes


def test_activation_checkpointing_recomputes_the_same_masks(lab_model_dir, tmp_path):
    # Checkpointing reruns each layer's forward in the backward, replaying torch's generator: each mask is drawn
    # from it when its module runs, so the rerun draws the same masks and the gradients are those of the real step.
    grads = []
    for checkpointing in (False, True):
        trainer = sft_trainer(lab_model_dir, tmp_path / str(checkpointing), lora_dropout_p=0.5,
                              lora_dropout_train_samples=2)
        if checkpointing:
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            trainer.model.enable_input_require_grads()
        trainer.current_gradient_accumulation_steps = 1
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        torch.manual_seed(4)
        trainer.training_step(trainer.model, batch)
        grads.append(lora_grads(trainer))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_choice_probabilities_normalize_answer_likelihoods_and_the_ensemble_averages_them(lab_model_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmreg.lab import sentiment_dataset
    from llmreg.lora_dropout import attach_lora_dropout, choice_probabilities

    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(lab_model_dir), lora()).eval()
    prompts = list(sentiment_dataset(3, split="test")["prompt"])
    choices = ["positive", "negative"]
    dropout = attach_lora_dropout(model, LoRADropoutConfig(lora_dropout_p=0.3))
    single = choice_probabilities(model, tokenizer, prompts, choices)

    def answer_logp(prompt, choice):  # one unpadded sequence, by hand
        prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": choice}], tokenize=False)
        start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return logps[start - 1:].sum()

    for i, prompt in enumerate(prompts):
        expected = torch.stack([answer_logp(prompt, c) for c in choices]).softmax(-1)
        torch.testing.assert_close(single[i], expected, rtol=1e-4, atol=1e-5)
    ensemble = choice_probabilities(model, tokenizer, prompts, choices, dropout, num_samples=8)
    torch.testing.assert_close(ensemble.sum(-1), torch.ones(3))
    assert (ensemble - single).abs().max() > 1e-4


def test_expected_calibration_error_by_hand():
    from llmreg.lab import expected_calibration_error

    # one prediction per bin: the mean of |correct − confidence| = (0.1 + 0.8 + 0.3 + 0.4) / 4
    assert expected_calibration_error([0.9, 0.8, 0.3, 0.6], [1, 0, 0, 1]) == pytest.approx(40.0)
    # two in the top bin: |0.5 − 0.93|
    assert expected_calibration_error([0.91, 0.95], [True, False]) == pytest.approx(43.0)
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == pytest.approx(0.0)


@pytest.mark.slow
def test_the_recipe_compares_lora_with_lora_dropout_with_and_without_the_ensemble(lab_model_dir, tmp_path):
    import json

    from helpers import REPO, launch

    launch("single_process.yaml", REPO / "recipes" / "lora_dropout.py", "--output_dir", str(tmp_path),
           "--num_train_epochs", "2", "--num_eval_samples", "16", "--lora_dropout_eval_samples", "2",
           "--logging_steps", "1")
    rows = json.loads((tmp_path / "lora_dropout_results.json").read_text())
    assert [(row["model"], row["ensemble"]) for row in rows] == [
        ("LoRA", 0), ("LoRA Dropout (p = 0.2)", 0), ("LoRA Dropout (p = 0.2)", 2)]
    assert all(0 < row["heldout_loss"] < 10 and 0 <= row["accuracy"] <= 100 and 0 <= row["ece"] <= 100
               for row in rows)
    assert rows[1]["heldout_loss"] != rows[0]["heldout_loss"]  # the masks changed the training
    assert "| LoRA Dropout (p = 0.2) | 2 |" in (tmp_path / "lora_dropout_results.md").read_text()
    # What llmreg report and llmreg ablate read: each arm's scores and training curve, by its directory.
    from llmreg.report import run_metrics

    metrics = run_metrics(tmp_path)
    assert metrics["lora/heldout_loss"]["final"] == rows[0]["heldout_loss"]
    assert metrics["lora_dropout/ensemble_accuracy"]["final"] == rows[2]["accuracy"]

    # Each arm is a stage: the same command again reuses both arms (nothing retrained, the same table).
    stamps = [(tmp_path / arm / "trainer_state.json").stat().st_mtime_ns for arm in ("lora", "lora_dropout")]
    launch("single_process.yaml", REPO / "recipes" / "lora_dropout.py", "--output_dir", str(tmp_path),
           "--num_train_epochs", "2", "--num_eval_samples", "16", "--lora_dropout_eval_samples", "2",
           "--logging_steps", "1")
    assert [(tmp_path / arm / "trainer_state.json").stat().st_mtime_ns for arm in ("lora", "lora_dropout")] == stamps
    assert json.loads((tmp_path / "lora_dropout_results.json").read_text()) == rows
    assert "lora_dropout/lora_dropout/kept_fraction" in metrics and "lora/loss" in metrics


@pytest.mark.parametrize("trainer", ["UnlearnTrainer", "ReweightTrainer"])
def test_several_training_samples_are_refused_with_trainers_that_take_step_counts_once_per_call(trainer):
    # Their compute_loss pops the micro-batch's share of the step's counts (and side batches): N calls per micro-batch
    # would hand the later samples the next micro-batch's share. Refused before any model loads.
    from llmreg.reweight import ReweightTrainer
    from llmreg.unlearn import UnlearnTrainer

    trainer_class = with_lora_dropout({"UnlearnTrainer": UnlearnTrainer, "ReweightTrainer": ReweightTrainer}[trainer])
    with pytest.raises(ValueError, match="Use lora_dropout_train_samples=1"):
        trainer_class("no-model-is-loaded", lora_dropout=LoRADropoutConfig(lora_dropout_p=0.1,
                                                                           lora_dropout_train_samples=2))
