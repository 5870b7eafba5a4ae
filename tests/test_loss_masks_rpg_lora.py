"""The loss-mask audit for RPG and LoRA Dropout: exactly the answer tokens carry a loss.

RPG (TRL's GRPO batches, RPG's loss): the answer is a completion, scripted so that it is known, up to and including
its first EOS, or all of it when the generator stopped at ``max_completion_length``; never the prompt, the padding
between the left-padded prompts and the right-padded completions, or tokens after the EOS. The completions come
from a ``rollout_func`` (TRL takes them as they are) or from a scripted ``generate`` (TRL's own generation path, which
cuts every completion after its first EOS). The expectation is each scripted text tokenised by hand, apart from its
prompt rendered with the chat template, never TRL's masks.

LoRA Dropout (``with_lora_dropout(SFTTrainer)``): each of the N sampled forwards of a training step carries exactly
the answer tokens.

How the loss is read off the gradient: ``tests/loss_audit.py``.
"""

import re
from collections import Counter

import pytest
import torch
from helpers import format_options, hand_tokenised, in_format
from loss_audit import Example, check_answer_tokens_carry_the_loss, watched_forwards
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from llmreg.lab import arithmetic_dataset
from llmreg.lora_dropout import LoRADropoutConfig, with_lora_dropout
from llmreg.rpg import RPGConfig, RPGTrainer


pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:You are using 'rollout_func':UserWarning")]

MAX_COMPLETION_LENGTH = 24
NUM_GENERATIONS = 4
RPG_COMMON = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
                  max_steps=1, per_device_train_batch_size=2 * NUM_GENERATIONS, num_generations=NUM_GENERATIONS,
                  max_completion_length=MAX_COMPLETION_LENGTH, learning_rate=1e-2, logging_steps=1, seed=0)


# --- RPG: scripted completions ---------------------------------------------------------------------------------------

def scripted_completion(question: str, k: int, after_eos: bool) -> tuple[str, str]:
    """The k-th completion of a question's group, as texts: what the model writes before its EOS, and what it writes
    after it (only with ``after_eos``, for TRL's generation path, which cuts it). k = 2 runs past
    ``max_completion_length``: the generator stops it there, without an EOS."""
    head = f"{question} = {k}"
    return {0: (head, ""),
            1: (head + " so" * 4, ""),
            2: (head + " so" * (2 * MAX_COMPLETION_LENGTH), ""),
            3: (head + " so", "\n<|im_start|>user\nso so" if after_eos else "")}[k]


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def generated_ids(tokenizer, question: str, k: int, after_eos: bool) -> list[int]:
    """The token ids the generator emits: the text, EOS, what follows, at most ``max_completion_length`` of them."""
    before, after = scripted_completion(question, k, after_eos)
    ids = tokens(tokenizer, before) + [tokenizer.eos_token_id] + tokens(tokenizer, after)
    return ids[:MAX_COMPLETION_LENGTH]


def question_of(prompt: list[dict]) -> str:
    return prompt[-1]["content"].removeprefix("What is ").rstrip("?")


def scripted_rollout(prompts, trainer):
    """A ``rollout_func``: the k-th occurrence of a prompt (k = 0 … num_generations − 1) gets completion k."""
    tokenizer = trainer.processing_class
    seen = Counter()
    prompt_ids, completion_ids = [], []
    for prompt in prompts:
        k = seen[question_of(prompt)] % trainer.num_generations
        seen[question_of(prompt)] += 1
        prompt_ids.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"])
        completion_ids.append(generated_ids(tokenizer, question_of(prompt), k, after_eos=False))
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def scripted_generate(tokenizer):
    """A stand-in for ``model.generate`` (TRL's transformers path): left-padded prompts in, prompts + completions out,
    the finished rows right-padded. Completion 3 goes on after its EOS, as a generator stopping on another token
    would: TRL must cut it there."""
    seen = Counter()

    def generate(input_ids, attention_mask, generation_config, **kwargs):
        assert generation_config.max_new_tokens == MAX_COMPLETION_LENGTH
        rows = []
        for row, mask in zip(input_ids.tolist(), attention_mask.bool().tolist(), strict=True):
            text = tokenizer.decode([t for t, m in zip(row, mask, strict=True) if m])
            question = re.search(r"What is (.*)\?", text).group(1)
            k = seen[question] % NUM_GENERATIONS
            seen[question] += 1
            rows.append(generated_ids(tokenizer, question, k, after_eos=True))
        width = max(map(len, rows))
        completions = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in rows])
        return torch.cat([input_ids, completions.to(input_ids.device)], dim=1)

    return generate


