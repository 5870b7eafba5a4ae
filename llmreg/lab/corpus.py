"""A pretraining-style text corpus of informative, redundant and noisy samples: the lab task for reweighting.

- informative: sentences drawn from a small grammar about a fictitious world; varied and learnable;
- redundant: near-duplicates of a handful of sentences (one word changed), the cheap-to-fit samples that loss-based
  reweighting should down-weight;
- noisy: random characters and shuffled word salad, which no model can fit.

The train split mixes the three kinds (column ``kind`` tells which); the test split holds only fresh informative
text. The scorer is the held-out loss: mean next-token negative log-likelihood on the test split.
"""

import math
import random
import string

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from llmreg.lab.facts import CITIES


KINDS = ("informative", "redundant", "noisy")
_ADJECTIVES = ["old", "young", "quiet", "clever", "brave", "tiny", "giant", "sleepy", "curious", "proud"]
_CREATURES = ["fox", "heron", "miller", "otter", "merchant", "owl", "farmer", "badger", "scribe", "goat"]
_VERBS = ["carried", "found", "painted", "sold", "buried", "repaired", "counted", "guarded", "traded", "lost"]
_OBJECTS = ["a lantern", "three coins", "a map", "the bell", "a basket of pears", "an iron key", "two ropes",
            "the old boat", "a letter", "seven stones"]
_PLACES = ["near the river", "behind the mill", "at the market", "under the bridge", "in the tower", "by the harbor",
           "on the hill", "inside the barn"]
_TIMES = ["at dawn", "in winter", "after the rain", "on market day", "before noon", "at night"]
_REDUNDANT_BASE = [
    "The weather in Marport is mild and the people are friendly.",
    "Buy fresh bread every morning at the corner bakery.",
    "The council meets on the first day of every month.",
    "Click here to read more stories like this one.",
    "All rights reserved by the Velden printing house.",
]


def _informative(rng: random.Random) -> str:
    first = (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_CREATURES)} from {rng.choice(CITIES)} "
             f"{rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)} {rng.choice(_TIMES)}.")
    second = f"Then the {rng.choice(_CREATURES)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
    return f"{first} {second}"


def _redundant(rng: random.Random) -> str:
    words = rng.choice(_REDUNDANT_BASE).split()
    position = rng.randrange(len(words))
    if rng.random() < 0.5:
        words[position] = rng.choice(_ADJECTIVES)
    return " ".join(words)


def _noisy(rng: random.Random) -> str:
    if rng.random() < 0.5:
        alphabet = string.ascii_letters + string.digits + string.punctuation + "  "
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(40, 90)))
    words = _informative(rng).split()
    rng.shuffle(words)
    return " ".join(words)


def corpus_dataset(num_samples: int = 2000, seed: int = 0, split: str = "train",
                   mix: tuple[float, float, float] = (0.6, 0.25, 0.15)) -> Dataset:
    """Language-modeling rows (``text``, ``kind``). ``mix`` gives the informative/redundant/noisy shares of train."""
    if split not in ("train", "test"):
        raise ValueError(f"Unknown corpus split {split!r}; valid splits: train, test.")
    if len(mix) != 3 or any(share < 0 for share in mix) or not math.isclose(sum(mix), 1.0):
        raise ValueError(f"mix must be 3 non-negative shares (informative, redundant, noisy) summing to 1, got {mix}.")
    rng = random.Random(f"corpus-{seed}-{split}")
    make = {"informative": _informative, "redundant": _redundant, "noisy": _noisy}
    rows = {"text": [], "kind": []}
    for _ in range(num_samples):
        kind = "informative" if split == "test" else rng.choices(KINDS, weights=mix)[0]
        rows["text"].append(make[kind](rng))
        rows["kind"].append(kind)
    return Dataset.from_dict(rows)


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], batch_size: int = 32, show_progress: bool = True) -> float:
    """Mean next-token negative log-likelihood (nats per token) of ``model`` on ``texts``. Lower is better."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(texts), batch_size), desc="held-out loss", disable=not show_progress):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += (targets != -100).sum().item()
    return total_nll / total_tokens
