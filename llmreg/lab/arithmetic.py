"""Arithmetic questions with integer answers: the lab task for RL and self-play.

Rows are TRL conversational prompt-completion examples plus an ``answer`` column, so the same dataset feeds SFT,
GRPO/RPG (``arithmetic_reward`` reads ``answer``) and self-play (prompts only).

Two-digit problems never overlap between splits: each is assigned to one split by a fixed hash of its operands, so
a model warm-started on the train split is scored on two-digit problems it has never seen. One-digit problems are the
addition table every learner memorizes, and belong to both splits.
"""

import random
import re

from datasets import Dataset

from llmreg.generation import completion_text  # re-exported: llmreg.lab.arithmetic.completion_text
from llmreg.lab.prompts import check_style


SPLITS = ("train", "test")
_NUMBER = re.compile(r"-?\d+")
# Where an answer names its result, most specific first: "the answer is 19", "12 + 7 = 19", "equals 19", "is 19".
_STATED_ANSWER = [re.compile(pattern, re.IGNORECASE) for pattern in (
    r"\banswer(?: to [^.]*?)? is:?\s*(?:actually\s+)?(-?\d+)", r"=\s*(-?\d+)", r"\bequals\s+(-?\d+)",
    r"\bis\s+(-?\d+)")]
# The "chat" style's few-shot prefix: two worked examples in the answer form the scorer reads.
CHAT_EXAMPLES = [("What is 12 + 5?", "12 + 5 = 17"), ("What is 9 - 4?", "9 - 4 = 5")]


def _in_split(a: int, op: str, b: int, split: str) -> bool:
    if a < 10 and b < 10:
        return True
    # A fixed, seed-independent partition of the two-digit problems: about 1 in 8 is a test problem.
    is_test = (a * 131 + b * 71 + ord(op)) % 8 == 0
    return is_test == (split == "test")


def _sample_problem(rng: random.Random) -> tuple[int, str, int]:
    # A mix of difficulties leaves the warm-started model headroom: one-digit problems are easy for it, two-digit
    # problems with carries are hard.
    op = rng.choice("+-")
    high = 9 if rng.random() < 0.5 else 99
    a, b = rng.randint(0, high), rng.randint(0, high)
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b


def arithmetic_problems(num_samples: int, seed: int = 0, split: str = "train") -> list[tuple[int, str, int]]:
    """Deterministic list of ``(a, op, b)`` problems of one split."""
    if split not in SPLITS:
        raise ValueError(f"Unknown arithmetic split {split!r}; valid splits: {', '.join(SPLITS)}.")
    rng = random.Random(f"arithmetic-{seed}-{split}")
    problems = []
    while len(problems) < num_samples:
        problem = _sample_problem(rng)
        if _in_split(*problem, split):
            problems.append(problem)
    return problems


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def arithmetic_dataset(num_samples: int = 2000, seed: int = 0, split: str = "train", style: str = "lab") -> Dataset:
    """Conversational prompt-completion rows: ``prompt``, ``completion`` and the integer ``answer`` as a string.

    ``style="chat"`` puts two worked examples before each question (see ``llmreg.lab.prompts``).
    """
    check_style(style)
    prefix = []
    if style == "chat":
        for question, answer in CHAT_EXAMPLES:
            prefix += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    rows = {"prompt": [], "completion": [], "answer": []}
    for a, op, b in arithmetic_problems(num_samples, seed, split):
        result = _solve(a, op, b)
        rows["prompt"].append([*prefix, {"role": "user", "content": f"What is {a} {op} {b}?"}])
        rows["completion"].append([{"role": "assistant", "content": f"{a} {op} {b} = {result}"}])
        rows["answer"].append(str(result))
    return Dataset.from_dict(rows)


def extract_answer(text: str) -> int | None:
    """The integer an answer states as its result, or None when there is none.

    The first of "answer is N", "= N", "equals N", "is N" that occurs (in that order of preference) names the result,
    so "The answer is 6, but 3 + 3 also works" reads 6 and "12 + 7 = 19" reads 19; with none of them, the last
    integer in the text ("19.").
    """
    for pattern in _STATED_ANSWER:
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    numbers = _NUMBER.findall(text)
    return int(numbers[-1]) if numbers else None


def is_correct(text: str, answer: str | int) -> bool:
    return extract_answer(text) == int(answer)


def arithmetic_reward(completions, answer, **kwargs) -> list[float]:
    """Correctness reward in TRL's reward-function signature: 1.0 if the stated result (``extract_answer``) equals
    ``answer``, else 0.0."""
    return [float(is_correct(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]


# Per word of the response, up to LENGTH_BIAS_CAP words: a judge that also likes long answers, as reward models do.
LENGTH_BIAS_PER_WORD = 0.02
LENGTH_BIAS_CAP = 50


def length_biased_arithmetic_reward(completions, answer, **kwargs) -> list[float]:
    """``arithmetic_reward`` plus 0.02 per word of the response (at most 50 words, so at most +1): a judge with
    something to over-optimise. Between two answers equally right, the longer one wins; a 50-word wrong answer ties a
    bare right one. Self-play against it can raise its win rate by growing the responses, which the rule judge
    (``arithmetic_reward``) then shows as no gain, or a loss, in accuracy."""
    return [correct + LENGTH_BIAS_PER_WORD * min(len(completion_text(c).split()), LENGTH_BIAS_CAP)
            for c, correct in zip(completions, arithmetic_reward(completions, answer), strict=True)]
