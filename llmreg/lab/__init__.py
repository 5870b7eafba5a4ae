"""The lab: llmreg's offline tiny model and synthetic tasks with verifiable scorers.

Nothing here trains with a Trainer or imports one: recipes and tests ask the lab for a model path and datasets.

>>> from llmreg.lab import arithmetic_dataset, arithmetic_reward, ensure_lab_model
>>> model_dir = ensure_lab_model()            # builds once (about two minutes), then cached
>>> dataset = arithmetic_dataset(1000)        # TRL conversational prompt-completion + "answer"
"""

from llmreg.lab.arithmetic import (
    arithmetic_dataset,
    arithmetic_reward,
    extract_answer,
    is_correct,
    length_biased_arithmetic_reward,
)
from llmreg.lab.corpus import corpus_dataset, heldout_loss
from llmreg.lab.datasets import LAB_DATASETS, load_lab_dataset
from llmreg.lab.evaluate import (
    arithmetic_accuracy,
    evaluate_lab_model,
    expected_calibration_error,
    generate_completions,
)
from llmreg.lab.facts import fact_is_correct, facts_accuracy, facts_dataset, new_facts_dataset
from llmreg.lab.model import (
    LAB_MODEL_ID,
    build_lab_model,
    cache_dir,
    ensure_lab_model,
    is_lab_model,
    lab_model_dir,
    load_lab_model,
    read_lab_info,
    resolve_model_name_or_path,
)
from llmreg.lab.safety import (
    harmful_score,
    is_harmful,
    is_refusal,
    safety_alignment_dataset,
    safety_eval_prompts,
    safety_harmful_dataset,
    sentiment_accuracy,
    sentiment_dataset,
)


__all__ = [
    "LAB_DATASETS",
    "LAB_MODEL_ID",
    "arithmetic_accuracy",
    "arithmetic_dataset",
    "arithmetic_reward",
    "build_lab_model",
    "cache_dir",
    "corpus_dataset",
    "ensure_lab_model",
    "evaluate_lab_model",
    "expected_calibration_error",
    "extract_answer",
    "fact_is_correct",
    "facts_accuracy",
    "facts_dataset",
    "generate_completions",
    "harmful_score",
    "heldout_loss",
    "is_correct",
    "is_harmful",
    "is_lab_model",
    "is_refusal",
    "lab_model_dir",
    "length_biased_arithmetic_reward",
    "load_lab_dataset",
    "load_lab_model",
    "new_facts_dataset",
    "read_lab_info",
    "resolve_model_name_or_path",
    "safety_alignment_dataset",
    "safety_eval_prompts",
    "safety_harmful_dataset",
    "sentiment_accuracy",
    "sentiment_dataset",
]
