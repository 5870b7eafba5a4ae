"""SFT steps with a weight perturbation (SAM, ASAM, gradient-norm regularization, AWP; LoRA with --use_peft), for the
2-processes-equal-1-process tests.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml tests/scripts/perturbation_step.py \
        --output_dir OUT --per_device_train_batch_size 4 --weight_perturbation sam --gradient_accumulation_steps 2

Saves the trained model or adapter (``save_model``) and the trainer state.
"""

from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, get_peft_config

from llmreg.lab import arithmetic_dataset
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args
from llmreg.weight_perturbation import WeightPerturbationConfig, with_weight_perturbation


if __name__ == "__main__":
    parser = make_recipe_parser((ScriptArguments, WeightPerturbationConfig, SFTConfig, ModelConfig),
                                dataset_name="llmreg/arithmetic", output_dir="outputs/perturbation-test",
                                max_steps=2, learning_rate=1e-2, optim="sgd", max_grad_norm=0.0, logging_steps=1,
                                activation_checkpointing=False, save_strategy="no", report_to="none", max_length=64)
    _, perturbation, training_args, model_args = parse_recipe_args(parser)
    trainer = with_weight_perturbation(SFTTrainer)(
        model_args.model_name_or_path, args=training_args, train_dataset=arithmetic_dataset(64),
        peft_config=get_peft_config(model_args), weight_perturbation=perturbation)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()
