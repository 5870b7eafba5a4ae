"""Scoring a model on TOFU-style question sets: the metrics of ``llmreg.unlearn.metrics`` computed with a model.

A question set has the columns of ``llmreg.lab.facts_dataset``: ``prompt`` (a conversation or a string), ``answer``
(the true answer), ``paraphrased_answer``, ``perturbed_answers`` (a list of wrong answers), and optionally ``value``
(the fact the greedy answer must state, for accuracy, judged by the caller's ``answer_is_correct(answer, value)``:
the unlearning recipe passes the lab's ``llmreg.lab.fact_is_correct``).
"""

from collections.abc import Callable

import torch

from llmreg.generation import generate_completions
from llmreg.scoring import span_token_logps
from llmreg.unlearn.metrics import (
    answer_probability,
    forget_quality,
    model_utility,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)


QUESTION_SET_COLUMNS = ("prompt", "answer", "paraphrased_answer", "perturbed_answers")


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"]


def _full_ids(tokenizer, prompt, answer: str) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    conversation = [*prompt, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]


def answer_token_logps(model, tokenizer, prompts: list, answers: list[str], batch_size: int = 64,
                       desc: str = "answer likelihoods", show_progress: bool = True):
    """Per-token log-probs of each answer given its prompt, and the answer-token mask: (N, T) each. The answer's
    tokens are those the chat template adds after the generation prompt (its end-of-turn token included)."""
    sequences, starts = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        prefix, full = _prompt_ids(tokenizer, prompt), _full_ids(tokenizer, prompt, answer)
        if full[:len(prefix)] != prefix:
            raise ValueError("The chat template does not render the prompt as a prefix of prompt + answer, so the "
                             "answer's tokens cannot be told apart.")
        sequences.append(full)
        starts.append(len(prefix))
    return span_token_logps(model, sequences, starts, tokenizer.pad_token_id, batch_size=batch_size, desc=desc,
                            show_progress=show_progress)


def answer_losses(model, tokenizer, prompts: list, answers: list[str], **kwargs) -> torch.Tensor:
    """Each answer's mean token NLL given its prompt: (N,)."""
    return -answer_probability(*answer_token_logps(model, tokenizer, prompts, answers, **kwargs)).log()


def score_question_set(model, tokenizer, dataset, forget: bool, name: str = "questions", show_progress: bool = True,
                       answer_is_correct: Callable[[str, str], bool] | None = None) -> dict:
    """ROUGE-L recall of the greedy answers, answer probability, truth-ratio score (the forget form when
    ``forget``), accuracy (%) when the set has ``value`` and ``answer_is_correct(greedy answer, value)`` is given,
    and the raw truth ratios (for forget quality)."""
    missing = [c for c in QUESTION_SET_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Question set {name!r} lacks the columns {missing}; it needs {list(QUESTION_SET_COLUMNS)} "
                         "(see llmreg.lab.facts_dataset).")
    prompts = list(dataset["prompt"])
    greedy = generate_completions(model, tokenizer, prompts, desc=f"{name}: answers", show_progress=show_progress)
    rouge = [rouge_l_recall(g, a) for g, a in zip(greedy, dataset["answer"], strict=True)]
    probability = answer_probability(*answer_token_logps(model, tokenizer, prompts, list(dataset["answer"]),
                                                         desc=f"{name}: likelihoods", show_progress=show_progress))
    paraphrased = answer_losses(model, tokenizer, prompts, list(dataset["paraphrased_answer"]),
                                show_progress=False)
    perturbed = dataset["perturbed_answers"]
    width = len(perturbed[0])
    if any(len(p) != width for p in perturbed):
        raise ValueError(f"Question set {name!r}: every row needs the same number of perturbed answers.")
    flat = answer_losses(model, tokenizer, [p for p in prompts for _ in range(width)],
                         [a for answers in perturbed for a in answers], show_progress=False)
    ratios = truth_ratio(paraphrased, flat.view(len(prompts), width))
    scores = {"rouge": sum(rouge) / len(rouge), "probability": float(probability.mean()),
              "truth_ratio": truth_ratio_score(ratios, forget=forget), "truth_ratios": ratios.tolist()}
    if "value" in dataset.column_names and answer_is_correct is not None:
        scores["accuracy"] = 100.0 * sum(map(answer_is_correct, greedy, dataset["value"])) / len(greedy)
    return scores


def evaluate_unlearning(model, tokenizer, forget, retain, world=None, gold_forget_ratios=None,
                        show_progress: bool = True,
                        answer_is_correct: Callable[[str, str], bool] | None = None) -> dict[str, float]:
    """The unlearning table's row: forget and retain (and world) scores, model utility (the harmonic mean of
    the retain and world ROUGE, probability and truth-ratio scores), and forget quality (the KS p-value against
    ``gold_forget_ratios``, the forget-set truth ratios of a model never trained on it) when given. Accuracies with
    ``answer_is_correct`` (see ``score_question_set``)."""
    sets = {"forget": forget, "retain": retain, **({"world": world} if world is not None else {})}
    scores = {name: score_question_set(model, tokenizer, data, forget=name == "forget", name=name,
                                       show_progress=show_progress, answer_is_correct=answer_is_correct)
              for name, data in sets.items()}
    row = {f"{name}_{key}": value for name, s in scores.items() for key, value in s.items() if key != "truth_ratios"}
    row["model_utility"] = model_utility([scores[name][key] for name in sets if name != "forget"
                                          for key in ("rouge", "probability", "truth_ratio")])
    row["forget_truth_ratios"] = scores["forget"]["truth_ratios"]
    if gold_forget_ratios is not None:
        row["forget_quality"] = forget_quality(scores["forget"]["truth_ratios"], gold_forget_ratios)
    return row
