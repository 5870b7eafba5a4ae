"""ReweightTrainer (llmreg/reweight): uniform weights are SFTTrainer exactly (gradient accumulation included), the
gradient is the weighted loss by hand, weights over the whole step make 8 micro-batches of 1 equal 1 of 8, the
warmup is uniform and a run resumed inside it equals the straight run, packed padding-free batches weight documents,
bad options are refused, and 2 processes equal 1 process under DDP and DeepSpeed ZeRO-3."""


import pytest
import torch
from trl import SFTConfig, SFTTrainer

from llmreg.lab import arithmetic_dataset, corpus_dataset
from llmreg.losses.reweighting import per_sample_losses, sample_weights
from llmreg.reweight import ReweightConfig, ReweightTrainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = {"use_cpu": True, "bf16": False, "activation_checkpointing": False, "report_to": "none",
          "save_strategy": "no", "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 64, "seed": 0,
          "logging_steps": 1, "learning_rate": 1e-2, "optim": "sgd", "max_grad_norm": 0.0}


def make_trainer(lab_model_dir, tmp_path, data=None, **options):
    torch.manual_seed(0)
    args = ReweightConfig(str(tmp_path), **{**COMMON, **options})
    return ReweightTrainer(str(lab_model_dir), args=args, train_dataset=data or corpus_dataset(64))


def trained(trainer):
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("data", ["text", "prompt-completion", "messages"])
def test_uniform_is_sft_exactly_with_gradient_accumulation(lab_model_dir, tmp_path, data):
    dataset = corpus_dataset(64) if data == "text" else arithmetic_dataset(64)
    if data == "messages":
        dataset = dataset.map(lambda row: {"messages": row["prompt"] + row["completion"]},
                              remove_columns=dataset.column_names)
    options = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3}
    reweighted = make_trainer(lab_model_dir, tmp_path / "uniform", dataset, reweight_strategy="uniform", **options)
    after = trained(reweighted)
    torch.manual_seed(0)
    sft = SFTTrainer(str(lab_model_dir), args=SFTConfig(str(tmp_path / "sft"), **{**COMMON, **options}),
                     train_dataset=dataset)
    expected = trained(sft)
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-7)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (reweighted, sft)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    start = make_trainer(lab_model_dir, tmp_path / "start", dataset).model.state_dict()
    assert all(not torch.equal(after[name], start[name]) for name in ("model.embed_tokens.weight",
                                                                      "model.norm.weight"))


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes"])
def test_gradient_is_the_weighted_loss_by_hand(lab_model_dir, tmp_path, strategy):
    trainer = make_trainer(lab_model_dir, tmp_path, reweight_strategy=strategy, reweight_r=0.4)
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.training_step(trainer.model, batch)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses, counts = per_sample_losses(logits, batch["labels"])
    weights = sample_weights(losses.detach(), strategy, r=0.4)
    assert not torch.allclose(weights, torch.full_like(weights, 0.25))
    expected = (weights * len(losses) * counts * losses).sum() / counts.sum()
    for grad, want in zip(grads, torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    logged = trainer._metrics["train"]
    assert logged["reweight/effective_sample_size"][-1] == pytest.approx(1 / weights.square().sum().item(), rel=1e-5)
    assert logged["reweight/weight_max"][-1] == pytest.approx(weights.max().item(), rel=1e-5)


def test_step_scope_weighs_the_whole_step_whatever_the_accumulation(lab_model_dir, tmp_path):
    def run(name, batch, accumulation, scope, strategy="linupper"):
        trainer = make_trainer(lab_model_dir, tmp_path / name, reweight_strategy=strategy, reweight_r=0.4,
                               reweight_scope=scope, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accumulation)
        return trained(trainer), trainer

    whole, whole_trainer = run("1x8", 8, 1, "step")
    accumulated, accumulated_trainer = run("8x1", 1, 8, "step")
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6)
    # The weights are logged once per step, over its 8 samples.
    sizes = [[e["reweight/effective_sample_size"] for e in t.state.log_history if "reweight/effective_sample_size"
              in e] for t in (whole_trainer, accumulated_trainer)]
    assert sizes[1] == pytest.approx(sizes[0], rel=1e-4) and all(1 < size < 7.9 for size in sizes[0])
    # Per micro-batch (the reference's scope), a micro-batch of 1 sample gives it weight 1: uniform weights, SFT's
    # update, which the step's weights move away from.
    per_micro_batch, _ = run("8x1-micro", 1, 8, "micro_batch")
    uniform, _ = run("8x1-uniform", 1, 8, "micro_batch", strategy="uniform")
    for name, value in uniform.items():
        torch.testing.assert_close(per_micro_batch[name], value, rtol=1e-6, atol=1e-7)
    assert max((uniform[name] - whole[name]).abs().max().item() for name in whole) > 1e-4


def test_step_scope_costs_one_extra_forward_per_micro_batch_only_when_it_weighs(lab_model_dir, tmp_path):
    def forwards(name, accumulation=4, **options):
        trainer = make_trainer(lab_model_dir, tmp_path / name, reweight_scope="step", per_device_train_batch_size=2,
                               gradient_accumulation_steps=accumulation, max_steps=2, **options)
        calls = []
        trainer.model.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
        trainer.train()
        return calls

    weighing = forwards("linupper", reweight_strategy="linupper")
    assert weighing.count(False) == 8 and weighing.count(True) == 8  # 2 steps x 4 micro-batches, each pass
    assert forwards("uniform", reweight_strategy="uniform") == [True] * 8  # uniform weights need no losses first
    assert forwards("warmup", reweight_strategy="linupper", reweight_warmup_steps=1).count(False) == 4
    assert forwards("one", accumulation=1, reweight_strategy="linupper") == [True] * 2


