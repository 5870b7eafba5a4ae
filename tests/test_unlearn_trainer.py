"""UnlearnTrainer (llmreg/unlearn): each objective's gradient against the objective computed by hand from separate
forwards, the ℓ1 penalty adding exactly λ1·sign(θ) (λ1 = 0 leaving every objective unchanged), gradient accumulation
1×4 = 4×1, the "I don't know" answers lined up with their questions, the refusals, and 2 processes = 1 process under
DDP and DeepSpeed ZeRO-3."""


import pytest
import torch
from peft import LoraConfig

from llmreg.lab import facts_dataset
from llmreg.losses.kl import vocab_kl
from llmreg.losses.selfplay import sequence_logps
from llmreg.losses.unlearning import (
    dpo_unlearning_loss,
    ga_loss,
    gd_loss,
    idk_loss,
    kl_loss,
    nll,
    npo_loss,
    rmu_loss,
    scrub_loss,
)
from llmreg.unlearn import OBJECTIVES, UnlearnConfig, UnlearnTrainer
from llmreg.unlearn.unlearn_config import DEFAULT_BETA, RETAIN_OBJECTIVES


pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = ["q_proj", "v_proj", "up_proj"]


def make_trainer(lab_model_dir, tmp_path, objective, lora=True, **overrides):
    options = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "activation_checkpointing": False,
               "report_to": "none", "save_strategy": "no", "max_steps": 1, "per_device_train_batch_size": 4,
               "max_length": 64, "seed": 0, "logging_steps": 1, "learning_rate": 1e-2, "optim": "sgd",
               "max_grad_norm": 0.0, "weight_decay": 0.0, "objective": objective, "rmu_layer": 1,
               "rmu_steering_coeff": 20.0, **overrides}
    retain = facts_dataset("retain", num_entities=20, forget_fraction=0.25, seed=7)
    forget = facts_dataset("forget", num_entities=20, forget_fraction=0.25, seed=7)
    # B ≠ 0 from the start, so that the model differs from its teacher (the adapter disabled).
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LAYERS, init_lora_weights=False,
                             layers_to_transform=[0, 1] if objective == "rmu" else None) if lora else None
    torch.manual_seed(0)
    return UnlearnTrainer(str(lab_model_dir), args=UnlearnConfig(**options), forget_dataset=forget,
                          retain_dataset=retain if objective in RETAIN_OBJECTIVES else None, peft_config=peft_config)


def answer_logps(logits, labels):
    """Per-token log-probs of the labels (shifted) and their mask, computed plainly."""
    labels = labels[:, 1:]
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.gather(logps, 2, labels.clamp(min=0)[..., None])[..., 0], labels != -100


def hand_loss(trainer, forget, retain, idk):
    """The objective from separate forwards and the pure losses: the oracle for the trainer's concatenated forward
    and step-wide normalization (one micro-batch, one process: both are local means)."""
    model, objective = trainer.model, trainer.args.objective
    beta = DEFAULT_BETA.get(objective)

    def run(batch, teacher=False, hidden=False):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        if teacher:
            with model.disable_adapter(), torch.no_grad():
                return model(**inputs, output_hidden_states=hidden)
        return model(**inputs, output_hidden_states=hidden)

    def ce(batch):
        return nll(*answer_logps(run(batch).logits, batch["labels"]))

    def seq(batch, teacher=False):
        return sequence_logps(*answer_logps(run(batch, teacher).logits, batch["labels"]))

    def mask(batch):
        return batch["labels"][:, 1:] != -100

    if objective == "ga":
        return ga_loss(ce(forget))
    if objective == "gd":
        return gd_loss(ce(forget), ce(retain), beta)
    if objective == "kl":
        return kl_loss(ce(forget), vocab_kl(run(retain, True).logits[:, :-1], run(retain).logits[:, :-1],
                                            mask(retain)))
    if objective == "idk":
        return idk_loss(ce(idk), ce(retain))
    if objective == "npo":
        return npo_loss(seq(forget), seq(forget, True), beta)
    if objective == "dpo":
        return dpo_unlearning_loss(seq(idk), seq(forget), seq(idk, True), seq(forget, True), beta)
    if objective == "scrub":
        forget_kl = vocab_kl(run(forget).logits[:, :-1], run(forget, True).logits[:, :-1], mask(forget))
        retain_kl = vocab_kl(run(retain).logits[:, :-1], run(retain, True).logits[:, :-1], mask(retain))
        return scrub_loss(forget_kl, retain_kl, ce(retain), beta)
    layer = trainer.args.rmu_layer + 1
    generator = torch.Generator().manual_seed(trainer.args.seed)
    direction = torch.rand(128, generator=generator, dtype=torch.float64)
    control = (trainer.args.rmu_steering_coeff * direction / direction.norm()).float()
    return rmu_loss(run(forget, hidden=True).hidden_states[layer], forget["attention_mask"], control,
                    run(retain, hidden=True).hidden_states[layer], run(retain, True, True).hidden_states[layer],
                    retain["attention_mask"], beta)


