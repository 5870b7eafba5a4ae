"""The loss-mask audit of the self-play trainers (RSPO, SPIN): exactly the answer tokens carry a loss.

Each test builds a trainer on the lab model, lets it build a batch with its own dataloader and collator, runs its loss
and backward, and reads off the gradient which tokens the loss reached (``tests/loss_audit.py``). The expectation is
each response tokenised by hand apart from its prompt, never the trainer's masks:

- a chat answer (prompt, chosen and rejected as chat messages) is its content and ChatML's end of turn
  ``<|im_end|>\\n``. TRL's DPO tokenisation puts the newline the template writes after ``<|im_end|>`` in the
  completion, as TRL's SFT completion mask does; the audit of the other trainers (``tests/test_loss_masks.py``) takes
  it as part of the answer too. ``<|im_end|>`` must be in the loss (the model learns to stop); the newline after it is
  never sampled (generation stops at ``<|im_end|>``), so training on it changes nothing at inference;
- a plain-string answer is followed by EOS (``<|im_end|>``), which TRL appends: the model learns to stop there too.

Covered: RSPO's chosen and rejected rows and the base-model samples of its ``forward_kl_samples`` regularizer, SPIN's
real and generated rows (α = 0 and α-SPIN, whose base log-probs are precomputed and take no gradient), in both
formats, and the pairs the self-play loop builds from its own generations. Besides the token sets, the order is
checked: the first half of a batch are the chosen rows, the second half the rejected rows of the same prompts, and the
base-sample batch is in the order of the pairs (the losses pair rows up by position).
"""

import json

import pytest
from datasets import Dataset, load_from_disk
from loss_audit import Example, check_answer_tokens_carry_the_loss, watched_forwards
from transformers import AutoTokenizer

from llmreg.lab import arithmetic_dataset
from llmreg.rspo import RSPOConfig, RSPOTrainer
from llmreg.selfplay import SelfPlayArguments, SelfPlayLoop
from llmreg.spin import SPINConfig, SPINTrainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
              max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, seed=0, max_length=256,
              beta=0.1)
FORMATS = ["conversational", "plain"]


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def preference_pairs(n: int, data_format: str) -> Dataset:
    """n pairs on distinct arithmetic prompts, with SPPO's win probabilities (≠ ½, so that the SPPO term has a
    gradient at init) and a base-model sample per prompt. Chosen: the right answer; rejected: a wrong one, of another
    length on odd rows (padding in the batch); base sample: the chosen answer on even rows, another text on odd ones.
    A plain answer starts with a space after the prompt's colon: no token straddles the boundary."""
    rows = {"prompt": [], "chosen": [], "rejected": [], "base_completion": [], "chosen_probs_win": [],
            "chosen_probs_lose": [], "chosen_probs": []}
    seen = set()
    for row in arithmetic_dataset(4 * n):
        question = row["prompt"][-1]["content"]
        if question in seen:
            continue
        seen.add(question)
        i = len(rows["prompt"])
        right = row["completion"][0]["content"]
        expression = right.rsplit("=", 1)[0]
        answers = (right, f"{expression}= {int(row['answer']) + 1}" if i % 2 == 0 else "I do not know",
                   right if i % 2 == 0 else f"The answer is {expression}")
        if data_format == "plain":
            rows["prompt"].append(f"Question: {question}\nAnswer:")
            answers = tuple(" " + text for text in answers)
        else:
            rows["prompt"].append(row["prompt"])
            answers = tuple(chat(text) for text in answers)
        for column, answer in zip(("chosen", "rejected", "base_completion"), answers):
            rows[column].append(answer)
        rows["chosen_probs_win"].append(0.6 + 0.3 * i / n)
        rows["chosen_probs_lose"].append(0.4 - 0.3 * i / n)
        rows["chosen_probs"].append(0.6 + 0.3 * i / n)
        if i + 1 == n:
            break
    return Dataset.from_dict(rows)


def hand_tokenised(tokenizer, prompt, answer) -> Example:
    """A response tokenised apart from its prompt: a chat answer ends with ``<|im_end|>\\n``, a plain one with EOS."""
    if isinstance(prompt, list):
        return Example.conversational(tokenizer, prompt, answer[-1]["content"])
    return Example.plain(tokenizer, prompt, answer)


def examples(tokenizer, dataset: Dataset, column: str) -> list[Example]:
    return [hand_tokenised(tokenizer, row["prompt"], row[column]) for row in dataset]


def check_pairs(forward, chosen: list[Example], rejected: list[Example], what: str) -> int:
    """One forward of a [chosen; rejected] batch: every row is one of the examples with exactly its answer in the loss,
    and row B + i is the rejected response of the prompt whose chosen response is row i."""
    checked = check_answer_tokens_carry_the_loss([forward], chosen + rejected, what)
    segments = forward.segments()
    assert checked == len(segments) and len(segments) % 2 == 0
    half = len(segments) // 2
    rejected_of = {tuple(c.ids): tuple(r.ids) for c, r in zip(chosen, rejected)}
    for (chosen_tokens, _), (rejected_tokens, _) in zip(segments[:half], segments[half:]):
        assert tuple(chosen_tokens) in rejected_of, f"{what}: a rejected response sits in the chosen half"
        assert rejected_of[tuple(chosen_tokens)] == tuple(rejected_tokens), (
            f"{what}: row i of the rejected half is not the rejected response of row i's prompt")
    return checked


