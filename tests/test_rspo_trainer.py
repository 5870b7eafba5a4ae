"""RSPOTrainer on the lab model, against hand computations on the same batches.

- config checks: every refused option names the fix; the three spellings of ``regularizers`` agree;
- dataset checks: a missing column fails before any model is loaded, naming the column;
- columns: win probabilities and the precomputed π_t / μ log-probs reach the batch with the dataset's values, and
  those log-probs equal a manual forward (sum of token log-probs over the completion only);
- the base model μ: live or precomputed give the same loss; precomputed, no frozen model stays alive in training;
  the precompute is cached on disk and not redone;
- the loss: with μ = π_t, RSPO(reverse KL) is SPPO at step 0 and SPPO is its hand formula; one step lowers
  the SPPO term; gradient accumulation does not change the update; ``forward_kl_samples`` adds λ·cross-entropy on the
  base model's samples.
"""

import gc

import pytest
import torch
from helpers import pairs, rspo_config
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, TrainerCallback

from llmreg.preference_utils import PrecomputedColumnsDPOTrainer
from llmreg.rspo import RSPOConfig, RSPOTrainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(lab_model_dir, tmp_path_factory):
    """A base model μ ≠ π_t: the lab model with small Gaussian noise on every weight."""
    path = tmp_path_factory.mktemp("perturbed-base")
    model = AutoModelForCausalLM.from_pretrained(lab_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(lab_model_dir).save_pretrained(path)
    return str(path)


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def train_loss(trainer, batch):
    trainer.model.train()
    return trainer.compute_loss(trainer.model, batch)


@torch.no_grad()
def eval_loss(trainer, batch):
    trainer.model.eval()
    return trainer.compute_loss(trainer.model, batch)


def manual_logps(model, prompt_ids, completion_ids):
    """ℓ(y): a plain forward, log_softmax, the log-prob of each completion token, summed (prompt excluded)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        token_logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[len(prompt_ids) - 1:].sum().item()


def manual_batch_logps(model, input_ids, attention_mask, completion_mask):
    """The same for a padded batch: the mask selects completion tokens, (B, T) → (B,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return (token_logps * completion_mask[:, 1:]).sum(-1)


# --- configuration and dataset checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"regularizers": "kl=0.1"},
     ("Unknown RSPO regularizer 'kl'; valid values: reverse_kl, reverse_kl_noent, forward_kl_is, "
      "forward_kl_samples, chi2, chi2_smooth, entropy")),
    ({"regularizers": {"reverse_kl": -0.5}}, "weight of regularizer 'reverse_kl' must be >= 0"),
    ({"regularizers": "reverse_kl"}, "kind=weight pairs"),
    ({"sppo_variant": "mixed"}, "valid values: soft, single, hard"),
    ({"beta": 0.0}, "must be > 0"),
    ({"loss_type": "hinge"}, "would do nothing: loss_type"),
    ({"label_smoothing": 0.1}, "would do nothing: label_smoothing"),
    ({"use_weighting": True}, "would do nothing: use_weighting"),
])
def test_bad_configurations_fail_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        RSPOConfig(str(tmp_path), use_cpu=True, **overrides)


def test_regularizers_parse_from_a_dict_json_or_pairs(tmp_path):
    expected = {"forward_kl_is": 0.01, "reverse_kl": 0.5}
    for spelling in ("forward_kl_is=0.01,reverse_kl=0.5", ' {"forward_kl_is": 0.01, "reverse_kl": 0.5}', expected):
        assert RSPOConfig(str(tmp_path), use_cpu=True, regularizers=spelling).regularizers == expected
    assert RSPOConfig(str(tmp_path), use_cpu=True, regularizers="").regularizers == {}


@pytest.mark.parametrize(("drop", "overrides", "column"), [
    ("chosen_probs_win", {}, "'chosen_probs_win'"),
    ("chosen_probs", {"sppo_variant": "single"}, "'chosen_probs'"),
    ("base_completion", {"regularizers": "forward_kl_samples=0.1"}, "'base_completion'"),
])
def test_a_missing_column_fails_before_any_model_is_loaded(tmp_path, drop, overrides, column):
    dataset = pairs(2, base_completion=True).remove_columns(drop)
    # No model at this path: loading one first would fail with another error.
    with pytest.raises(ValueError, match=column):
        RSPOTrainer(str(tmp_path / "no-model-here"), args=rspo_config(tmp_path, **overrides), train_dataset=dataset)