def test_warmup_is_uniform_and_resume_inside_it_equals_the_straight_run(lab_model_dir, tmp_path):
    options = {"reweight_warmup_steps": 2, "max_steps": 4, "save_steps": 1, "save_strategy": "steps"}
    straight = make_trainer(lab_model_dir, tmp_path / "straight", **options)
    expected = trained(straight)
    history = [e for e in straight.state.log_history if "reweight/effective_sample_size" in e]
    assert [e["reweight/effective_sample_size"] for e in history[:2]] == [4.0, 4.0]  # uniform: every sample counts
    assert all(e["reweight/effective_sample_size"] < 4.0 for e in history[2:])
    resumed = make_trainer(lab_model_dir, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-1"))
    for name, value in expected.items():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name].detach(), value, rtol=0, atol=1e-7)
    straight_losses = [e["loss"] for e in straight.state.log_history if "loss" in e]
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert resumed_losses[-3:] == pytest.approx(straight_losses[-3:], rel=1e-6)


def test_r_schedule_moves_linearly_after_the_warmup(tmp_path):
    args = ReweightConfig(str(tmp_path), use_cpu=True, bf16=False, reweight_r=0.4, reweight_r_start=2.0,
                          reweight_r_decay_steps=4, reweight_warmup_steps=10)
    assert [args.r_at(s) for s in (10, 12, 14, 20)] == pytest.approx([2.0, 1.2, 0.4, 0.4])


def test_packed_padding_free_batches_weight_each_document(lab_model_dir, tmp_path):
    trainer = make_trainer(lab_model_dir, tmp_path, packing=True, padding_free=True, max_length=128,
                           reweight_strategy="uniform", max_steps=1, per_device_train_batch_size=2)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    documents = int(batch["seq_idx"].max()) + 1
    assert batch["input_ids"].shape[0] == 1 and documents > 2  # two packed rows of several documents, flattened
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model, batch)
    assert trainer._metrics["train"]["reweight/effective_sample_size"][-1] == pytest.approx(documents)


@pytest.mark.parametrize(("options", "message"), [
    ({"reweight_strategy": "linear"}, "valid strategies: uniform, linupper, quadratic, extremes"),
    ({"reweight_r": 0.0}, "reweight_r and reweight_delta must be > 0"),
    ({"reweight_scope": "epoch"}, "valid scopes: micro_batch, step"),
    ({"reweight_r_decay_steps": 5}, "set both, or neither"),
    ({"reweight_r_start": 2.0}, "reweight_r_decay_steps > 0"),
])
def test_config_refusals(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        ReweightConfig(str(tmp_path), use_cpu=True, bf16=False, **options)


def test_the_recipe_compares_strategies_from_the_same_start(lab_model_dir, tmp_path):
    import sys
    from pathlib import Path

    from llmreg.recipe_utils import parse_recipe_args

    sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
    import reweight

    assert reweight.steps_to_reach([(5, 3.0), (10, 2.0), (15, 2.5)], 2.2) == 10
    assert reweight.steps_to_reach([(5, 3.0)], 2.2) is None
    args = ["--model_name_or_path", str(lab_model_dir), "--output_dir", str(tmp_path), "--strategies", "uniform",
            "linupper", "--max_steps", "6", "--eval_steps", "3", "--num_train_samples", "96",
            "--num_eval_samples", "16", "--use_cpu", "--bf16", "false"]
    rows = reweight.main(*parse_recipe_args(reweight.make_parser(), args))
    by_strategy = {row["strategy"]: row for row in rows}
    uniform, linupper = by_strategy["uniform"], by_strategy["linupper"]
    assert [step for step, _ in uniform["curve"]] == [0, 3, 6]
    # The same initialization (the held-out loss at step 0); the weights then make the curves part.
    assert linupper["curve"][0][1] == pytest.approx(uniform["curve"][0][1], rel=1e-6)
    assert linupper["curve"][-1][1] != pytest.approx(uniform["curve"][-1][1], rel=1e-6)
    assert uniform["steps_to_uniform_final"] == reweight.steps_to_reach(uniform["curve"], uniform["curve"][-1][1])
    assert (tmp_path / "reweight_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| linupper |" in (tmp_path / "reweight_results.md").read_text()
    # What llmreg report and llmreg ablate read: each strategy's held-out curve and final numbers, by its directory.
    from llmreg.report import run_metrics

    metrics = run_metrics(tmp_path)
    assert metrics["linupper/eval_loss"] == {"final": linupper["curve"][-1][1],
                                             "best": min(loss for _, loss in linupper["curve"][1:])}
    assert metrics["uniform/final_heldout_loss"]["final"] == uniform["final_heldout_loss"]

    # Each strategy is a stage: a rerun reuses both (no training), another setting is refused by name.
    from llmreg.stages import StageSettingsError

    def refuse(*args, **kwargs):
        raise AssertionError("a finished strategy trained again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reweight, "ReweightTrainer", refuse)
        assert reweight.main(*parse_recipe_args(reweight.make_parser(), args)) == rows
        with pytest.raises(StageSettingsError, match=r"training.max_steps: 6 recorded, 8 now"):
            reweight.main(*parse_recipe_args(reweight.make_parser(), [*args, "--max_steps", "8"]))