def check_base_samples(pair_forward, sample_forward, chosen: list[Example], samples: list[Example], what: str) -> int:
    """The base-sample forward: every row is one of the samples with exactly its answer in the loss, in the order of
    the pairs (row i is the sample of row i's prompt)."""
    checked = check_answer_tokens_carry_the_loss([sample_forward], samples, what)
    sample_of = {tuple(c.ids): tuple(s.ids) for c, s in zip(chosen, samples)}
    pair_rows = pair_forward.segments()[:checked]
    for (chosen_tokens, _), (sample_tokens, _) in zip(pair_rows, sample_forward.segments()):
        assert sample_of[tuple(chosen_tokens)] == tuple(sample_tokens), (
            f"{what}: row i is not the base sample of row i's prompt")
    return checked


def one_step(trainer, use_training_step: bool = False):
    """A batch from the trainer's own dataloader and collator, then its loss and backward, watched."""
    model = trainer.model
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    with watched_forwards(model) as forwards:
        if use_training_step:
            trainer.current_gradient_accumulation_steps = 1
            trainer.training_step(model, batch)
        else:
            trainer.compute_loss(model, trainer._prepare_inputs(batch)).backward()
    return forwards


# --- RSPO ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data_format", FORMATS)
def test_rspo_pairs_and_base_samples_train_on_the_answers(lab_model_dir, tmp_path, data_format):
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    dataset = preference_pairs(4, data_format)
    # A live base model μ for reverse_kl: its forward runs in the loss, without a gradient.
    args = RSPOConfig(str(tmp_path), **COMMON, regularizers={"reverse_kl": 0.5, "forward_kl_samples": 0.1},
                      base_model_name_or_path=str(lab_model_dir), precompute_base_log_probs=False)
    trainer = RSPOTrainer(str(lab_model_dir), args=args, train_dataset=dataset)
    with watched_forwards(trainer.base_model) as base_forwards:
        forwards = one_step(trainer)
    assert len(forwards) == 2  # [chosen; rejected], then the base samples
    chosen, rejected = examples(tokenizer, dataset, "chosen"), examples(tokenizer, dataset, "rejected")
    assert check_pairs(forwards[0], chosen, rejected, "RSPO's chosen and rejected rows") == 2 * 4
    samples = examples(tokenizer, dataset, "base_completion")
    assert check_base_samples(forwards[0], forwards[1], chosen, samples, "RSPO's base samples") == 4
    assert len(base_forwards) == 1 and base_forwards[0].graded is None  # μ scores the pairs, takes no gradient


def test_rspo_base_samples_keep_their_own_prompt_boundary(lab_model_dir, tmp_path):
    """A plain prompt ending with a space: an answer starting with a letter merges with it (`` five`` is one
    pre-token, and the prompt's last token goes into the answer's first), one starting with a digit does not. Row 0's
    pair merges and its base sample does not; row 1 the other way round. Each sequence must still be its prompt + its
    own response, token for token, the boundary being where the tokenizer puts it for that response. (When the base
    samples reused the pair's ``prompt_ids``, row 0's sample lost the prompt's trailing space and row 1's had it
    twice.)"""
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    prompts = ["Question: What is 2 + 3?\nAnswer: ", "Question: What is 4 + 4?\nAnswer: "]
    dataset = Dataset.from_dict({
        "prompt": prompts, "chosen": ["five", "8"], "rejected": ["six", "9"], "base_completion": ["5", "eight"],
        "chosen_probs_win": [0.8, 0.7], "chosen_probs_lose": [0.3, 0.2]})

    def example(prompt, answer):
        if answer[0].isalpha():  # the space is the first character of the answer's first token
            return Example.plain(tokenizer, prompt.removesuffix(" "), " " + answer)
        return Example.plain(tokenizer, prompt, answer)

    args = RSPOConfig(str(tmp_path), **COMMON, regularizers={"forward_kl_samples": 0.1})
    trainer = RSPOTrainer(str(lab_model_dir), args=args, train_dataset=dataset)
    forwards = one_step(trainer)
    assert len(forwards) == 2
    chosen, rejected, samples = ([example(p, a) for p, a in zip(prompts, dataset[column])]
                                 for column in ("chosen", "rejected", "base_completion"))
    assert check_pairs(forwards[0], chosen, rejected, "RSPO's pairs") == 2 * 2
    assert check_base_samples(forwards[0], forwards[1], chosen, samples, "RSPO's base samples") == 2


# --- SPIN ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("data_format", "alpha"), [("conversational", 0.0), ("plain", 0.0), ("conversational", 0.5),
                                                    ("plain", 0.5)])
