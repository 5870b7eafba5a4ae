"""Unlearning steps on the lab facts, for the distributed tests.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml tests/scripts/unlearn_step.py \
        --output_dir OUT --per_device_train_batch_size 4 --objective scrub --l1_lambda 0.01

Saves the adapter (``save_model``) and the trainer state.
"""

from trl import ModelConfig, ScriptArguments, get_peft_config

from llmreg.lab import facts_dataset
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args
from llmreg.unlearn import UnlearnConfig, UnlearnTrainer
from llmreg.unlearn.unlearn_config import RETAIN_OBJECTIVES


if __name__ == "__main__":
    parser = make_recipe_parser((ScriptArguments, UnlearnConfig, ModelConfig), dataset_name="llmreg/facts",
                                output_dir="outputs/unlearn-test", max_steps=2, learning_rate=1e-2, optim="sgd",
                                max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, activation_checkpointing=False,
                                save_strategy="no", report_to="none", max_length=64, use_peft=True, lora_r=8,
                                lora_alpha=16, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    _, training_args, model_args = parse_recipe_args(parser)
    forget = facts_dataset("forget", num_entities=40, forget_fraction=0.5, seed=1000)
    retain = facts_dataset("retain", num_entities=40, forget_fraction=0.5, seed=1000)
    trainer = UnlearnTrainer(model_args.model_name_or_path, args=training_args, forget_dataset=forget,
                             retain_dataset=retain if training_args.objective in RETAIN_OBJECTIVES else None,
                             peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()