# --- columns ---------------------------------------------------------------------------------------------------------


def test_extra_columns_reach_the_batch_with_the_dataset_values(lab_model_dir, base_dir, tmp_path):
    trainer = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path, regularizers="reverse_kl=0.5",
                                                                base_model_name_or_path=base_dir),
                          train_dataset=pairs(8))
    batch = first_batch(trainer)
    # The sampler shuffles: find each batch row in the dataset by its prompt + chosen tokens.
    rows = {tuple(row["prompt_ids"] + row["chosen_ids"]): row for row in trainer.train_dataset}
    size = batch["chosen_probs_win"].shape[0]
    chosen_ids = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"][:size],
                                                                 batch["attention_mask"][:size])]
    matched = [rows[tuple(ids)] for ids in chosen_ids]
    assert len({id(row) for row in matched}) == size
    for column in ("chosen_probs_win", "chosen_probs_lose", "ref_chosen_logps", "ref_rejected_logps",
                   "base_chosen_logps", "base_rejected_logps"):
        assert batch[column].dtype == torch.float32
        expected = torch.tensor([row[column] for row in matched], dtype=torch.float32)
        torch.testing.assert_close(batch[column], expected, rtol=0, atol=0)


def test_precomputed_policy_and_base_log_probs_equal_a_manual_forward(lab_model_dir, base_dir, tmp_path):
    trainer = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path, regularizers="reverse_kl=0.5",
                                                                base_model_name_or_path=base_dir),
                          train_dataset=pairs(6))
    for prefix, path in (("ref", lab_model_dir), ("base", base_dir)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        for side in ("chosen", "rejected"):
            expected = [manual_logps(model, row["prompt_ids"], row[f"{side}_ids"]) for row in trainer.train_dataset]
            actual = trainer.train_dataset[f"{prefix}_{side}_logps"]
            torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=0, atol=1e-4)
    # The two models differ by far more than the tolerance, so each column was scored by its own model.
    ref, base = (torch.tensor(trainer.train_dataset[f"{prefix}_chosen_logps"]) for prefix in ("ref", "base"))
    assert (ref - base).abs().min() > 1e-2


# --- the base model μ: live, precomputed, cached ---------------------------------------------------------------------


def test_a_live_base_model_gives_the_loss_of_the_precomputed_columns(lab_model_dir, base_dir, tmp_path):
    regularizers = "reverse_kl=0.5,forward_kl_is=0.01,chi2_smooth=0.1"
    dataset = pairs(4)
    precomputed = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path / "pre", regularizers=regularizers,
                                                                    base_model_name_or_path=base_dir),
                              train_dataset=dataset)
    live = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path / "live", regularizers=regularizers,
                                                             base_model_name_or_path=base_dir,
                                                             precompute_base_log_probs=False),
                       train_dataset=dataset)
    assert precomputed.base_model is None and isinstance(live.base_model, PreTrainedModel)
    assert "base_chosen_logps" not in live.train_dataset.column_names
    batch = first_batch(precomputed)
    live_batch = {key: value for key, value in batch.items() if not key.startswith("base_")}
    torch.testing.assert_close(train_loss(live, live_batch), train_loss(precomputed, batch), rtol=0, atol=1e-5)


def top_level_models():
    """Live PreTrainedModel objects that are not a submodule of another (a causal LM holds an inner model)."""
    gc.collect()
    models = [obj for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)]
    inner = {id(module) for model in models for module in model.modules() if module is not model}
    return {id(model): model for model in models if id(model) not in inner}


class CountModels(TrainerCallback):
    def __init__(self, ignore):
        self.ignore, self.counts, self.paths = set(ignore), [], []

    def on_step_end(self, args, state, control, **kwargs):
        models = [model for key, model in top_level_models().items() if key not in self.ignore]
        self.counts.append(len(models))
        self.paths.append(sorted(model.name_or_path for model in models))