REWARDS = {0: 0.0, 1: 1.0, 2: 2.0, 3: 4.0}  # group mean 1.75: no completion's advantage (reward − mean) is zero


def reward_by_k(completions, **kwargs):
    return [REWARDS[int(re.search(r"= (\d)", completion[0]["content"]).group(1))] for completion in completions]


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def expected_completions(tokenizer, dataset) -> list[Example]:
    """Every (prompt, completion k) the step may train on, tokenised by hand: the prompt rendered with the chat
    template and its generation prompt; the answer, the completion's text and EOS (what follows the EOS is not in the
    sequence), or its first ``max_completion_length`` tokens when it runs past them."""
    examples = []
    for row in dataset:
        prompt = tokens(tokenizer, tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                                  tokenize=False))
        for k in range(NUM_GENERATIONS):
            before, _ = scripted_completion(question_of(row["prompt"]), k, after_eos=False)
            examples.append(Example(prompt, (tokens(tokenizer, before) + [tokenizer.eos_token_id])
                                    [:MAX_COMPLETION_LENGTH]))
    return examples


def audited_rpg_step(trainer, tokenizer, dataset, what) -> dict:
    """The training steps of one generation (its micro-batches, without an optimizer step in between, so that no
    ratio leaves the clip range), watched: the generation and the losses. Returns the generation batch."""
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train() otherwise
    batch = next(iter(trainer.get_train_dataloader()))
    micro_batches = trainer.args.steps_per_generation
    with watched_forwards(model) as forwards:
        for _ in range(micro_batches):
            trainer.training_step(model, batch, None)
    inputs = {key: torch.cat([part[key] for part in trainer._buffered_inputs])
              for key in ("completion_ids", "completion_mask", "advantages")}
    rows = len(inputs["advantages"])
    assert rows == micro_batches * 2 * NUM_GENERATIONS
    assert check_answer_tokens_carry_the_loss(forwards, expected_completions(tokenizer, dataset), what) == rows
    # The batch holds the completions of every kind: cut at max_completion_length (no EOS), and (in TRL's generation
    # path) one that went on after its EOS; and they differ in length, so padding sits between them.
    lengths = inputs["completion_mask"].sum(dim=1).tolist()
    assert MAX_COMPLETION_LENGTH in lengths and len(set(lengths)) >= NUM_GENERATIONS
    ended = (inputs["completion_ids"] == tokenizer.eos_token_id).sum(dim=1)
    assert ended.max() == 1 and ended.sum() == rows // NUM_GENERATIONS * (NUM_GENERATIONS - 1)  # one EOS, or none
    return inputs


