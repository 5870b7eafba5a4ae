"""α-SPIN steps (the opponent mixes in the base model) on fixed real-vs-generated arithmetic pairs, for the
distributed tests.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml tests/scripts/spin_step.py \
        --output_dir OUT --per_device_train_batch_size 4

The pairs are fixed (real = the right answer, "generated" = the answer + 1), so 2 processes and 1 process train on
the same data. Saves the model (``save_model``) and the trainer state.
"""

from datasets import Dataset
from trl import ModelConfig, ScriptArguments

from llmreg.lab import arithmetic_dataset
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args
from llmreg.spin import SPINConfig, SPINTrainer


def real_vs_generated(n: int) -> Dataset:
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for row in arithmetic_dataset(n):
        question = row["completion"][0]["content"].rsplit("=", 1)[0]
        rows["prompt"].append(row["prompt"])
        rows["chosen"].append(row["completion"])
        rows["rejected"].append([{"role": "assistant", "content": f"{question}= {int(row['answer']) + 1}"}])
    return Dataset.from_dict(rows)


if __name__ == "__main__":
    parser = make_recipe_parser((ScriptArguments, SPINConfig, ModelConfig), dataset_name="llmreg/arithmetic",
                                output_dir="outputs/spin-test", max_steps=2, learning_rate=1e-2, optim="sgd",
                                max_grad_norm=0.0, logging_steps=1, activation_checkpointing=False,
                                save_strategy="no", report_to="none", max_length=64, beta=0.1, alpha=0.5)
    _, training_args, model_args = parse_recipe_args(parser)
    trainer = SPINTrainer(model_args.model_name_or_path, args=training_args, train_dataset=real_vs_generated(32))
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()
