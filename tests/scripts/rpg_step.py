"""RPG steps on the lab arithmetic prompts with scripted completions, for the distributed tests.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml tests/scripts/rpg_step.py \
        --output_dir OUT --per_device_train_batch_size 8

Sampling draws from each process's own random stream, so 2 processes and 1 process would train on different
completions. Here a ``rollout_func`` writes the k-th completion of a prompt's group as a function of the prompt and k
alone: the update then depends only on the batch, and 2 processes with a batch of b must equal 1 process with 2b.
The completions differ in length within a group, so the length reward gives every group a learning signal. Saves the
model (``save_model``) and the trainer state.
"""

from collections import Counter

from trl import ModelConfig, ScriptArguments

from llmreg.lab import arithmetic_dataset
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args
from llmreg.rpg import RPGConfig, RPGTrainer


def scripted_rollout(prompts, trainer):
    """The k-th occurrence of a prompt gets "<question> = k" followed by k filler words, then EOS."""
    tokenizer = trainer.processing_class
    seen = Counter()
    prompt_ids, completion_ids = [], []
    for prompt in prompts:
        key = prompt[-1]["content"]
        k = seen[key] % trainer.num_generations
        seen[key] += 1
        prompt_ids.append(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"])
        text = f"{key.removeprefix('What is ').rstrip('?')} = {k}" + " so" * k
        completion_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    # A group split across processes would make k depend on the process count; the batch sizes below avoid it.
    assert all(count % trainer.num_generations == 0 for count in seen.values()), f"split groups: {seen}"
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def length_reward(completions, **kwargs):
    return [len(completion[0]["content"]) / 10 for completion in completions]


if __name__ == "__main__":
    parser = make_recipe_parser((ScriptArguments, RPGConfig, ModelConfig), dataset_name="llmreg/arithmetic",
                                output_dir="outputs/rpg-test", max_steps=4, learning_rate=1e-2, optim="sgd",
                                max_grad_norm=0.0, logging_steps=1, activation_checkpointing=False,
                                save_strategy="no", report_to="none", num_generations=4, max_completion_length=16,
                                rpg_beta=0.5, divergence="ufkl", reference="fixed")
    _, training_args, model_args = parse_recipe_args(parser)
    trainer = RPGTrainer(model_args.model_name_or_path, length_reward, args=training_args,
                         train_dataset=arithmetic_dataset(64), rollout_func=scripted_rollout)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()