def test_with_precomputed_columns_training_holds_only_the_policy(lab_model_dir, base_dir, tmp_path):
    before = top_level_models()  # models of other tests that are still alive do not count
    trainer = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path, regularizers="reverse_kl=0.5",
                                                                base_model_name_or_path=base_dir, max_steps=2),
                          train_dataset=pairs(8))
    assert trainer.ref_model is None and trainer.base_model is None
    counter = CountModels(before)
    trainer.add_callback(counter)
    trainer.train()
    assert counter.counts == [1, 1], counter.paths


def test_the_precompute_frees_the_base_model_before_init_returns(lab_model_dir, base_dir, tmp_path):
    before = top_level_models()
    train, evaluation = pairs(8).train_test_split(test_size=4, shuffle=False).values()
    trainer = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path, regularizers="reverse_kl=0.5",
                                                                base_model_name_or_path=base_dir),
                          train_dataset=train, eval_dataset=evaluation)
    alive = [model.name_or_path for key, model in top_level_models().items() if key not in before]
    assert alive == [trainer.model.name_or_path]


@pytest.mark.parametrize(("subdir", "second"), [
    pytest.param("", {}, id="same-arguments"),
    pytest.param("other", {}, id="other-output-dir"),
    pytest.param("", {"regularizers": "reverse_kl=0.1"}, id="other-weight"),
])
def test_base_log_probs_are_cached_and_not_recomputed(lab_model_dir, base_dir, tmp_path, monkeypatch, subdir, second):
    dataset = pairs(5)
    loads = []
    load = PrecomputedColumnsDPOTrainer.load_frozen_model

    def counting_load(self, path):
        loads.append(path)
        return load(self, path)

    def refuse(self, path):
        raise AssertionError(f"the base model {path} was loaded again")

    monkeypatch.setattr(PrecomputedColumnsDPOTrainer, "load_frozen_model", counting_load)
    args = dict(regularizers="reverse_kl=0.5", base_model_name_or_path=base_dir)
    first = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path, **args), train_dataset=dataset)
    # The key is the pairs' tokens and the weight files: an earlier case of this test may have cached them already.
    assert loads in ([], [base_dir])
    monkeypatch.setattr(PrecomputedColumnsDPOTrainer, "load_frozen_model", refuse)
    second_trainer = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path / subdir, **{**args, **second}),
                                 train_dataset=dataset)
    for column in ("base_chosen_logps", "base_rejected_logps"):
        assert second_trainer.train_dataset[column] == first.train_dataset[column]


# --- the loss --------------------------------------------------------------------------------------------------------


def test_with_base_equal_to_the_iterate_rspo_is_sppo_at_step_0(lab_model_dir, tmp_path):
    # μ = π_t (base_model_name_or_path=None), so the reverse-KL term and its gradient vanish at step 0.
    dataset = pairs(8)
    sppo = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path / "sppo"), train_dataset=dataset)
    rspo = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path / "rspo", regularizers={"reverse_kl": 0.5}),
                       train_dataset=dataset)
    assert rspo.base_model is None and "base_chosen_logps" not in rspo.train_dataset.column_names
    batch = first_batch(sppo)
    losses, grads = [], []
    for trainer in (sppo, rspo):
        trainer.model.zero_grad()
        loss = train_loss(trainer, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert rspo._metrics["train"]["reg/reverse_kl"][-1] == pytest.approx(0.0, abs=1e-8)
    # At init Δ = ℓ_θ − ℓ_t = 0, so the soft SPPO loss is ½η²[(p_w − ½)² + (p_l − ½)²], η = 1/β.
    eta = 1 / sppo.args.beta
    expected = 0.5 * eta**2 * ((batch["chosen_probs_win"] - 0.5) ** 2 + (batch["chosen_probs_lose"] - 0.5) ** 2)
    torch.testing.assert_close(losses[0], expected.mean(), rtol=1e-5, atol=1e-6)


def test_with_win_probabilities_one_half_sppo_is_zero_at_init(lab_model_dir, tmp_path):
    trainer = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path), train_dataset=pairs(4, p_win=0.5))
    assert train_loss(trainer, first_batch(trainer)).item() == pytest.approx(0.0, abs=1e-8)


