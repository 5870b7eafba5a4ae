"""Which tokens carry a loss, read off the gradient, and the answer tokens they must equal, tokenised by hand.

The audit does not ask a trainer which tokens it masks: it watches the model. ``watched_forwards(model)`` records
every forward of the model's decoder (its input ids, attention mask and position ids) and, through a tensor hook, the
gradient that reaches the final hidden states, the ones the LM head reads. Position t of a row carries a loss exactly
when the hidden state at t - 1 (which predicts token t) receives a nonzero gradient: cross-entropy with label -100 and
a mask multiplied by 0 both give an exact 0, and a token in the loss a nonzero one. Tensor hooks fire in
``loss.backward()`` and in ``torch.autograd.grad`` alike, so trainers that take gradients by hand (Booster) are
watched too.

The expectation is built without the code under test: ``Example.conversational`` renders the prompt with the
tokenizer's chat template (generation prompt included) and the answer as the template's assistant turn, text by
text, and tokenises each part on its own. A row of a batch must equal one example's prompt + answer token for token,
and its loss tokens must be exactly the answer's.
"""

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import PeftModel


@dataclass
class Forward:
    """One recorded forward: the inputs, and which positions' final hidden states got a nonzero gradient."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    graded: torch.Tensor = field(default=None)  # (B, T) bool, set by the gradient hook

    def segments(self) -> list[tuple[list[int], set[int]]]:
        """Each sequence of the batch as (its real token ids, the indices among them that carry a loss). A padded row
        is one sequence (its attended tokens, wherever the padding sits); a packed row (padding-free, position ids
        restarting at 0) is one sequence per document."""
        graded = self.graded if self.graded is not None else torch.zeros_like(self.input_ids, dtype=torch.bool)
        result = []
        for row in range(self.input_ids.size(0)):
            ids, grads = self.input_ids[row].tolist(), graded[row].tolist()
            keep = (self.attention_mask[row].bool().tolist() if self.attention_mask is not None
                    else [True] * len(ids))
            starts = [0]
            if self.position_ids is not None:
                positions = self.position_ids[row].tolist()
                starts = [t for t in range(len(ids)) if positions[t] == 0] or [0]
            bounds = [*starts, len(ids)]
            for start, end in itertools.pairwise(bounds):
                columns = [t for t in range(start, end) if keep[t]]
                tokens = [ids[t] for t in columns]
                # Token i of the sequence is in the loss when the hidden state before it got a gradient.
                loss = {i for i in range(1, len(columns)) if grads[columns[i - 1]]}
                if columns and grads[columns[-1]]:
                    loss.add(len(columns))  # the last hidden state predicts a token beyond the sequence: a bug too
                result.append((tokens, loss))
        return result


def _decoder_and_final_norm(model):
    while hasattr(model, "module"):  # DDP, DeepSpeed engines
        model = model.module
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    decoder = base.get_decoder()
    return decoder, decoder.norm


@contextmanager
def watched_forwards(model):
    """Inside, every forward of ``model`` is recorded as a ``Forward`` in the yielded list (in order)."""
    decoder, norm = _decoder_and_final_norm(model)
    forwards: list[Forward] = []

    def before_decoder(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        forwards.append(Forward(input_ids.detach().cpu(),
                                None if kwargs.get("attention_mask") is None
                                else kwargs["attention_mask"].detach().cpu(),
                                None if kwargs.get("position_ids") is None else kwargs["position_ids"].detach().cpu()))

    def after_norm(module, args, output):
        record = forwards[-1]
        if not output.requires_grad:
            return

        def on_gradient(grad):
            nonzero = (grad.detach() != 0).any(dim=-1).cpu()
            record.graded = nonzero if record.graded is None else record.graded | nonzero

        output.register_hook(on_gradient)

    handles = [decoder.register_forward_pre_hook(before_decoder, with_kwargs=True),
               norm.register_forward_hook(after_norm)]
    try:
        yield forwards
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Example:
    """A prompt and its answer, tokenised by hand: ``prompt_ids``, ``answer_ids`` and ``suffix_ids`` (tokens after the
    answer that are in the sequence but not in the loss) make the whole sequence."""

    prompt_ids: list[int]
    answer_ids: list[int]
    suffix_ids: list[int] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids + self.suffix_ids

    @classmethod
    def conversational(cls, tokenizer, prompt: list[dict], answer: str, end: str = "<|im_end|>\n",
                       suffix: str = "") -> "Example":
        """A chat prompt (rendered with the generation prompt) and the assistant's answer: its content and the
        template's end of turn ``end`` (ChatML: ``<|im_end|>`` and the newline after it), then ``suffix``."""
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)

        def tokens(string):
            return tokenizer(string, add_special_tokens=False)["input_ids"] if string else []

        return cls(tokens(text), tokens(answer + end), tokens(suffix))

    @classmethod
    def plain(cls, tokenizer, prompt: str, answer: str) -> "Example":
        """A plain-text prompt and answer, the answer followed by EOS (what TRL appends)."""
        return cls(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                   tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def check_answer_tokens_carry_the_loss(forwards: list[Forward], examples: list[Example], what: str) -> int:
    """Every sequence of every recorded forward that took part in a backward must be one of ``examples`` token for
    token, with exactly its answer tokens in the loss, and no padded position may get a gradient. Returns the number
    of sequences checked."""
    by_ids = {tuple(e.ids): e for e in examples}
    checked = 0
    for forward in forwards:
        if forward.graded is None:  # not differentiated (a reference or teacher forward)
            continue
        if forward.attention_mask is not None:  # segments() reads attended positions only: a pad's loss is here
            leaked = forward.graded & ~forward.attention_mask.bool()
            assert not leaked.any(), f"{what}: {int(leaked.sum())} padded positions got a gradient"
        for tokens, loss in forward.segments():
            example = by_ids.get(tuple(tokens))
            assert example is not None, (f"{what}: a sequence in the batch is none of the hand-tokenised examples "
                                         f"(first tokens {tokens[:12]}, {len(tokens)} tokens)")
            start = len(example.prompt_ids)
            expected = set(range(start, start + len(example.answer_ids)))
            assert loss == expected, (
                f"{what}: {len(loss)} tokens carry a loss where the answer has {len(expected)}; in the loss but "
                f"not the answer: {sorted(loss - expected)[:10]}, answer tokens left out: "
                f"{sorted(expected - loss)[:10]} (the prompt is tokens 0 to {start - 1})")
            checked += 1
    assert checked, f"{what}: no sequence took part in a backward"
    return checked