@pytest.mark.parametrize(("estimator", "source", "micro_batches"), [
    ("full", "rollout_func", 1), ("reinforce", "rollout_func", 1), ("full", "generate", 1),
    ("reinforce", "generate", 1), ("full", "rollout_func", 4),
])
def test_rpg_trains_on_the_completions_up_to_their_first_eos(lab_model_dir, tmp_path, monkeypatch, estimator,
                                                             source, micro_batches):
    """The old policy as reference. One micro-batch per generation (reused for a second iteration, which keeps the
    KL term alive), or RPG's default of 4 (the generation batch shuffled and split, padded to its longest row)."""
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    dataset = arithmetic_dataset(8)
    generation = {"steps_per_generation": 1, "num_iterations": 2} if micro_batches == 1 else {}
    args = RPGConfig(str(tmp_path), **RPG_COMMON, estimator=estimator, **generation)
    assert args.steps_per_generation == micro_batches
    trainer = RPGTrainer(str(lab_model_dir), reward_by_k, args=args, train_dataset=dataset,
                         rollout_func=scripted_rollout if source == "rollout_func" else None)
    if source == "generate":
        monkeypatch.setattr(trainer.model, "generate", scripted_generate(tokenizer))
    inputs = audited_rpg_step(trainer, tokenizer, dataset, f"RPG ({estimator}, {source}, {micro_batches})")
    # A zero advantage would give its completion a zero gradient, which the audit would read as no loss.
    assert (inputs["advantages"] != 0).all()


@pytest.mark.parametrize("policy", ["perturbed", "lora"])
@pytest.mark.parametrize("estimator", ["full", "reinforce"])
def test_rpg_fixed_reference_kl_term_trains_on_the_completions(lab_model_dir, tmp_path, estimator, policy):
    """The KL term alone: a constant reward (every advantage 0, so the reward term gives no gradient) and a policy
    off the reference. At the reference the KL term's gradient is 0 on every token, and the audit would see no loss
    at all, whatever its mask. Off it: the full model with its last layer perturbed (TRL's reference is a frozen copy
    of the model as loaded), or a LoRA adapter with B ≠ 0 (the reference is the model with the adapter disabled)."""
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    dataset = arithmetic_dataset(8)
    args = RPGConfig(str(tmp_path), **RPG_COMMON, estimator=estimator, reference="fixed", rpg_beta=0.5)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    trainer = RPGTrainer(str(lab_model_dir), constant_reward, args=args, train_dataset=dataset,
                         rollout_func=scripted_rollout, peft_config=lora if policy == "lora" else None)
    if policy == "perturbed":
        assert trainer.ref_model is not None
        with torch.no_grad():
            for parameter in trainer.model.model.layers[-1].parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    inputs = audited_rpg_step(trainer, tokenizer, dataset, f"RPG's KL to a fixed reference ({estimator}, {policy})")
    assert (inputs["advantages"] == 0).all()
    assert trainer._metrics["train"]["rpg/ufkl"][-1] > 1e-4  # the KL to the reference is alive


# --- LoRA Dropout ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("data_format", "packing"), [
    ("conversational", False), ("plain", False), ("messages", False), ("conversational", True),
])
def test_lora_dropout_samples_each_train_on_the_answers(lab_model_dir, tmp_path, data_format, packing):
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    dataset = in_format(arithmetic_dataset(16), data_format)
    samples = 2
    args = SFTConfig(str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none",
                     save_strategy="no", max_steps=1, per_device_train_batch_size=4, max_length=64, seed=0,
                     packing=packing, **format_options(data_format))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    trainer = with_lora_dropout(SFTTrainer)(
        str(lab_model_dir), args=args, train_dataset=dataset, peft_config=lora,
        lora_dropout=LoRADropoutConfig(lora_dropout_p=0.5, lora_dropout_train_samples=samples))
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    with watched_forwards(model) as forwards:
        trainer.training_step(model, next(iter(trainer.get_train_dataloader())))
    assert len(forwards) == samples  # one forward per mask draw, one backward through their mean
    assert trainer._metrics["train"]["lora_dropout/kept_fraction"][-1] < 0.9  # the masks dropped dims
    examples = hand_tokenised(tokenizer, dataset, data_format)
    what = f"LoRA Dropout ({data_format}{', packed' if packing else ''})"
    checked = check_answer_tokens_carry_the_loss(forwards, examples, what)
    if packing:  # padding-free: each forward one packed row, its documents told apart by their position ids
        assert all(forward.input_ids.size(0) == 1 for forward in forwards) and checked >= samples * 4
    else:
        assert checked == samples * 4