def test_one_step_lowers_the_sppo_term_on_the_batch(lab_model_dir, tmp_path):
    # μ = π_t: the reverse-KL term is 0 with zero gradient at step 0, and positive once the policy has moved.
    trainer = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path, regularizers="reverse_kl=0.5"),
                          train_dataset=pairs(4))
    batch = first_batch(trainer)  # the whole dataset: the step is taken on exactly this batch
    metrics = trainer._metrics["eval"]
    eval_loss(trainer, batch)
    sppo_before, reg_before = metrics["sppo/loss"][-1], metrics["reg/reverse_kl"][-1]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert all(not b.equal(p) for b, p in zip(before, trainer.model.parameters()))
    eval_loss(trainer, batch)
    sppo_after, reg_after = metrics["sppo/loss"][-1], metrics["reg/reverse_kl"][-1]
    assert sppo_after < sppo_before
    assert reg_before == pytest.approx(0.0, abs=1e-8) and reg_after > 1e-6
    logged = next(entry for entry in trainer.state.log_history if "sppo/loss" in entry)
    assert logged["sppo/loss"] == pytest.approx(sppo_before, rel=1e-5)


def test_gradient_accumulation_does_not_change_the_update(lab_model_dir, base_dir, tmp_path):
    dataset = pairs(8)
    common = dict(regularizers="forward_kl_is=0.01,reverse_kl=0.5", base_model_name_or_path=base_dir, optim="sgd",
                  learning_rate=1e-3, max_grad_norm=0.0)
    whole = RSPOTrainer(str(lab_model_dir), train_dataset=dataset, args=rspo_config(
        tmp_path / "whole", per_device_train_batch_size=8, gradient_accumulation_steps=1, **common))
    accumulated = RSPOTrainer(str(lab_model_dir), train_dataset=dataset, args=rspo_config(
        tmp_path / "accumulated", per_device_train_batch_size=1, gradient_accumulation_steps=8, **common))
    initial = [p.detach().clone() for p in whole.model.parameters()]
    whole.train()
    accumulated.train()
    assert whole.state.global_step == accumulated.state.global_step == 1
    for start, a, b in zip(initial, whole.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(b - start, a - start, rtol=1e-4, atol=1e-6)
    update = max((a - start).abs().max().item() for start, a in zip(initial, whole.model.parameters()))
    assert update > 1e-4  # both runs moved, far beyond the tolerance


def test_forward_kl_on_base_samples_adds_lambda_times_their_cross_entropy(lab_model_dir, tmp_path):
    weight = 0.1
    dataset = pairs(4, base_completion=True)
    with_samples = RSPOTrainer(str(lab_model_dir), train_dataset=dataset, args=rspo_config(
        tmp_path / "samples", regularizers={"forward_kl_samples": weight}))
    plain = RSPOTrainer(str(lab_model_dir), args=rspo_config(tmp_path / "plain"), train_dataset=dataset)
    # base_completion is tokenized as TRL tokenizes chosen (on even rows the sample is the chosen response).
    tokenized = with_samples.train_dataset
    assert all(tokenized[i]["base_completion_ids"] == tokenized[i]["chosen_ids"] for i in range(0, len(dataset), 2))
    assert all(tokenized[i]["base_completion_ids"] != tokenized[i]["chosen_ids"] for i in range(1, len(dataset), 2))

    batch = first_batch(with_samples)
    model = AutoModelForCausalLM.from_pretrained(lab_model_dir).eval()
    with torch.no_grad():
        cross_entropy = -manual_batch_logps(model, *(batch[f"base_sample_{key}"] for key in (
            "input_ids", "attention_mask", "completion_mask")))
    assert (cross_entropy > 0).all()
    difference = train_loss(with_samples, batch) - train_loss(plain, batch)
    torch.testing.assert_close(difference, weight * cross_entropy.mean(), rtol=1e-4, atol=1e-5)
    logged = with_samples._metrics["train"]["reg/forward_kl_samples_cross_entropy"][-1]
    assert logged == pytest.approx(cross_entropy.mean().item(), rel=1e-5)

    # Training on that batch (the whole dataset) logs the same values at its first step, taken from the initial policy.
    loss = train_loss(with_samples, batch).item()
    with_samples._metrics["train"].clear()
    with_samples.train()
    entry = next(entry for entry in with_samples.state.log_history if "loss" in entry)
    assert entry["reg/forward_kl_samples_cross_entropy"] == pytest.approx(logged, rel=1e-5)
    assert entry["loss"] == pytest.approx(loss, abs=1e-4)  # the Trainer rounds the logged loss