def one_step_gradients(trainer):
    """The gradients of one training_step on the first forget batch, and the batches it read."""
    trainer.current_gradient_accumulation_steps = 1
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.training_step(trainer.model, batch)
    forget = {k: v for k, v in batch.items() if k != "forget_row"}
    retain = idk = None
    if trainer._retain_rows is not None:
        retain = trainer.data_collator(list(trainer._retain_rows.select(trainer._retain_indices(0))))
    if trainer._idk_rows is not None:
        idk = trainer.data_collator(list(trainer._idk_rows.select(batch["forget_row"].tolist())))
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss, {n: p.grad.clone() for n, p in params.items()}, (forget, retain, idk), params


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradient_is_the_objective_by_hand_and_l1_adds_lambda_sign(lab_model_dir, tmp_path, objective):
    trainer = make_trainer(lab_model_dir, tmp_path / "plain", objective)
    loss, grads, batches, params = one_step_gradients(trainer)
    for p in params.values():
        p.grad = None
    expected = hand_loss(trainer, *batches)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    expected_grads = torch.autograd.grad(expected, list(params.values()))
    assert any(g.abs().max() > 0 for g in expected_grads)
    for (name, grad), want in zip(grads.items(), expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")

    lam = 0.3
    penalized = make_trainer(lab_model_dir, tmp_path / "l1", objective, l1_lambda=lam)
    penalized_loss, penalized_grads, _, penalized_params = one_step_gradients(penalized)
    assert penalized_loss.item() == pytest.approx(loss.item(), rel=1e-6)  # the logged loss is the objective's
    for name, grad in penalized_grads.items():
        torch.testing.assert_close(grad - grads[name], lam * torch.sign(penalized_params[name].detach()), rtol=1e-4,
                                   atol=1e-5)
    assert penalized._metrics["train"]["l1/norm"][-1] > 0


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradient_accumulation_one_by_four_equals_four_by_one(lab_model_dir, tmp_path, objective):
    runs = {}
    for batch, accumulation in ((4, 1), (1, 4)):
        trainer = make_trainer(lab_model_dir, tmp_path / f"{batch}x{accumulation}", objective,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                               retain_batch_size=batch, l1_lambda=0.01)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert any(not torch.equal(after[n], before[n]) for n in before)
        runs[batch] = after, trainer.state.log_history[0]
    (one, log_one), (four, log_four) = runs[4], runs[1]
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-5, atol=1e-6)
    assert log_four["loss"] == pytest.approx(log_one["loss"], rel=1e-5, abs=1e-6)


def test_idk_answers_ask_their_forget_question(lab_model_dir, tmp_path):
    trainer = make_trainer(lab_model_dir, tmp_path, "dpo", idk_answers=["No idea."])
    forget = trainer.train_dataset
    tokenizer = trainer.processing_class
    for row in range(len(forget)):
        forget_ids, idk_ids = forget[row]["input_ids"], trainer._idk_rows[row]["input_ids"]
        prompt_length = forget[row]["labels"].index(next(t for t in forget[row]["labels"] if t != -100))
        assert idk_ids[:prompt_length] == forget_ids[:prompt_length]
        assert "No idea." in tokenizer.decode(idk_ids[prompt_length:])


def test_the_retain_batch_is_a_function_of_the_step(lab_model_dir, tmp_path):
    a = make_trainer(lab_model_dir, tmp_path / "a", "gd")
    b = make_trainer(lab_model_dir, tmp_path / "b", "gd")
    draws = [a._retain_indices(i) for i in range(10)]
    assert [b._retain_indices(i) for i in reversed(range(10))] == draws[::-1]  # order of asking does not matter
    assert len({row for draw in draws[:15] for row in draw}) == len([r for d in draws[:15] for r in d])  # a pass
    assert all(len(draw) == 4 for draw in draws)


