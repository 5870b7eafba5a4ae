"""Lab datasets by name, so recipes and configs can say ``dataset_name: llmreg/arithmetic``."""

from datasets import Dataset

from llmreg.lab.arithmetic import arithmetic_dataset
from llmreg.lab.corpus import corpus_dataset
from llmreg.lab.facts import facts_dataset, new_facts_dataset, world_facts_dataset
from llmreg.lab.prompts import check_style
from llmreg.lab.safety import safety_alignment_dataset, safety_harmful_dataset, sentiment_dataset


# Each builder takes (split, seed) and raises on a split it does not have: train/test, or forget/retain/all for facts
# (all, old, heldout for world facts).
LAB_DATASETS = {
    "llmreg/arithmetic": arithmetic_dataset,
    "llmreg/safety-alignment": safety_alignment_dataset,
    "llmreg/safety-harmful": safety_harmful_dataset,
    "llmreg/sentiment": sentiment_dataset,
    "llmreg/facts": facts_dataset,
    "llmreg/new-facts": new_facts_dataset,
    "llmreg/world-facts": world_facts_dataset,
    "llmreg/corpus": corpus_dataset,
}


# The datasets whose prompts depend on the prompt style (``llmreg.lab.prompts``); the others read the same in both.
STYLED_DATASETS = ("llmreg/arithmetic", "llmreg/sentiment")


def load_lab_dataset(name: str, split: str = "train", seed: int = 0, style: str = "lab") -> Dataset:
    """A lab dataset by name, with each builder's default size, its prompts in ``style`` ("lab" or "chat")."""
    if name not in LAB_DATASETS:
        raise ValueError(f"Unknown lab dataset {name!r}; valid names: {', '.join(LAB_DATASETS)}.")
    check_style(style)
    if name in STYLED_DATASETS:
        return LAB_DATASETS[name](split=split, seed=seed, style=style)
    return LAB_DATASETS[name](split=split, seed=seed)
