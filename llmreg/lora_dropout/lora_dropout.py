"""LoRA Dropout (Lin et al. 2024, arXiv 2404.09610): drop whole input dimensions of LoRA's A and output dimensions of
its B, average the loss over N masks, and ensemble N masks at test time.

For a LoRA layer h = W0·x + s·B·A·x (B ∈ R^{n1×r}, A ∈ R^{r×n2}, s = lora_alpha/r), one dropout instance draws
m_A ~ Bern(1−p)^{n2} and m_B ~ Bern(1−p)^{n1} and computes (paper Eq. 3)

    ĥ = W0·x + s·(m_B ⊙ B)·(A·(m_A ⊙ x))      i.e.  Â = A·diag(m_A),  B̂ = diag(m_B)·B.

The rank dimension is never dropped. An entry of ΔW = B̂Â is zero with probability 2p − p², and E[ΔW] = (1−p)²·BA
(no 1/(1−p) rescaling, as in the paper: the masks stay on at test time). PEFT's own ``lora_dropout`` is element-wise
dropout of the input activations, a different thing; the two can be combined.

The masks are applied by PEFT's ``lora_A`` (to its input) and ``lora_B`` (to its output) modules, whose class is
swapped for a masking subclass of nn.Linear (same parameters, same state dict), so any PEFT LoRA model and any Trainer
get them. They are drawn afresh at every forward of a module in training mode, or in eval mode
inside ``ensemble()``; by default one mask per forward is shared by every example and token of the batch
(``per_example=True`` draws one per example). In eval mode outside ``ensemble()``, or inside ``expected_adapter()``,
both sides are scaled by 1 − p: one deterministic pass of the expected update (1−p)²·BA, which is also what
``merge_and_unload`` bakes in.
"""

import json
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from llmreg.losses.selfplay import sequence_logps
from llmreg.scoring import right_pad, span_mask, token_logps


CONFIG_NAME = "lora_dropout_config.json"