def test_spin_real_and_generated_rows_train_on_the_answers(lab_model_dir, tmp_path, data_format, alpha):
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    dataset = preference_pairs(4, data_format).select_columns(["prompt", "chosen", "rejected"])
    # α-SPIN: the base model's log-probs are precomputed columns; only the policy's forward is differentiated.
    base = {"base_model_name_or_path": str(lab_model_dir)} if alpha else {}
    args = SPINConfig(str(tmp_path), **COMMON, alpha=alpha, **base)
    trainer = SPINTrainer(str(lab_model_dir), args=args, train_dataset=dataset)
    if alpha:
        assert trainer.base_model is None and "base_chosen_logps" in trainer.train_dataset.column_names
    forwards = one_step(trainer, use_training_step=True)
    assert len(forwards) == 1
    real, generated = examples(tokenizer, dataset, "chosen"), examples(tokenizer, dataset, "rejected")
    assert check_pairs(forwards[0], real, generated, "SPIN's real and generated rows") == 2 * 4


# --- the self-play loop ----------------------------------------------------------------------------------------------

def read_samples(path) -> list[list[dict]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generated_example(tokenizer, prompt, sample: dict) -> Example:
    """What training on a generated chat response must mean: the prompt as generation saw it, then exactly the tokens
    the model generated (they end with ``<|im_end|>``) and the newline the template writes after it."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return Example(tokenizer(prompt_ids, add_special_tokens=False)["input_ids"],
                   sample["ids"] + tokenizer("\n", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("method", ["rspo", "spin"])
def test_selfplay_pairs_are_the_generated_answers_and_train_on_their_tokens(lab_model_dir, tmp_path, method):
    tokenizer = AutoTokenizer.from_pretrained(lab_model_dir)
    prompts = arithmetic_dataset(12)  # enough that some prompts' samples differ in reward (the others tie: no pair)
    if method == "rspo":
        args = RSPOConfig(str(tmp_path), **COMMON, regularizers={"forward_kl_samples": 0.1})
    else:
        args = SPINConfig(str(tmp_path), **COMMON)
    loop = SelfPlayLoop(method, SelfPlayArguments(iterations=1, num_samples=4, max_new_tokens=24,
                                                  generation_batch_size=12, num_eval_prompts=1),
                        args, str(lab_model_dir), prompts, arithmetic_dataset(1, split="test"))
    dataset = load_from_disk(str(loop._build_dataset(1, tmp_path / "iter_1.partial")))
    generations = read_samples(tmp_path / "iter_1.partial" / "generations.jsonl")
    # Prompts whose samples all tie give no pair: the kept rows are the others, in order.
    kept = [list(prompts["prompt"]).index(prompt) for prompt in dataset["prompt"]]
    assert kept == sorted(kept) and len(kept) >= 2
    for group in generations:
        for sample in group:
            # Finished samples (the audit's precondition), whose text tokenises back to the generated tokens.
            assert sample["ids"][-1] == tokenizer.eos_token_id
            assert tokenizer(sample["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] == (
                sample["ids"])

    # What the loop wrote: the generated texts, as the assistant's message, each from its own prompt's samples.
    def sample_of(row, column, group):
        texts = [sample["text"] for sample in group]
        assert row[column] == chat(row[column][0]["content"]) and row[column][0]["content"] in texts
        return group[texts.index(row[column][0]["content"])]

    chosen, rejected, samples = [], [], []
    base_samples = (read_samples(tmp_path / "base_samples" / "samples.jsonl") if method == "rspo" else None)
    for i, row in zip(kept, dataset):
        group = generations[i]
        if method == "rspo":
            chosen.append(generated_example(tokenizer, row["prompt"], sample_of(row, "chosen", group)))
            samples.append(generated_example(tokenizer, row["prompt"],
                                             sample_of(row, "base_completion", base_samples[i])))
        else:
            assert row["chosen"] == prompts[i]["completion"]  # the real answer
            chosen.append(hand_tokenised(tokenizer, row["prompt"], row["chosen"]))
        rejected.append(generated_example(tokenizer, row["prompt"], sample_of(row, "rejected", group)))

    if method == "rspo":
        # The judge ties on wrong answers (p = ½, a zero SPPO gradient at init, which the audit cannot see through):
        # other win probabilities, the masks do not depend on them.
        dataset = dataset.map(lambda row: {"chosen_probs_win": 0.8, "chosen_probs_lose": 0.3})
        trainer = RSPOTrainer(str(lab_model_dir), args=args, train_dataset=dataset, processing_class=loop.tokenizer)
    else:
        trainer = SPINTrainer(str(lab_model_dir), args=args, train_dataset=dataset, processing_class=loop.tokenizer)
    forwards = one_step(trainer)
    assert len(forwards) == (2 if method == "rspo" else 1)
    rows = min(len(kept), 4)  # one step of per_device_train_batch_size 4
    assert check_pairs(forwards[0], chosen, rejected, f"{method}: the loop's pairs") == 2 * rows
    if method == "rspo":
        assert check_base_samples(forwards[0], forwards[1], chosen, samples, "RSPO: the loop's base samples") == rows
