"""The loss-mask audit: for every trainer and every batch it trains on, exactly the answer tokens carry a loss.

Each test builds a trainer on the lab model, lets it build its batches the way training does and run its loss, and
reads off the gradient which tokens the loss reached (``tests/loss_audit.py``). The expectation is each example's
answer, tokenised by hand apart from its prompt, never the trainer's own masks. Formats: TRL's prompt-completion with
chat messages, plain-text prompt-completion, and ``messages`` with ``assistant_only_loss``; packing where the trainer
allows it.
"""

import pytest
from datasets import Dataset
from loss_audit import Example, check_answer_tokens_carry_the_loss, watched_forwards
from transformers import AutoTokenizer

from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.lab import safety_alignment_dataset, safety_harmful_dataset


pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
              max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, seed=0, max_length=256)
FORMATS = ["conversational", "plain", "messages"]


def in_format(dataset: Dataset, data_format: str) -> Dataset:
    """A lab dataset (chat prompt → chat answer) in ``data_format``."""
    if data_format == "conversational":
        return dataset.select_columns(["prompt", "completion"])
    if data_format == "plain":  # the answer starts with a space after a colon: no token straddles the boundary
        return dataset.map(lambda row: {"prompt": f"Question: {row['prompt'][-1]['content']}\nAnswer:",
                                        "completion": " " + row["completion"][0]["content"]},
                           remove_columns=dataset.column_names)
    return dataset.map(lambda row: {"messages": row["prompt"] + row["completion"]},
                       remove_columns=dataset.column_names)


def hand_tokenised(tokenizer, dataset: Dataset, data_format: str) -> list[Example]:
    """Each row's prompt and answer tokenised apart: the answer tokens are what must carry the loss. A chat answer is
    its content and ChatML's end of turn: with ``assistant_only_loss`` the template's generation markers end it at
    ``<|im_end|>`` (the newline after it is in the sequence, outside the loss); a completion's mask also takes that
    newline. A plain answer ends with EOS."""
    if data_format == "plain":
        return [Example.plain(tokenizer, row["prompt"], row["completion"]) for row in dataset]
    if data_format == "messages":
        return [Example.conversational(tokenizer, row["messages"][:-1], row["messages"][-1]["content"],
                                       end="<|im_end|>", suffix="\n") for row in dataset]
    return [Example.conversational(tokenizer, row["prompt"], row["completion"][0]["content"]) for row in dataset]


def format_options(data_format: str) -> dict:
    return {"assistant_only_loss": True} if data_format == "messages" else {}


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
