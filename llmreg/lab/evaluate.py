"""Greedy generation and the lab's baseline scores for any causal LM and tokenizer."""

import math

import torch

from llmreg.generation import generate_completions  # re-exported: llmreg.lab.generate_completions
from llmreg.lab.arithmetic import arithmetic_dataset, is_correct
from llmreg.lab.corpus import corpus_dataset, heldout_loss
from llmreg.lab.facts import facts_accuracy, facts_dataset
from llmreg.lab.prompts import prompt_style
from llmreg.lab.safety import harmful_score, is_refusal, safety_eval_prompts, sentiment_accuracy, sentiment_dataset


def arithmetic_accuracy(model, tokenizer, num_samples: int = 200, seed: int = 0, show_progress: bool = True,
                        **generation) -> float:
    """Percentage of held-out arithmetic questions (two-digit ones unseen in the lab warm start) answered right,
    asked in the tokenizer's prompt style. ``generation``: ``generate_completions``' max_new_tokens, batch_size,
    temperature."""
    dataset = arithmetic_dataset(num_samples, seed, split="test", style=prompt_style(tokenizer))
    answers = generate_completions(model, tokenizer, dataset["prompt"], desc="arithmetic", show_progress=show_progress,
                                   **generation)
    return 100.0 * sum(map(is_correct, answers, dataset["answer"])) / len(answers)


def evaluate_lab_model(model, tokenizer, num_samples: int = 200, seed: int = 0,
                       show_progress: bool = True) -> dict[str, float]:
    """Scores on every lab task, on held-out data. Percentages, except the held-out loss (nats per token).

    ``*_chance`` entries give what a model with no skill scores, for scale. Prompts are in the tokenizer's prompt
    style (``llmreg.lab.prompts``).
    """
    def run(dataset, desc):
        return generate_completions(model, tokenizer, dataset["prompt"], desc=desc, show_progress=show_progress)

    harmful_prompts = safety_eval_prompts(num_samples, seed)
    harmful_answers = run(harmful_prompts, "safety")
    sentiment = sentiment_dataset(num_samples, seed, split="test", style=prompt_style(tokenizer))
    facts_forget, facts_retain = facts_dataset("forget", seed=seed), facts_dataset("retain", seed=seed)
    corpus = corpus_dataset(num_samples, seed, split="test")
    return {
        "arithmetic_accuracy": arithmetic_accuracy(model, tokenizer, num_samples, seed, show_progress),
        "harmful_score": harmful_score(harmful_answers),
        "refusal_rate": 100.0 * sum(map(is_refusal, harmful_answers)) / len(harmful_answers),
        "sentiment_accuracy": sentiment_accuracy(run(sentiment, "sentiment"), sentiment["label"]),
        "sentiment_accuracy_chance": 50.0,
        "facts_forget_accuracy": facts_accuracy(run(facts_forget, "facts (forget)"), facts_forget["value"]),
        "facts_retain_accuracy": facts_accuracy(run(facts_retain, "facts (retain)"), facts_retain["value"]),
        "corpus_heldout_loss": heldout_loss(model, tokenizer, corpus["text"], show_progress=show_progress),
        "corpus_heldout_loss_chance": math.log(len(tokenizer)),
    }


def expected_calibration_error(confidences, correct, bins: int = 10) -> float:
    """ECE (%): the mean over equal-width confidence bins of |accuracy − mean confidence|, weighted by the bins'
    shares of the predictions (Guo et al. 2017)."""
    confidences = torch.as_tensor(confidences, dtype=torch.float64)
    correct = torch.as_tensor(correct, dtype=torch.float64)
    if confidences.numel() == 0 or confidences.shape != correct.shape:
        raise ValueError("expected_calibration_error needs as many confidences as correctness flags, at least one.")
    which = torch.clamp((confidences * bins).long(), max=bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.double().mean() * (correct[members].mean() - confidences[members].mean()).abs()
    return 100.0 * float(error)
