"""llmreg.losses.kl.top_k_kl, the KL to a base given by its top-k log-probabilities: hand values on a 5-token
categorical, the exact vocabulary KL when k is the vocabulary, never above it otherwise, and the gradient's closed
form q − p̃ (p̃: the base's top-k probabilities, its rest mass spread over the other tokens as the model spreads
its own)."""

import math

import pytest
import torch

from llmreg.losses.kl import top_k_kl, vocab_kl


def test_hand_values_on_a_five_token_categorical():
    base = [0.5, 0.2, 0.15, 0.1, 0.05]
    model = [0.1, 0.3, 0.2, 0.25, 0.15]
    top = [0, 1]  # the base's two most likely tokens; the rest is {2, 3, 4}
    p = [base[0], base[1], sum(base[2:])]
    q = [model[0], model[1], sum(model[2:])]
    forward = sum(a * math.log(a / b) for a, b in zip(p, q))
    reverse = sum(b * math.log(b / a) for a, b in zip(p, q))
    logits = torch.tensor(model).log()[None, None]
    ids = torch.tensor(top)[None, None]
    base_logps = torch.tensor(base).log()[top][None, None]
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert top_k_kl(logits, ids, base_logps, mask, "forward").item() == pytest.approx(forward, rel=1e-5)
    assert top_k_kl(logits, ids, base_logps, mask, "reverse").item() == pytest.approx(reverse, rel=1e-5)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_the_whole_vocabulary_is_the_exact_kl_and_fewer_tokens_never_exceed_it(direction):
    generator = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(4, 6, vocab, generator=generator) * 2
    base_logits = torch.randn(4, 6, vocab, generator=generator) * 2
    mask = torch.rand(4, 6, generator=generator) > 0.3
    base_logps = base_logits.log_softmax(-1)
    exact = vocab_kl(base_logits, logits, mask) if direction == "forward" else vocab_kl(logits, base_logits, mask)
    for k in (1, 5, 20, vocab):
        values, ids = base_logps.topk(k, dim=-1)
        coarse = top_k_kl(logits, ids, values, mask, direction)
        if k == vocab:
            torch.testing.assert_close(coarse, exact, rtol=1e-5, atol=1e-6)
        else:
            assert 0 <= coarse.item() < exact.item()


def test_the_forward_gradient_is_q_minus_the_base_with_its_rest_spread_as_the_model_spreads_it():
    generator = torch.Generator().manual_seed(1)
    vocab, k = 12, 4
    logits = torch.randn(1, 1, vocab, generator=generator, dtype=torch.float64).requires_grad_(True)
    base_logps = torch.randn(1, 1, vocab, generator=generator, dtype=torch.float64).log_softmax(-1)
    values, ids = base_logps.topk(k, dim=-1)
    loss = top_k_kl(logits, ids, values, torch.ones(1, 1, dtype=torch.bool))
    (grad,) = torch.autograd.grad(loss, logits)
    q = logits.detach().softmax(-1)[0, 0]
    top = set(ids[0, 0].tolist())
    base_rest = 1 - values.exp().sum()
    model_rest = sum(q[v] for v in range(vocab) if v not in top)
    spread = torch.stack([base_logps[0, 0, v].exp() if v in top else base_rest * q[v] / model_rest
                          for v in range(vocab)])
    torch.testing.assert_close(grad[0, 0], q - spread, rtol=1e-5, atol=1e-7)  # the loss computes in float32
