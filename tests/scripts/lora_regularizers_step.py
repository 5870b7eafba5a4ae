"""LoRA SFT steps with LoRA Dropout and the ℓ1 penalty composed (both mixins), for the distributed tests.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml tests/scripts/lora_regularizers_step.py \
        --output_dir OUT --per_device_train_batch_size 4 --lora_dropout_p 0.5 --l1_lambda 0.01

Saves the adapter (``save_model``) and the trainer state.
"""

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, get_peft_config

from llmreg.l1_penalty import L1PenaltyMixin
from llmreg.lab import arithmetic_dataset
from llmreg.lora_dropout import LoRADropoutConfig, LoRADropoutMixin
from llmreg.recipe_utils import make_recipe_parser, parse_recipe_args


@dataclass
class L1Arguments:
    l1_lambda: float = field(default=0.0, metadata={"help": "λ1 of the ℓ1 penalty."})


class RegularizedSFTTrainer(L1PenaltyMixin, LoRADropoutMixin, SFTTrainer):
    pass


if __name__ == "__main__":
    parser = make_recipe_parser((ScriptArguments, L1Arguments, LoRADropoutConfig, SFTConfig, ModelConfig),
                                dataset_name="llmreg/arithmetic", output_dir="outputs/lora-regularizers-test",
                                max_steps=2, learning_rate=1e-2, optim="sgd", max_grad_norm=0.0, logging_steps=1,
                                activation_checkpointing=False, save_strategy="no", report_to="none", max_length=64,
                                use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                lora_target_modules=["q_proj", "v_proj"])
    _, l1, dropout, training_args, model_args = parse_recipe_args(parser)
    trainer = RegularizedSFTTrainer(model_args.model_name_or_path, args=training_args,
                                    train_dataset=arithmetic_dataset(64), peft_config=get_peft_config(model_args),
                                    lora_dropout=dropout, l1_lambda=l1.l1_lambda)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()  # the main process may still be writing
    trainer.end()
