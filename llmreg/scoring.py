"""Log-probs of token spans under a causal LM: right-pad, forward, log-softmax, take each next token's, mask, sum.

Pure torch and a model forward (no Trainer, no accelerate, nothing of the lab), shared by the evaluations that score
text under a model: self-play's completion log-probs (``llmreg.selfplay.generation.completion_logps``), the unlearning
answer likelihoods (``llmreg.unlearn.evaluation.answer_token_logps``) and LoRA Dropout's choice probabilities
(``llmreg.lora_dropout.choice_probabilities``).

Positions: ``token_logps`` has one column fewer than its input, column t holding log p(token t + 1 | tokens ≤ t), so
a span [start, end) of a sequence's tokens is the columns start − 1 … end − 2 (``span_mask``). Rows are right-padded:
every row's positions start at 0, so padding changes no row's values.
"""

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from llmreg.losses.selfplay import sequence_logps


def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as (N, T) ``input_ids`` (right-padded with ``pad_token_id``) and ``attention_mask``, where T is
    the longest sequence's length."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, :len(sequence)] = 1
    return input_ids, attention_mask


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., index] in float32: (..., V), (...) → (...). Differentiable; a target that is not a
    token id (a label of -100) must be replaced by one before, and masked after."""
    return logits.float().log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """log p(token t + 1 | tokens ≤ t) of every row for t = 0 … T − 2: (N, T) → (N, T − 1), float32, on the model's
    device (gradients flow when enabled). ``forward_kwargs`` go to the model's forward (e.g. ``use_cache=False``)."""
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    return selective_log_softmax(logits[:, :-1], input_ids[:, 1:])


def span_mask(starts: list[int], ends: list[int], length: int) -> torch.Tensor:
    """The columns of an (N, ``length`` − 1) ``token_logps`` that predict the tokens [start, end) of each row: a
    bool (N, length − 1) mask, True at columns start − 1 … end − 2. Nothing predicts a sequence's first token: a span
    from token 0 counts from token 1."""
    columns = torch.arange(length - 1)[None]
    starts, ends = torch.tensor(starts)[:, None], torch.tensor(ends)[:, None]
    return (columns >= starts - 1) & (columns < ends - 1)


def _batches(model, sequences: list[list[int]], starts: list[int], pad_token_id: int, batch_size: int, desc: str,
             show_progress: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first row, ``token_logps`` of the batch's rows right-padded to the batch's longest, their span masks) per
    batch of ``batch_size`` rows, the span of each row running from its start to its end."""
    if len(starts) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} span starts.")
    model.eval()
    for first in tqdm(range(0, len(sequences), batch_size), desc=desc, disable=not show_progress):
        chunk = sequences[first:first + batch_size]
        input_ids, attention_mask = right_pad(chunk, pad_token_id)
        mask = span_mask(starts[first:first + batch_size], [len(s) for s in chunk], input_ids.shape[1])
        yield first, token_logps(model, input_ids, attention_mask), mask


@torch.no_grad()
def span_logps(model, sequences: list[list[int]], starts: list[int], pad_token_id: int, *, batch_size: int = 32,
               desc: str = "scoring", show_progress: bool = True) -> list[float]:
    """Σ log p(y_k | y_<k) over each sequence's tokens from ``starts[i]`` to its end (a completion after its
    prompt), in batches of ``batch_size`` right-padded rows (eval mode, no gradients)."""
    values = []
    for _, logps, mask in _batches(model, sequences, starts, pad_token_id, batch_size, desc, show_progress):
        values.extend(sequence_logps(logps, mask.to(logps.device)).tolist())
    return values


@torch.no_grad()
def span_token_logps(model, sequences: list[list[int]], starts: list[int], pad_token_id: int, *,
                     batch_size: int = 32, desc: str = "scoring",
                     show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token form of ``span_logps``: ``token_logps`` of every sequence and the mask of its span's columns,
    (N, T − 1) each on the CPU, T the longest sequence's length (columns past a batch's longest row: 0, masked)."""
    length = max(map(len, sequences))
    all_logps = torch.zeros(len(sequences), length - 1)
    all_masks = torch.zeros(len(sequences), length - 1, dtype=torch.bool)
    for first, logps, mask in _batches(model, sequences, starts, pad_token_id, batch_size, desc, show_progress):
        rows, width = logps.shape
        all_logps[first:first + rows, :width] = logps.cpu()
        all_masks[first:first + rows, :width] = mask
    return all_logps, all_masks
