"""The loss-mask audit: for every trainer and every batch it trains on, exactly the answer tokens carry a loss.

Each test builds a trainer on the lab model, lets it build its batches the way training does and run its loss, and
reads off the gradient which tokens the loss reached (``tests/loss_audit.py``). The expectation is each example's
answer, tokenised by hand apart from its prompt, never the trainer's own masks. Formats: TRL's prompt-completion with
chat messages, plain-text prompt-completion, and ``messages`` with ``assistant_only_loss``; packing where the trainer
allows it.
"""

from types import SimpleNamespace

import pytest
from datasets import Dataset
from helpers import FORMATS, format_options, hand_tokenised, in_format
from loss_audit import Example, check_answer_tokens_carry_the_loss, watched_forwards
from peft import LoraConfig
from transformers import AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.lab import (
    arithmetic_dataset,
    corpus_dataset,
    facts_dataset,
    safety_alignment_dataset,
    safety_harmful_dataset,
)
from llmreg.reweight import ReweightConfig, ReweightTrainer
from llmreg.trainer_utils import prepare_side_dataset
from llmreg.unlearn import OBJECTIVES, UnlearnConfig, UnlearnTrainer
from llmreg.unlearn.unlearn_config import IDK_ANSWERS, IDK_OBJECTIVES, RETAIN_OBJECTIVES


pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
              max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, seed=0, max_length=256)
def check(forwards, tokenizer, dataset, data_format, what) -> int:
    return check_answer_tokens_carry_the_loss(forwards, hand_tokenised(tokenizer, dataset, data_format), what)


# --- Booster ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data_format", FORMATS)
def test_booster_harmful_and_alignment_batches_train_on_the_answers(lab_model_dir, tmp_path, data_format):
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    alignment = in_format(safety_alignment_dataset(64), data_format)
    harmful = in_format(safety_harmful_dataset(64), data_format)
    args = BoosterConfig(str(tmp_path), **COMMON, harmful_batch_size=4, booster_lambda=1.0, booster_alpha=0.1,
                         **format_options(data_format))
    trainer = BoosterTrainer(str(lab_model_dir), args=args, train_dataset=alignment, harmful_dataset=harmful)
    model = trainer.model
    model.train()

    with watched_forwards(model) as forwards:
        trainer._booster_gradient(model)  # h(w) and h(w̃) on the step's harmful batch, by autograd.grad
    assert len(forwards) == 2
    assert check(forwards, tokenizer, harmful, data_format, "Booster's harmful batch") == 2 * 4

    with watched_forwards(model) as forwards:
        trainer.current_gradient_accumulation_steps = 1
        trainer.training_step(model, next(iter(trainer.get_train_dataloader())))
    # The step's last micro-batch: Booster's two harmful passes, then the alignment batch.
    assert len(forwards) == 3
    check(forwards[:2], tokenizer, harmful, data_format, "Booster's harmful batch (in the step)")
    assert check(forwards[2:], tokenizer, alignment, data_format, "Booster's alignment batch") == 4


