"""Judges: who decides which of K responses to a prompt is better. Every judge gives preference matrices.

``judge.preferences(prompts, groups, rows)`` takes N prompts, N groups of K completions (text) and the dataset
columns of the N rows (e.g. ``answer``), and returns P of shape (N, K, K) with P[n, i, j] = P(y_i ≻ y_j | x_n),
P + Pᵀ = 1 and ½ on the diagonal. SPPO's win probability against the group is then p_i = mean_j P_ij
(``llmreg.losses.selfplay.win_probabilities`` for score judges).

- ``RewardFunctionJudge``: any reward function in TRL's signature ``f(prompts, completions, **columns)``, e.g. the
  lab's rule scorer ``llmreg.lab.arithmetic_reward``; Bradley–Terry P_ij = σ((s_i − s_j)/τ).
- ``RewardModelJudge``: any sequence-classification checkpoint (a reward model, PairRM-style scorers exported as one),
  scoring prompt + completion with the chat template; Bradley–Terry on its first logit.
- ``PairwiseJudge``: a function ``f(prompt, a, b) -> P(a ≻ b)``, called once per unordered pair.

Score judges also give absolute scores (``scores``), which the loop reports (e.g. the lab's accuracy).
"""

import itertools

import torch
from tqdm.auto import tqdm

from llmreg.judging import PreferenceJudge, parse_judge_spec
from llmreg.trainer_utils import import_object


# The spec kinds (``KIND:TARGET``) and what their target is.
JUDGE_KINDS = {"reward_func": "module.function", "reward_model": "PATH_OR_ID", "pairwise": "module.function"}


def bradley_terry(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, K) scores → (N, K, K) with P_ij = σ((s_i − s_j)/τ)."""
    return torch.sigmoid((scores.unsqueeze(-1) - scores.unsqueeze(-2)) / temperature)


class RewardFunctionJudge:
    """Bradley–Terry preferences from a TRL-style reward function (rule-based scorers, verifiers)."""

    def __init__(self, reward_function, temperature: float = 1.0):
        self.reward_function = reward_function
        self.temperature = temperature

    def scores(self, prompts: list, groups: list[list[str]], rows: dict[str, list]) -> torch.Tensor:
        num_samples = len(groups[0])
        flat_prompts = [p for p in prompts for _ in range(num_samples)]
        flat_completions = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
                            for p, group in zip(prompts, groups) for c in group]
        columns = {key: [v for v in values for _ in range(num_samples)] for key, values in rows.items()}
        columns.pop("prompt", None)
        rewards = self.reward_function(prompts=flat_prompts, completions=flat_completions, **columns)
        return torch.tensor(rewards, dtype=torch.float64).view(len(groups), num_samples)

    def preferences(self, prompts: list, groups: list[list[str]], rows: dict[str, list]) -> torch.Tensor:
        return bradley_terry(self.scores(prompts, groups, rows), self.temperature)


class RewardModelJudge:
    """Bradley–Terry preferences from a sequence-classification reward model (first logit = score)."""

    def __init__(self, model_name_or_path: str, batch_size: int = 16, temperature: float = 1.0):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path).eval()
        if torch.accelerator.is_available():
            self.model.to(torch.accelerator.current_accelerator())
        self.batch_size = batch_size
        self.temperature = temperature

    def _text(self, prompt, completion: str) -> str:
        if isinstance(prompt, list):  # conversational
            return self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                                      tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def scores(self, prompts: list, groups: list[list[str]], rows: dict[str, list]) -> torch.Tensor:
        texts = [self._text(p, c) for p, group in zip(prompts, groups) for c in group]
        scores = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="judging (reward model)"):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True).to(self.model.device)
            scores.append(self.model(**batch).logits[:, 0].double().cpu())
        return torch.cat(scores).view(len(groups), len(groups[0]))

    def preferences(self, prompts: list, groups: list[list[str]], rows: dict[str, list]) -> torch.Tensor:
        return bradley_terry(self.scores(prompts, groups, rows), self.temperature)


class PairwiseJudge:
    """Preferences from a function ``f(prompt, a, b) -> P(a ≻ b)`` (an LLM judge, PairRM, a rule)."""

    def __init__(self, compare):
        self.compare = compare

    scores = None  # a pairwise judge has no absolute scores

    def preferences(self, prompts: list, groups: list[list[str]], rows: dict[str, list]) -> torch.Tensor:
        num_samples = len(groups[0])
        matrix = torch.full((len(groups), num_samples, num_samples), 0.5, dtype=torch.float64)
        for n, (prompt, group) in enumerate(tqdm(list(zip(prompts, groups)), desc="judging (pairwise)")):
            for i, j in itertools.combinations(range(num_samples), 2):
                probability = float(self.compare(prompt, group[i], group[j]))
                if not 0.0 <= probability <= 1.0:
                    raise ValueError(f"The pairwise judge returned {probability}, not a probability in [0, 1].")
                matrix[n, i, j], matrix[n, j, i] = probability, 1.0 - probability
        return matrix


def make_judge(spec: str, temperature: float = 1.0) -> PreferenceJudge:
    """A judge from ``"reward_func:module.function"``, ``"reward_model:PATH_OR_ID"`` or ``"pairwise:module.fn"``
    (the grammar of ``llmreg.judging``)."""
    kind, target = parse_judge_spec(spec, JUDGE_KINDS)
    if kind == "reward_func":
        return RewardFunctionJudge(import_object(target), temperature)
    if kind == "reward_model":
        return RewardModelJudge(target, temperature=temperature)
    return PairwiseJudge(import_object(target))


def pair_from_preferences(matrix: torch.Tensor) -> dict[str, list]:
    """SPPO's pair per prompt: winner = argmax p, loser = argmin p, with p_w, p_l and P(w ≻ l).

    ``matrix`` is (N, K, K); p = the row means (``win_probabilities`` for Bradley–Terry judges). Ties go to the lowest
    index, so the result is deterministic. ``tied`` marks the prompts whose K responses all have the same p: argmax
    and argmin are then the same response, a pair with nothing to learn (the SPPO loss is exactly 0), to be dropped.
    """
    p = matrix.mean(dim=-1)
    winner, loser = p.argmax(dim=-1), p.argmin(dim=-1)
    rows = torch.arange(matrix.shape[0])
    return {"winner": winner.tolist(), "loser": loser.tolist(), "chosen_probs_win": p[rows, winner].tolist(),
            "chosen_probs_lose": p[rows, loser].tolist(), "chosen_probs": matrix[rows, winner, loser].tolist(),
            "tied": (p[rows, winner] == p[rows, loser]).tolist()}


__all__ = ["PairwiseJudge", "RewardFunctionJudge", "RewardModelJudge", "bradley_terry", "make_judge",
           "pair_from_preferences"]
