"""SFT steps with the anti-forgetting regularizers (an anchor, L2-SP or EWC, and the KL to the base; LoRA with
--use_peft), alone or under a weight perturbation (--weight_perturbation), for the 2-processes-equal-1-process
tests. EWC's Fisher is estimated in the run, on the lab's retain facts, each process taking its share of the rows.

    accelerate launch --config_file accelerate_configs/multi_process.yaml tests/scripts/forgetting_step.py \
        --output_dir OUT --per_device_train_batch_size 4 --anchor ewc --anchor_lambda 50 --use_peft

Saves the trained model or adapter (``save_model``) and the trainer state.
"""

from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, get_peft_config

from llmreg.anchor import AnchorConfig, AnchorMixin
from llmreg.kl_to_base import KLToBaseConfig, KLToBaseMixin
from llmreg.lab import arithmetic_dataset, facts_dataset
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args
from llmreg.weight_perturbation import WeightPerturbationConfig, WeightPerturbationMixin


class ForgettingSFTTrainer(WeightPerturbationMixin, AnchorMixin, KLToBaseMixin, SFTTrainer):
    pass


if __name__ == "__main__":
    parser = make_recipe_parser((ScriptArguments, AnchorConfig, KLToBaseConfig, WeightPerturbationConfig, SFTConfig,
                                 ModelConfig),
                                dataset_name="llmreg/arithmetic", output_dir="outputs/anchor-test",
                                max_steps=2, learning_rate=1e-2, optim="sgd", max_grad_norm=0.0, logging_steps=1,
                                activation_checkpointing=False, save_strategy="no", report_to="none", max_length=64,
                                fisher_num_samples=8)
    _, anchor, kl_to_base, perturbation, training_args, model_args = parse_recipe_args(parser)
    old_behaviour = facts_dataset("retain").select_columns(["prompt", "completion"])
    trainer = ForgettingSFTTrainer(
        model_args.model_name_or_path, args=training_args, train_dataset=arithmetic_dataset(64),
        peft_config=get_peft_config(model_args), anchor=anchor, kl_to_base=kl_to_base,
        weight_perturbation=perturbation,
        fisher_dataset=old_behaviour if anchor.anchor == "ewc" else None)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()
