"""Booster (+ Vaccine with --vaccine_rho, LoRA with --use_peft) alignment steps on the lab safety data, for the
2-processes-equal-1-process tests.

    accelerate launch --config_file accelerate_configs/multi_process.yaml tests/scripts/booster_step.py \
        --output_dir OUT --per_device_train_batch_size 4 --harmful_batch_size 2

Saves the trained model or adapter (``save_model``) and the trainer state.
"""

from trl import ModelConfig, ScriptArguments, get_peft_config

from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.lab import safety_alignment_dataset, safety_harmful_dataset
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args


if __name__ == "__main__":
    parser = make_recipe_parser((ScriptArguments, BoosterConfig, ModelConfig), dataset_name="llmreg/safety-alignment",
                                output_dir="outputs/booster-test", max_steps=2, learning_rate=1e-2, optim="sgd",
                                max_grad_norm=0.0, logging_steps=1, activation_checkpointing=False, save_strategy="no",
                                report_to="none", max_length=64, booster_lambda=5.0, booster_alpha=0.1)
    _, training_args, model_args = parse_recipe_args(parser)
    trainer = BoosterTrainer(model_args.model_name_or_path, args=training_args,
                             train_dataset=safety_alignment_dataset(), harmful_dataset=safety_harmful_dataset(),
                             peft_config=get_peft_config(model_args))
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()
