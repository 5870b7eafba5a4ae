"""Span log-probs (llmreg/scoring.py) and left-padded generation (llmreg/generation.py) on tiny random causal LMs:
every batched, padded value against one unpadded row computed by hand, greedy batches against one prompt at a time,
and the caller's random state and tokenizer left as they were."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from llmreg.generation import (
    completion_text,
    generate_completions,
    generate_left_padded,
    templated_prompt,
    trim_completion,
)
from llmreg.scoring import (
    right_pad,
    selective_log_softmax,
    span_logps,
    span_mask,
    span_token_logps,
    token_logps,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64
PAD = 0


def tiny_lm(vocab_size: int = VOCAB, seed: int = 0) -> Qwen2ForCausalLM:
    """A random one-layer Qwen2, its weights large enough that its next-token distributions are far from uniform (a
    position off by one or a padded key attended to would show)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5,
                         pad_token_id=PAD, eos_token_id=2, bos_token_id=None, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


@pytest.fixture(scope="module")
def rows():
    """Sequences of different lengths (padding in every batch) and where each one's scored span starts."""
    generator = torch.Generator().manual_seed(1)
    lengths, starts = [5, 12, 3, 9, 7, 16, 2], [2, 7, 1, 4, 6, 3, 1]
    sequences = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    return sequences, starts


def by_hand(model, sequence: list[int], start: int) -> list[float]:
    """log p(token t | tokens < t) for t = start … len − 1, from one unpadded forward, one row at a time."""
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([sequence])).logits[0].float().log_softmax(-1)
    return [logps[t - 1, sequence[t]].item() for t in range(start, len(sequence))]


def test_right_pad_and_span_mask_by_hand():
    input_ids, attention_mask = right_pad([[5, 6, 7], [8], [9, 10]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert input_ids.dtype == attention_mask.dtype == torch.long
    # Column t predicts token t + 1: tokens [start, end) are columns start − 1 … end − 2.
    assert span_mask([1, 2, 3, 0], [4, 4, 3, 2], 5).tolist() == [
        [True, True, True, False], [False, True, True, False], [False, False, False, False],
        [True, False, False, False]]  # an empty span; a span from token 0 counts from token 1


def test_selective_log_softmax_is_the_log_softmax_at_the_targets_and_keeps_gradients():
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 6, 3], [2, 2, 5]])
    values = selective_log_softmax(logits, index)
    expected = torch.stack([torch.stack([logits[b, t].float().log_softmax(-1)[index[b, t]] for t in range(3)])
                            for b in range(2)])
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    values.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_token_logps_of_a_padded_batch_are_each_row_by_hand(model, rows):
    sequences, _ = rows
    input_ids, attention_mask = right_pad(sequences, PAD)
    with torch.no_grad():
        logps = token_logps(model, input_ids, attention_mask)
    assert logps.shape == (len(sequences), input_ids.shape[1] - 1) and logps.dtype == torch.float32
    for row, sequence in enumerate(sequences):
        torch.testing.assert_close(logps[row, :len(sequence) - 1], torch.tensor(by_hand(model, sequence, 1)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 64])
def test_span_logps_are_the_sums_of_one_row_forwards_whatever_the_batch(model, rows, batch_size):
    sequences, starts = rows
    values = span_logps(model, sequences, starts, PAD, batch_size=batch_size, show_progress=False)
    expected = [sum(by_hand(model, s, start)) for s, start in zip(sequences, starts, strict=True)]
    torch.testing.assert_close(torch.tensor(values), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # Nothing but the row itself decides its value: not the batch size, not the padding a longer row brings.
    alone = [span_logps(model, [s], [start], PAD, show_progress=False)[0] for s, start in zip(sequences, starts)]
    torch.testing.assert_close(torch.tensor(values), torch.tensor(alone), rtol=1e-5, atol=1e-5)


def test_right_padding_changes_no_row(model, rows):
    sequences, starts = rows
    short, long = sequences[2], sequences[5]
    assert len(long) > len(short)
    alone = span_logps(model, [short], [starts[2]], PAD, show_progress=False)
    padded = span_logps(model, [short, long], [starts[2], starts[5]], PAD, show_progress=False)
    other_pad = span_logps(model, [short, long], [starts[2], starts[5]], VOCAB - 1, show_progress=False)
    torch.testing.assert_close(torch.tensor([padded[0], other_pad[0]]), torch.tensor(alone * 2), rtol=1e-5,
                               atol=1e-5)


def test_span_token_logps_hold_each_span_token_and_sum_to_span_logps(model, rows):
    sequences, starts = rows
    logps, mask = span_token_logps(model, sequences, starts, PAD, batch_size=3, show_progress=False)
    width = max(map(len, sequences)) - 1
    assert logps.shape == mask.shape == (len(sequences), width) and mask.dtype == torch.bool
    for row, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
        assert mask[row].tolist() == [start - 1 <= t < len(sequence) - 1 for t in range(width)]
        torch.testing.assert_close(logps[row][mask[row]], torch.tensor(by_hand(model, sequence, start)), rtol=1e-5,
                                   atol=1e-5)
    sums = span_logps(model, sequences, starts, PAD, batch_size=3, show_progress=False)
    torch.testing.assert_close((logps * mask).sum(-1), torch.tensor(sums), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="2 sequences but 1 span starts"):
        span_logps(model, sequences[:2], starts[:1], PAD, show_progress=False)


# --- generation ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat():
    """A tiny random LM with the lab's tokenizer (trained here on a few lines, ChatML template, EOS <|im_end|>)."""
    from llmreg.lab.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([f"What is {a} + {b}? It is {a + b}." for a in range(20) for b in range(20)],
                                vocab_size=300)
    return tiny_lm(len(tokenizer), seed=3), tokenizer


PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}],
           [{"role": "user", "content": "What is 12 + 17? It is"}],
           [{"role": "system", "content": "Answer."}, {"role": "user", "content": "What is 1?"}],
           "What is",
           [{"role": "user", "content": "It"}]]