@pytest.mark.parametrize("options, message", [
    ({"objective": "forget"}, "Unknown unlearning objective 'forget'; valid objectives: ga, gd"),
    ({"objective": "ga", "beta": 0.5}, "beta has no effect on objective 'ga'"),
    ({"objective": "npo", "packing": True}, "packing=False"),
    ({"objective": "npo", "l1_lambda": -1.0}, "l1_lambda must be >= 0"),
])
def test_config_refusals(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        UnlearnConfig(str(tmp_path), use_cpu=True, bf16=False, **options)


def test_trainer_refusals(lab_model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs the teacher|disabling the unlearning LoRA adapter"):
        make_trainer(lab_model_dir, tmp_path, "npo", lora=False)
    with pytest.raises(ValueError, match="rmu_layer is 9, but the model has 4 decoder layers"):
        make_trainer(lab_model_dir, tmp_path, "rmu", rmu_layer=9)
    with pytest.raises(ValueError, match="does not reach .* trainable parameters after it"):
        make_trainer(lab_model_dir, tmp_path, "rmu", rmu_layer=0)
    args = UnlearnConfig(str(tmp_path), use_cpu=True, bf16=False, objective="gd", report_to="none")
    forget = facts_dataset("forget", num_entities=20, forget_fraction=0.25, seed=7)
    with pytest.raises(ValueError, match="keeps the retain set: pass retain_dataset"):
        UnlearnTrainer(str(lab_model_dir), args=args, forget_dataset=forget)
    args.objective = "ga"
    with pytest.raises(ValueError, match="does not read the retain set"):
        UnlearnTrainer(str(lab_model_dir), args=args, forget_dataset=forget, retain_dataset=forget)
    args.objective = "idk"
    text = forget.map(lambda row: {"text": row["question"] + " " + row["answer"]}).select_columns(["text"])
    with pytest.raises(ValueError, match="needs `prompt` and `completion` columns"):
        UnlearnTrainer(str(lab_model_dir), args=args, forget_dataset=text, retain_dataset=forget)
    with pytest.raises(TypeError, match="not train_dataset"):
        UnlearnTrainer(str(lab_model_dir), args=args, train_dataset=forget)


def test_resume_equals_the_straight_run(lab_model_dir, tmp_path):
    # The retain batches are a function of the step, the IDK answers and RMU's u of the seed: a run resumed from a
    # checkpoint at step 2 of 4 ends where the straight run does.
    def run(directory, resume=None):
        trainer = make_trainer(lab_model_dir, directory, "gd", max_steps=4, save_steps=2, save_strategy="steps")
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    straight, expected = run(tmp_path / "straight")
    _, resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"))
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-7)
    draws = [straight._retain_indices(i) for i in range(4)]
    assert len({tuple(d) for d in draws}) == 4  # each step read its own retain batch


def test_evaluation_is_the_plain_sft_loss(lab_model_dir, tmp_path):
    from trl import SFTConfig, SFTTrainer

    data = facts_dataset("retain", num_entities=20, forget_fraction=0.25, seed=7).select(range(8))
    trainer = make_trainer(lab_model_dir, tmp_path / "unlearn", "npo")
    trainer.eval_dataset = trainer._prepare_dataset(data, trainer.processing_class, trainer.args, packing=False,
                                                    formatting_func=None, dataset_name="eval")
    unlearn_loss = trainer.evaluate()["eval_loss"]
    args = SFTConfig(str(tmp_path / "sft"), use_cpu=True, bf16=False, report_to="none", max_length=64,
                     per_device_eval_batch_size=8)
    sft = SFTTrainer(trainer.model, args=args, train_dataset=data, eval_dataset=data)
    assert unlearn_loss == pytest.approx(sft.evaluate()["eval_loss"], rel=1e-5)


def test_activation_checkpointing_gives_the_same_gradient(lab_model_dir, tmp_path):
    # The teacher's forward (adapter disabled, no gradients) inside a checkpointed model must not disturb the replay.
    _, plain, _, _ = one_step_gradients(make_trainer(lab_model_dir, tmp_path / "plain", "scrub"))
    trainer = make_trainer(lab_model_dir, tmp_path / "ckpt", "scrub")
    trainer.model.gradient_checkpointing_enable()  # what Trainer.train does with activation_checkpointing=True
    trainer.model.enable_input_require_grads()
    assert trainer.model.get_base_model().is_gradient_checkpointing
    _, checkpointed, _, _ = one_step_gradients(trainer)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)
