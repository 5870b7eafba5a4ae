"""Supervised fine-tuning with TRL's SFTTrainer, on the lab by default.

With no arguments it fine-tunes the lab model ``llmreg/tiny`` on the lab arithmetic task, on a CPU in a minute or two:

    accelerate launch recipes/sft.py
    accelerate launch recipes/sft.py --config recipes/configs/sft.yaml
    accelerate launch --config_file accelerate_configs/multi_process.yaml recipes/sft.py --max_steps 20
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/sft.py --max_steps 20

Any model and dataset TRL's SFTTrainer accepts work too (LoRA with ``--use_peft``):

    accelerate launch recipes/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara
"""

import llmreg  # noqa: F401  (first: it quiets a bitsandbytes warning that importing TRL triggers)


# isort: split
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, get_peft_config

from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, model_init_kwargs, run_recipe
from llmreg.stages import resolve_resume_from_checkpoint
from llmreg.trainer_utils import SFT_FORMATS, check_assistant_only_loss, check_dataset_columns


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    # A rerun of a killed run continues from its last complete checkpoint (--resume_from_checkpoint false: anew).
    checkpoint = resolve_resume_from_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    check_assistant_only_loss(model_args.model_name_or_path, training_args)
    model = model_args.model_name_or_path
    train_dataset = load_recipe_dataset(script_args, script_args.dataset_train_split, model_name_or_path=model)
    check_dataset_columns(train_dataset, SFT_FORMATS, "SFT")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_recipe_dataset(script_args, script_args.dataset_test_split, model_name_or_path=model)
        check_dataset_columns(eval_dataset, SFT_FORMATS, "SFT")

    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()


def make_parser():
    # With no arguments the recipe runs what recipes/configs/sft.yaml spells out: settings for the lab model.
    return make_recipe_parser(
        (ScriptArguments, SFTConfig, ModelConfig),
        dataset_name="llmreg/arithmetic",
        output_dir="outputs/sft",
        max_steps=300,
        per_device_train_batch_size=16,
        learning_rate=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        max_length=128,
        activation_checkpointing=False,
        logging_steps=20,
        save_strategy="steps",  # a killed run's rerun continues from the last checkpoint
        save_steps=50,
        save_total_limit=2,
    )


if __name__ == "__main__":
    run_recipe(main, make_parser())