def test_left_padded_greedy_batches_equal_one_prompt_at_a_time(chat):
    model, tokenizer = chat
    batched = generate_left_padded(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=5, show_progress=False)
    for prompt, group in zip(PROMPTS, batched, strict=True):
        alone = generate_left_padded(model, tokenizer, [prompt], max_new_tokens=8, show_progress=False)
        assert group == alone[0] and len(group) == 1
        assert group[0]["text"] == tokenizer.decode(group[0]["ids"], skip_special_tokens=True)
    assert generate_completions(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2,
                                show_progress=False) == [group[0]["text"] for group in batched]
    # A conversation is continued from its chat template with the generation prompt, a string as it is.
    rendered = templated_prompt(tokenizer, PROMPTS[0])
    assert rendered.endswith("<|im_start|>assistant\n") and templated_prompt(tokenizer, "What is") == "What is"
    assert generate_left_padded(model, tokenizer, [rendered], max_new_tokens=8, show_progress=False)[0] == batched[0]
    assert tokenizer.padding_side == "right"  # restored


def test_sampling_is_seeded_and_leaves_the_callers_random_state(chat):
    model, tokenizer = chat
    kwargs = {"max_new_tokens": 6, "num_samples": 3, "temperature": 1.0, "batch_size": 2, "show_progress": False}
    for seed_each_batch in (False, True):
        torch.manual_seed(123)
        state = torch.random.get_rng_state()
        first = generate_left_padded(model, tokenizer, PROMPTS, seed=5, seed_each_batch=seed_each_batch, **kwargs)
        assert torch.equal(torch.random.get_rng_state(), state)
        torch.manual_seed(456)  # another state before: the same samples
        assert generate_left_padded(model, tokenizer, PROMPTS, seed=5, seed_each_batch=seed_each_batch,
                                    **kwargs) == first
        assert generate_left_padded(model, tokenizer, PROMPTS, seed=6, seed_each_batch=seed_each_batch,
                                    **kwargs) != first
        assert [len(group) for group in first] == [3] * len(PROMPTS)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    assert generate_completions(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0.7, seed=1,
                                show_progress=False) == generate_completions(
        model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0.7, seed=1, show_progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate_completions(model, tokenizer, PROMPTS, temperature=-1.0)


def test_the_tokenizer_padding_side_is_restored_when_generation_fails(chat, monkeypatch):
    model, tokenizer = chat

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", fail)
    state = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_left_padded(model, tokenizer, PROMPTS, max_new_tokens=4, temperature=1.0, show_progress=False)
    assert tokenizer.padding_side == "right" and torch.equal(torch.random.get_rng_state(), state)


def test_completions_are_trimmed_after_the_first_eos_and_their_text_read_in_either_format():
    eos, pad = 2, 3
    assert trim_completion([5, 6, eos, pad, pad], eos, pad) == [5, 6, eos]
    assert trim_completion([5, eos, 7, eos], eos, pad) == [5, eos]
    assert trim_completion([5, 6, pad, pad], eos, pad) == [5, 6]  # no EOS: trailing padding dropped
    assert trim_completion([5, eos, eos], eos, eos) == [5, eos]  # padding with EOS itself
    assert completion_text("It is 7.") == "It is 7."
    assert completion_text([{"role": "assistant", "content": "It is "}, {"role": "assistant", "content": "7."}]) == (
        "It is 7.")
