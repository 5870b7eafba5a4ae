"""Reweighted pretraining steps on the lab corpus, for the distributed tests.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml tests/scripts/reweight_step.py \
        --output_dir OUT --per_device_train_batch_size 4

Saves the model (``save_model``) and the trainer state.
"""

from trl import ModelConfig, ScriptArguments

from llmreg.lab import corpus_dataset
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args
from llmreg.reweight import ReweightConfig, ReweightTrainer


if __name__ == "__main__":
    parser = make_recipe_parser((ScriptArguments, ReweightConfig, ModelConfig), dataset_name="llmreg/corpus",
                                output_dir="outputs/reweight-test", max_steps=2, learning_rate=1e-2, optim="sgd",
                                max_grad_norm=0.0, logging_steps=1, activation_checkpointing=False,
                                save_strategy="no", report_to="none", max_length=64, reweight_strategy="linupper",
                                reweight_r=0.4)
    _, training_args, model_args = parse_recipe_args(parser)
    trainer = ReweightTrainer(model_args.model_name_or_path, args=training_args, train_dataset=corpus_dataset(64))
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()