@dataclass
class LoRADropoutConfig:
    """LoRA Dropout's settings. See the module docstring for the math."""

    lora_dropout_p: float = field(
        default=0.0, metadata={"help": "p, the rate of dropped input dims of A and output dims of B (0: off)."}
    )
    lora_dropout_train_samples: int = field(
        default=1, metadata={"help": "N, dropout instances whose losses are averaged in each training forward."}
    )
    lora_dropout_eval_samples: int = field(
        default=0,
        metadata={"help": "Masks averaged at evaluation (the test-time ensemble); 0 evaluates the expected adapter, "
                          "(1−p)²·BA, in one pass."},
    )
    lora_dropout_per_example: bool = field(
        default=False, metadata={"help": "One mask per example instead of one per batch."}
    )

    def __post_init__(self):
        if not 0.0 <= self.lora_dropout_p < 1.0:
            raise ValueError(f"lora_dropout_p is a rate in [0, 1), got {self.lora_dropout_p}.")
        if self.lora_dropout_train_samples < 1 or self.lora_dropout_eval_samples < 0:
            raise ValueError("lora_dropout_train_samples must be >= 1 and lora_dropout_eval_samples >= 0, got "
                             f"{self.lora_dropout_train_samples} and {self.lora_dropout_eval_samples}.")

    def save(self, directory: str | Path) -> None:
        (Path(directory) / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "LoRADropoutConfig":
        return cls(**json.loads((Path(directory) / CONFIG_NAME).read_text()))


def lora_layers(model) -> list[LoraLayer]:
    """The PEFT LoRA layers of ``model``; an error naming the problem when there are none or they are not Linear."""
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise ValueError("LoRA Dropout acts on a LoRA adapter, and this model has none: pass a peft_config (LoRA) to "
                         "the trainer (--use_peft in the recipes), or wrap the model with peft.get_peft_model.")
    for layer in layers:
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                raise ValueError(f"LoRA Dropout supports LoRA on Linear layers; {type(layer).__name__} has no lora_A "
                                 f"for adapter {name!r} (embedding or convolution LoRA).")
            if layer.use_dora.get(name, False):
                raise ValueError("LoRA Dropout does not support DoRA (use_dora=True): DoRA's output is not B·A·x.")
    return layers


class _MaskedLoRALinear(torch.nn.Linear):
    """A LoRA ``lora_A`` (masks its input) or ``lora_B`` (masks its output). The nn.Linear's class is swapped in place,
    so its parameters and state dict do not change; ``LoRADropout.remove()`` swaps it back. A subclass rather than a
    hook, because on small models the hooks' dispatch was a tenth of a training step."""

    def forward(self, x):
        dropout, masks_input = self._lora_dropout, self._lora_dropout_masks_input
        if masks_input:
            return torch.nn.functional.linear(x * dropout._mask(self, x), self.weight, self.bias)
        out = torch.nn.functional.linear(x, self.weight, self.bias)
        return out * dropout._mask(self, out)


class LoRADropout:
    """The masks on a model's LoRA layers (``attach_lora_dropout``); ``remove()`` detaches them."""

    def __init__(self, model, config: LoRADropoutConfig):
        self.model = model
        self.config = config
        self.ensemble_active = False  # masks on in eval mode too (inside ensemble())
        self.expected_active = False  # masks off in training mode too (inside expected_adapter())
        self._recorded: list[torch.Tensor] | None = None  # the masks drawn inside recorded_masks()
        self.layers = lora_layers(model)
        self._modules = []
        for layer in self.layers:
            for name in layer.active_adapters:
                for module, masks_input in ((layer.lora_A[name], True), (layer.lora_B[name], False)):
                    if type(module) is not torch.nn.Linear:
                        raise ValueError(f"LoRA Dropout expects LoRA factors as torch.nn.Linear, got "
                                         f"{type(module).__name__}.")
                    module.__class__ = _MaskedLoRALinear
                    module._lora_dropout, module._lora_dropout_masks_input = self, masks_input
                    self._modules.append(module)
        self._refused = {}
        if isinstance(model, PeftModel):  # a plain merge would bake in BA, not its expectation (1−p)²·BA
            for method in ("merge_and_unload", "merge_adapter"):
                self._refused[method] = model.__dict__.get(method)
                setattr(model, method, self._refuse_merge)

    def _mask(self, module, reference: torch.Tensor) -> torch.Tensor | float:
        """In training (or inside ensemble()), a Bernoulli(1 − p) keep-mask over the last dimension of ``reference``,
        shared across the batch or one per example; otherwise the keep probability 1 − p itself, so that one
        deterministic pass computes the expected update (1−p)²·B·A. Each call draws from torch's generator, so
        activation checkpointing, which replays the generator, recomputes the same masks."""
        keep = 1.0 - self.config.lora_dropout_p
        if keep == 1.0 or self.expected_active or not (module.training or self.ensemble_active):
            return keep
        shape = [1] * (reference.dim() - 1) + [reference.shape[-1]]
        if self.config.lora_dropout_per_example and reference.dim() > 1:
            shape[0] = reference.shape[0]
        mask = torch.empty(shape, dtype=reference.dtype, device=reference.device).bernoulli_(keep)
        if self._recorded is not None:
            self._recorded.append(mask)
        return mask

    def _refuse_merge(self, *args, **kwargs):
        raise RuntimeError("This LoRA adapter trains with LoRA Dropout: merging B·A would not give the model it "
                           "learned, whose expected update is (1−p)²·B·A. Use llmreg.lora_dropout.merge_and_unload "
                           "(expectation scaling), or detach LoRA Dropout first (remove()) to merge plainly.")

    @contextmanager
    def ensemble(self):
        """Inside the block, the model in eval mode keeps drawing masks (each forward one instance)."""
        previous, self.ensemble_active = self.ensemble_active, True
        try:
            yield
        finally:
            self.ensemble_active = previous

    @contextmanager
    def expected_adapter(self):
        """Inside the block, the model in training mode too computes the expected adapter (1−p)²·BA, drawing no
        masks: the deterministic policy the adapter stands for, as in eval mode."""
        previous, self.expected_active = self.expected_active, True
        try:
            yield
        finally:
            self.expected_active = previous

    @contextmanager
    def recorded_masks(self):
        """Inside the block, the masks drawn are also appended to the list it yields (for the kept fraction)."""
        previous, self._recorded = self._recorded, []
        try:
            yield self._recorded
        finally:
            self._recorded = previous

    def remove(self) -> None:
        for module in self._modules:
            module.__class__ = torch.nn.Linear
            for name in ("_lora_dropout", "_lora_dropout_masks_input"):
                delattr(module, name)
        self._modules = []
        for method, original in self._refused.items():
            if original is None:
                delattr(self.model, method)
            else:
                setattr(self.model, method, original)
        self._refused = {}


def attach_lora_dropout(model, config: LoRADropoutConfig) -> LoRADropout:
    """Put LoRA Dropout's masks on every active LoRA adapter of ``model`` (a PEFT model)."""
    return LoRADropout(model, config)


def ensemble_forward(model, dropout: LoRADropout, num_samples: int, **inputs):
    """The test-time ensemble (paper §4.3): the model's outputs with logits = log of the mean over ``num_samples``
    masks of the softmax (probabilities are averaged, not logits), and, with ``labels``, the causal LM loss of those
    averaged probabilities. No cache: each mask instance would need its own."""
    labels = inputs.pop("labels", None)
    inputs["use_cache"] = False
    with dropout.ensemble():
        log_probs = [model(**inputs).logits.float().log_softmax(-1) for _ in range(num_samples)]
    mixed = torch.logsumexp(torch.stack(log_probs), dim=0) - torch.log(torch.tensor(float(num_samples)))
    loss = None
    if labels is not None:
        loss = torch.nn.functional.nll_loss(mixed[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return mixed, loss


@torch.no_grad()
def choice_probabilities(model, tokenizer, prompts: list, choices: list[str], dropout: LoRADropout | None = None,
                         num_samples: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Classification by a language model: P(choice | prompt) over ``choices`` (answer texts) for each conversational
    prompt, from the log-likelihood of each answer, normalized over the choices. With ``num_samples`` > 0 and LoRA
    Dropout, the test-time ensemble: the mean of those probabilities over ``num_samples`` masks (one per forward,
    shared by the batch's rows); otherwise one pass of the model as it is (in eval mode, the expected adapter)."""
    model.eval()
    rows = []  # (prompt index, choice index, token ids, prompt length)
    for i, prompt in enumerate(prompts):
        prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(choices):
            text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": choice}], tokenize=False)
            rows.append((i, j, tokenizer(text, add_special_tokens=False)["input_ids"], len(prefix_ids)))
    draws = max(num_samples, 1)
    scores = torch.zeros(draws, len(prompts), len(choices), dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = right_pad([row_ids for _, _, row_ids, _ in chunk], tokenizer.pad_token_id)
        answer = span_mask([prefix_length for *_, prefix_length in chunk], [len(r[2]) for r in chunk], ids.shape[1])
        ids, answer, mask = ids.to(model.device), answer.to(model.device), mask.to(model.device)
        for draw in range(draws):
            with dropout.ensemble() if num_samples > 0 else nullcontext():
                logps = token_logps(model, ids, mask, use_cache=False)
            totals = sequence_logps(logps, answer).double().cpu()
            for k, (i, j, _, _) in enumerate(chunk):
                scores[draw, i, j] = totals[k]
    return scores.softmax(-1).mean(0).float()


@torch.no_grad()
def ensemble_generate(model, dropout: LoRADropout, num_samples: int, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *, max_new_tokens: int, eos_token_id: int,
                      pad_token_id: int, do_sample: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """Generate with the test-time ensemble: at every step the next-token distribution is the mean over
    ``num_samples`` masks (each from the full sequence, without a cache: N full forwards per token). Prompts are
    left-padded; returns prompt and completion ids, finished rows padded with ``pad_token_id``."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        log_probs, _ = ensemble_forward(model, dropout, num_samples, input_ids=input_ids,
                                        attention_mask=attention_mask, position_ids=position_ids)
        next_log_probs = log_probs[:, -1]
        if do_sample:
            tokens = torch.multinomial((next_log_probs / temperature).softmax(-1), 1).squeeze(-1)
        else:
            tokens = next_log_probs.argmax(-1)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=-1)
        finished |= tokens == eos_token_id
        if finished.all():
            break
    return input_ids


@torch.no_grad()
def merge_and_unload(model: PeftModel, dropout: LoRADropout):
    """Merge the adapter at its expectation, W0 + (1−p)²·s·B·A, detach LoRA Dropout, and return the base model."""
    keep = (1.0 - dropout.config.lora_dropout_p) ** 2
    for layer in dropout.layers:
        for name in layer.active_adapters:
            layer.lora_B[name].weight.mul_(keep)
    dropout.remove()
    return model.merge_and_unload()
