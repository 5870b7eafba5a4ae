"""RSPO: regularized self-play (SPPO + a KL to the base model), iterated: generate → judge → train, T times.

With no arguments it runs 2 iterations on the lab model ``llmreg/tiny`` and the lab arithmetic prompts on a CPU in a
few minutes, judged by the lab's rule scorer, and prints after each iteration the win rate against the base model,
the mean response length and the KL to the base (recipes/configs/rspo_lab.yaml spells it out):

    accelerate launch recipes/rspo.py
    accelerate launch recipes/rspo.py --regularizers "forward_kl_is=0.01,reverse_kl=0.5" --iterations 3
    accelerate launch --config_file accelerate_configs/multi_process.yaml recipes/rspo.py

A rerun of the same command resumes after the last finished step. The paper's setting (Mistral-7B-Instruct, 3
iterations on UltraFeedback prompts, a reward-model judge; see the comments in the config):

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 4 recipes/rspo.py \
        --config recipes/configs/rspo.yaml
"""

import llmreg  # noqa: F401  (first: it quiets a bitsandbytes warning that importing TRL triggers)


# isort: split
from trl import ModelConfig, ScriptArguments, get_peft_config

from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, model_init_kwargs, run_recipe
from llmreg.rspo import RSPOConfig
from llmreg.selfplay import SelfPlayArguments, run_selfplay
from llmreg.selfplay.loop import format_row, summary_table


def main(script_args: ScriptArguments, loop_args: SelfPlayArguments, training_args: RSPOConfig,
         model_args: ModelConfig) -> None:
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    model = model_args.model_name_or_path
    prompts = load_recipe_dataset(script_args, script_args.dataset_train_split, model_name_or_path=model)
    eval_prompts = load_recipe_dataset(script_args, script_args.dataset_test_split, model_name_or_path=model)
    results = run_selfplay("rspo", loop_args, training_args, model_args.model_name_or_path, prompts, eval_prompts,
                           peft_config=get_peft_config(model_args), report=lambda row: print(format_row(row)))
    if training_args.process_index == 0:
        print(summary_table(results))


def make_parser():
    # With no arguments the recipe runs what recipes/configs/rspo_lab.yaml spells out.
    return make_recipe_parser(
        (ScriptArguments, SelfPlayArguments, RSPOConfig, ModelConfig),
        dataset_name="llmreg/arithmetic",
        output_dir="outputs/rspo",
        iterations=2,
        prompts_per_iteration=1024,
        num_samples=4,
        max_new_tokens=16,
        temperature=1.0,
        top_p=1.0,
        generation_batch_size=64,
        num_eval_prompts=200,
        judge_temperature=0.1,
        beta=0.1,
        regularizers="reverse_kl=0.05",
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=3e-4,
        max_grad_norm=1.0,
        activation_checkpointing=False,
        logging_steps=8,
        save_strategy="no",
        report_to="none",
    )


if __name__ == "__main__":
    run_recipe(main, make_parser())
