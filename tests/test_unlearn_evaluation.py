"""Scoring models on question sets (llmreg/unlearn/evaluation.py) and the unlearning recipe: answer tokens found
exactly, losses and truth ratios against one-row forwards by hand, utility and forget quality assembled right, and
the recipe's stages (original and gold fine-tunes, unlearning, table) under DeepSpeed ZeRO-3 with LoRA."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmreg.lab import fact_is_correct, new_facts_dataset
from llmreg.unlearn.evaluation import answer_losses, answer_token_logps, evaluate_unlearning, score_question_set
from llmreg.unlearn.metrics import forget_quality, model_utility


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lab(lab_model_dir):
    return AutoModelForCausalLM.from_pretrained(lab_model_dir).eval(), AutoTokenizer.from_pretrained(lab_model_dir)


def hand_loss(model, tokenizer, prompt, answer) -> float:
    """Mean NLL of the answer's tokens (those after the generation prompt), from one unpadded forward."""
    prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=True,
                                         return_dict=True)["input_ids"]
    with torch.no_grad():
        logps = model(torch.tensor([full])).logits[0].log_softmax(-1)
    return -sum(logps[t - 1, full[t]].item() for t in range(len(prefix), len(full))) / (len(full) - len(prefix))


def test_answer_tokens_and_losses_match_one_row_forwards(lab):
    model, tokenizer = lab
    data = new_facts_dataset("forget").select(range(6))
    prompts, answers = list(data["prompt"]), list(data["answer"])
    answers[1] = answers[1] + " And some more words than the others."  # rows of different lengths: padding
    _, mask = answer_token_logps(model, tokenizer, prompts, answers, batch_size=4, show_progress=False)
    content = tokenizer(answers[0], add_special_tokens=False)["input_ids"]
    assert mask[0].sum() > len(content)  # the answer's words plus its end of turn
    losses = answer_losses(model, tokenizer, prompts, answers, batch_size=4, show_progress=False)
    for i in range(len(prompts)):
        assert losses[i].item() == pytest.approx(hand_loss(model, tokenizer, prompts[i], answers[i]), rel=1e-4)


def test_question_set_scores_by_hand(lab):
    model, tokenizer = lab
    data = new_facts_dataset("forget").select(range(4))
    scores = score_question_set(model, tokenizer, data, forget=True, show_progress=False,
                                answer_is_correct=fact_is_correct)
    for i, row in enumerate(data):
        paraphrased = hand_loss(model, tokenizer, row["prompt"], row["paraphrased_answer"])
        perturbed = [hand_loss(model, tokenizer, row["prompt"], a) for a in row["perturbed_answers"]]
        assert scores["truth_ratios"][i] == pytest.approx(math.exp(sum(perturbed) / 3 - paraphrased), rel=1e-3)
    ratios = torch.tensor(scores["truth_ratios"])
    assert scores["truth_ratio"] == pytest.approx(torch.minimum(ratios, 1 / ratios).mean().item())
    expected_probability = sum(math.exp(-hand_loss(model, tokenizer, r["prompt"], r["answer"])) for r in data) / 4
    assert scores["probability"] == pytest.approx(expected_probability, rel=1e-4)
    assert 0 <= scores["rouge"] <= 1 and 0 <= scores["accuracy"] <= 100
    assert "accuracy" not in score_question_set(model, tokenizer, data, forget=True, show_progress=False)  # no judge
    with pytest.raises(ValueError, match="lacks the columns \\['paraphrased_answer'"):
        score_question_set(model, tokenizer, data.remove_columns("paraphrased_answer"), forget=True)


def test_utility_and_forget_quality_are_assembled_from_the_set_scores(lab):
    model, tokenizer = lab
    forget, retain = new_facts_dataset("forget").select(range(4)), new_facts_dataset("retain").select(range(4))
    world = new_facts_dataset("retain").select(range(4, 8))
    row = evaluate_unlearning(model, tokenizer, forget, retain, world, show_progress=False)
    assert "forget_quality" not in row
    parts = [row[f"{s}_{k}"] for s in ("retain", "world") for k in ("rouge", "probability", "truth_ratio")]
    assert row["model_utility"] == pytest.approx(model_utility(parts))
    again = evaluate_unlearning(model, tokenizer, forget, retain, gold_forget_ratios=row["forget_truth_ratios"],
                                show_progress=False)
    assert again["forget_quality"] == pytest.approx(1.0)  # the same distribution as the "gold" one
    shifted = [r * 100 for r in row["forget_truth_ratios"]]
    assert forget_quality(row["forget_truth_ratios"], shifted) < 0.05
