"""RSPO steps (SPPO + reverse-KL and IS-forward-KL regularizers) on fixed arithmetic pairs, for the distributed tests.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml tests/scripts/rspo_step.py \
        --output_dir OUT --per_device_train_batch_size 4

The pairs are fixed (chosen = the right answer, rejected = the answer + 1, win probabilities varying per row), so
2 processes and 1 process train on the same data. Saves the model (``save_model``) and the trainer state.
"""

from datasets import Dataset
from trl import ModelConfig, ScriptArguments

from llmreg.lab import arithmetic_dataset
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args
from llmreg.rspo import RSPOConfig, RSPOTrainer


def arithmetic_pairs(n: int) -> Dataset:
    rows = {"prompt": [], "chosen": [], "rejected": [], "chosen_probs": [], "chosen_probs_win": [],
            "chosen_probs_lose": []}
    for i, row in enumerate(arithmetic_dataset(n)):
        question = row["completion"][0]["content"].rsplit("=", 1)[0]
        rows["prompt"].append(row["prompt"])
        rows["chosen"].append(row["completion"])
        rows["rejected"].append([{"role": "assistant", "content": f"{question}= {int(row['answer']) + 1}"}])
        rows["chosen_probs"].append(0.55 + 0.4 * i / n)
        rows["chosen_probs_win"].append(0.5 + 0.4 * (i + 1) / n)
        rows["chosen_probs_lose"].append(0.5 - 0.35 * (i + 1) / n)
    return Dataset.from_dict(rows)


if __name__ == "__main__":
    parser = make_recipe_parser((ScriptArguments, RSPOConfig, ModelConfig), dataset_name="llmreg/arithmetic",
                                output_dir="outputs/rspo-test", max_steps=2, learning_rate=1e-2, optim="sgd",
                                max_grad_norm=0.0, logging_steps=1, activation_checkpointing=False,
                                save_strategy="no", report_to="none", max_length=64, beta=0.1,
                                regularizers="reverse_kl=0.5,forward_kl_is=0.1")
    _, training_args, model_args = parse_recipe_args(parser)
    trainer = RSPOTrainer(model_args.model_name_or_path, args=training_args, train_dataset=arithmetic_pairs(32))
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()