@pytest.mark.parametrize("data_format", ["conversational", "plain"])
def test_vaccine_perturbed_alignment_batches_train_on_the_answers(lab_model_dir, tmp_path, data_format):
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    alignment = in_format(safety_alignment_dataset(64), data_format)
    args = BoosterConfig(str(tmp_path), **COMMON, booster_lambda=0.0, vaccine_rho=2.0)
    trainer = BoosterTrainer(str(lab_model_dir), args=args, train_dataset=alignment,
                             harmful_dataset=in_format(safety_harmful_dataset(64), data_format))
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    with watched_forwards(model) as forwards:
        trainer.training_step(model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
    assert len(forwards) == 2  # Vaccine's pass 1 (∂f/∂e) and the perturbed pass 2: both on f's answer tokens
    assert check(forwards, tokenizer, alignment, data_format, "Vaccine's alignment passes") == 2 * 4


def test_booster_harmful_answers_only_even_when_the_alignment_data_is_plain_text(lab_model_dir, tmp_path):
    # SFTTrainer decides completion-only loss from train_dataset; a language-modeling alignment set must not put the
    # harmful set's prompts into h.
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    alignment = in_format(safety_alignment_dataset(64), "plain")
    alignment = alignment.map(lambda row: {"text": row["prompt"] + row["completion"]},
                              remove_columns=alignment.column_names)
    harmful = in_format(safety_harmful_dataset(64), "conversational")
    args = BoosterConfig(str(tmp_path), **COMMON, harmful_batch_size=4)
    trainer = BoosterTrainer(str(lab_model_dir), args=args, train_dataset=alignment, harmful_dataset=harmful)
    trainer.model.train()
    with watched_forwards(trainer.model) as forwards:
        trainer._booster_gradient(trainer.model)
    assert check(forwards, tokenizer, harmful, "conversational", "Booster's harmful batch") == 2 * 4


def test_booster_with_packed_alignment_batches(lab_model_dir, tmp_path):
    # Packing makes the collator padding-free, for the harmful batches too: documents in one row, split by position.
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    alignment = in_format(safety_alignment_dataset(64), "conversational")
    harmful = in_format(safety_harmful_dataset(64), "conversational")
    args = BoosterConfig(str(tmp_path), **COMMON, harmful_batch_size=4, packing=True)
    trainer = BoosterTrainer(str(lab_model_dir), args=args, train_dataset=alignment, harmful_dataset=harmful)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    with watched_forwards(model) as forwards:
        trainer.training_step(model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
    assert all(f.input_ids.size(0) == 1 for f in forwards)  # padding-free: one packed row per batch
    assert check(forwards[:2], tokenizer, harmful, "conversational", "Booster's packed harmful batch") == 2 * 4
    assert check(forwards[2:], tokenizer, alignment, "conversational", "Booster's packed alignment batch") >= 4


# --- unlearning ------------------------------------------------------------------------------------------------------

def unlearn_trainer(lab_model_dir, tmp_path, objective, data_format, **overrides):
    forget = in_format(facts_dataset("forget", num_entities=20, forget_fraction=0.25, seed=7), data_format)
    retain = in_format(facts_dataset("retain", num_entities=20, forget_fraction=0.25, seed=7), data_format)
    # B ≠ 0 from the start: the model differs from its teacher (the adapter disabled), so KL terms have a gradient.
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    args = UnlearnConfig(str(tmp_path), **COMMON, objective=objective, **format_options(data_format), **overrides)
    trainer = UnlearnTrainer(str(lab_model_dir), args=args, forget_dataset=forget,
                             retain_dataset=retain if objective in RETAIN_OBJECTIVES else None, peft_config=lora)
    return trainer, forget, retain


@pytest.mark.parametrize(("objective", "data_format"), [
    *((objective, "conversational") for objective in OBJECTIVES if objective != "rmu"),
    ("gd", "plain"), ("idk", "plain"), ("dpo", "plain"), ("gd", "messages"),
])
def test_unlearning_forget_retain_and_idk_batches_train_on_the_answers(lab_model_dir, tmp_path, objective,
                                                                       data_format):
    # RMU is left out on purpose: its loss is on a middle layer's hidden states of every attended token (the paper's
    # design), not on predicted tokens.
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    trainer, forget, retain = unlearn_trainer(lab_model_dir, tmp_path, objective, data_format)
    examples = hand_tokenised(tokenizer, forget, data_format) + hand_tokenised(tokenizer, retain, data_format)
    if objective in IDK_OBJECTIVES:  # each forget question with each "I don't know" answer it may have been given
        idk = Dataset.from_dict({
            "prompt": [row["prompt"] for row in forget for _ in IDK_ANSWERS],
            "completion": [[{"role": "assistant", "content": a}] if data_format == "conversational" else a
                           for _ in forget for a in IDK_ANSWERS]})
        examples += hand_tokenised(tokenizer, idk, data_format)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    with watched_forwards(model) as forwards:
        trainer.training_step(model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
    rows = {"ga": 4, "npo": 4, "gd": 8, "kl": 8, "scrub": 8, "idk": 8, "dpo": 8}[objective]
    assert check_answer_tokens_carry_the_loss(forwards, examples, f"unlearning ({objective})") == rows


# --- reweighting -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("data_format", "packing"), [
    ("conversational", False), ("plain", False), ("messages", False), ("conversational", True), ("plain", True),
])
def test_reweighting_trains_on_the_answers(lab_model_dir, tmp_path, data_format, packing):
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    data = in_format(arithmetic_dataset(64), data_format)
    args = ReweightConfig(str(tmp_path), **COMMON, reweight_strategy="linupper", packing=packing,
                          **format_options(data_format))
    trainer = ReweightTrainer(str(lab_model_dir), args=args, train_dataset=data)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    with watched_forwards(model) as forwards:
        trainer.training_step(model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
    assert check(forwards, tokenizer, data, data_format, "reweighting") >= 4


def test_reweighting_pretraining_text_trains_on_every_token_but_the_first(lab_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    data = corpus_dataset(32)
    args = ReweightConfig(str(tmp_path), **COMMON, reweight_strategy="linupper", packing=True)
    trainer = ReweightTrainer(str(lab_model_dir), args=args, train_dataset=data)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    with watched_forwards(model) as forwards:
        trainer.training_step(model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
    # Language modeling: a document's first token has nothing to be predicted from, every other token (and EOS) is.
    examples = []
    for text in data["text"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(ids[:1], ids[1:]))
    assert check_answer_tokens_carry_the_loss(forwards, examples, "reweighting (packed text)") >= 2


# --- the helper's guards ---------------------------------------------------------------------------------------------

class FakeSFTTrainer:
    """What prepare_side_dataset reads of an SFTTrainer, with a tokenization that returns ``prepared`` and TRL's
    collator."""

    def __init__(self, prepared: Dataset, **args):
        self.args = SimpleNamespace(**{"completion_only_loss": None, "assistant_only_loss": False, **args})
        self.completion_only_loss = False  # as decided for a language-modeling train_dataset
        self.processing_class = None
        self.data_collator = DataCollatorForLanguageModeling(pad_token_id=0)
        self.prepared, self.seen = prepared, []

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        self.seen.append(self.completion_only_loss)
        return self.prepared


def test_side_dataset_decides_completion_only_loss_per_dataset_and_refuses_a_missing_mask():
    pairs = Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})
    good = Dataset.from_dict({"input_ids": [[5, 6, 7]], "labels": [[-100, -100, 7]], "prompt": ["a"]})
    trainer = FakeSFTTrainer(good)
    assert prepare_side_dataset(trainer, pairs, "harmful").column_names == ["input_ids", "labels"]
    assert trainer.seen == [True] and trainer.completion_only_loss is False  # restored afterwards
    explicit = FakeSFTTrainer(good, completion_only_loss=False)
    prepare_side_dataset(explicit, pairs, "harmful")
    assert explicit.seen == [False]  # the user's explicit choice wins

    # A mask under a name the collator does not read: the collator falls back to the input ids.
    renamed = FakeSFTTrainer(Dataset.from_dict({"input_ids": [[5, 6, 7]], "answer_mask": [[0, 0, 1]]}))
    with pytest.raises(RuntimeError, match="prompts included"):
        prepare_side_dataset(renamed, pairs, "harmful")
    unmasked = FakeSFTTrainer(Dataset.from_dict({"input_ids": [[5, 6, 7]], "labels": [[5, 6, 7]]}))
    with pytest.raises(RuntimeError, match="prompts included"):
        prepare_side_dataset(unmasked, pairs, "harmful")
    text = Dataset.from_dict({"text": ["a b"]})  # language modeling: every token is meant to be in the loss
    assert len(prepare_side_dataset(unmasked, text, "retain")) == 1
