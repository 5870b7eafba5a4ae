"""Helpers that several test modules share (a test module never imports another)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from datasets import Dataset
from loss_audit import Example
from peft import LoraConfig
from trl import SFTConfig

from llmreg.lab import arithmetic_dataset
from llmreg.rspo import RSPOConfig


# --- one SGD step of an SFT-style trainer on the lab model (the regularizer mixins' tests) ---------------------------

SGD_STEP = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
                logging_steps=1, seed=0, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
                learning_rate=0.05, max_length=64)


def sgd_config(tmp_path, **overrides) -> SFTConfig:
    """Plain SGD at a constant rate, no clipping: an update is the learning rate times the step's gradient."""
    return SFTConfig(**{"output_dir": str(tmp_path), "max_steps": 1, "per_device_train_batch_size": 8, **SGD_STEP,
                        **overrides})


def small_lora(random_b=True) -> LoraConfig:
    # A random B (init_lora_weights=False) moves the model off the base at once, so ΔW ≠ 0 from the first step.
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=not random_b)


def step_gradients(trainer, inputs=None) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients after one ``training_step`` from zero, on ``inputs`` (default: the first
    training batch)."""
    if inputs is None:
        inputs = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop
    trainer.model.zero_grad(set_to_none=True)
    trainer.training_step(trainer.model, inputs)
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


# --- launching recipes -----------------------------------------------------------------------------------------------

REPO = Path(__file__).parents[1]


# A rare abort of one CPU rank at interpreter exit, after its work is done and saved: a C++ thread still joinable when
# the process ends (seen in about 1 of 10 CI runs, under DeepSpeed over gloo; never reproduced in isolation, 6 of 6
# clean reruns). Making every rank wait before trainer.end() did not cure it. Only that signature is retried, once.
EXIT_ABORT = "terminate called without an active exception"


def launch(accelerate_config: str, script: Path, *args: str) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO / "accelerate_configs" / accelerate_config), str(script), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0 and EXIT_ABORT in result.stderr:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


# The recipe runs in a child process that SIGKILLs itself right after the Trainer saved checkpoint KILL_AT (a kill
# between two steps, deterministic; a kill in the middle of a save is tests/test_stages.py's truncated checkpoint).
KILLER = textwrap.dedent("""
    import os, runpy, signal, sys
    from transformers.trainer_callback import CallbackHandler

    kill_at, recipe, *args = sys.argv[1:]
    saved = CallbackHandler.on_save

    def on_save(self, args_, state, control):
        control = saved(self, args_, state, control)
        if state.global_step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return control

    CallbackHandler.on_save = on_save
    sys.argv = [recipe, *args]
    runpy.run_path(recipe, run_name="__main__")
""")


# --- rewards and datasets --------------------------------------------------------------------------------------------

def length_reward(completions, **kwargs):
    """A reward that always varies within a group, so every step has a learning signal."""
    return [len(completion[0]["content"]) / 10 for completion in completions]


def pairs(n, p_win=None, base_completion=False):
    """n pairs on distinct arithmetic prompts: chosen = the right answer, rejected = the answer + 1.

    The win probabilities vary per row (SPPO's columns for the soft and single variants), or all equal ``p_win``.
    With ``base_completion``, a "base model sample" per prompt: the chosen response on even rows, another on odd.
    """
    rows = {"prompt": [], "chosen": [], "rejected": [], "chosen_probs_win": [], "chosen_probs_lose": [],
            "chosen_probs": [], "base_completion": []}
    for row in arithmetic_dataset(4 * n):
        if len(rows["prompt"]) == n:
            break
        if row["prompt"] in rows["prompt"]:
            continue
        i = len(rows["prompt"])
        text = row["completion"][0]["content"]
        question = text.rsplit("=", 1)[0]
        rows["prompt"].append(row["prompt"])
        rows["chosen"].append(row["completion"])
        rows["rejected"].append([{"role": "assistant", "content": f"{question}= {int(row['answer']) + 1}"}])
        rows["chosen_probs_win"].append(0.5 + 0.4 * (i + 1) / n if p_win is None else p_win)
        rows["chosen_probs_lose"].append(0.5 - 0.35 * (i + 1) / n if p_win is None else p_win)
        rows["chosen_probs"].append(0.55 + 0.4 * i / n if p_win is None else p_win)
        sample = row["completion"] if i % 2 == 0 else [{"role": "assistant", "content": f"The answer is {question}"}]
        rows["base_completion"].append(sample)
    if not base_completion:
        del rows["base_completion"]
    return Dataset.from_dict(rows)


def rspo_config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none",
        save_strategy="no", max_steps=1, per_device_train_batch_size=4, learning_rate=1e-4, beta=0.1,
        logging_steps=1, seed=0,
    )
    return RSPOConfig(**{**kwargs, **overrides})



# --- the loss-mask audit's formats -----------------------------------------------------------------------------------

FORMATS = ["conversational", "plain", "messages"]


def in_format(dataset: Dataset, data_format: str) -> Dataset:
    """A lab dataset (chat prompt → chat answer) in ``data_format``."""
    if data_format == "conversational":
        return dataset.select_columns(["prompt", "completion"])
    if data_format == "plain":  # the answer starts with a space after a colon: no token straddles the boundary
        return dataset.map(lambda row: {"prompt": f"Question: {row['prompt'][-1]['content']}\nAnswer:",
                                        "completion": " " + row["completion"][0]["content"]},
                           remove_columns=dataset.column_names)
    return dataset.map(lambda row: {"messages": row["prompt"] + row["completion"]},
                       remove_columns=dataset.column_names)


def hand_tokenised(tokenizer, dataset: Dataset, data_format: str) -> list[Example]:
    """Each row's prompt and answer tokenised apart: the answer tokens are what must carry the loss. A chat answer is
    its content and ChatML's end of turn: with ``assistant_only_loss`` the template's generation markers end it at
    ``<|im_end|>`` (the newline after it is in the sequence, outside the loss); a completion's mask also takes that
    newline. A plain answer ends with EOS."""
    if data_format == "plain":
        return [Example.plain(tokenizer, row["prompt"], row["completion"]) for row in dataset]
    if data_format == "messages":
        return [Example.conversational(tokenizer, row["messages"][:-1], row["messages"][-1]["content"],
                                       end="<|im_end|>", suffix="\n") for row in dataset]
    return [Example.conversational(tokenizer, row["prompt"], row["completion"][0]["content"]) for row in dataset]


def format_options(data_format: str) -> dict:
    return {"assistant_only_loss": True} if data_format == "messages" else {}
