"""RPG: KL-regularized policy gradients (RPGTrainer, on TRL's GRPOTrainer), on the lab by default.

With no arguments it trains the lab model ``llmreg/tiny`` on the lab arithmetic task on a CPU in a few minutes, and
prints held-out accuracy before and after and the mean KL to the reference:

    accelerate launch recipes/rpg.py
    accelerate launch recipes/rpg.py --config recipes/configs/rpg_lab.yaml --divergence urkl --estimator reinforce
    accelerate launch --config_file accelerate_configs/multi_process.yaml recipes/rpg.py --max_steps 20
    accelerate launch recipes/rpg.py --use_peft --lora_dropout_p 0.1     # a LoRA adapter with LoRA Dropout

The paper's setting for a real model (8 GPUs, vLLM off; see the comments in the config):

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 8 recipes/rpg.py \
        --config recipes/configs/rpg.yaml
"""

import llmreg  # noqa: F401  (first: it quiets a bitsandbytes warning that importing TRL triggers)


# isort: split
import logging
import statistics
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, get_peft_config

from llmreg.lab import arithmetic_accuracy
from llmreg.lora_dropout import LoRADropoutConfig, with_lora_dropout
from llmreg.recipe_utils import (
    LabEvalArguments,
    load_for_evaluation,
    load_recipe_dataset,
    make_recipe_parser,
    model_init_kwargs,
    run_recipe,
)
from llmreg.rpg import RPGConfig, RPGTrainer
from llmreg.stages import resolve_resume_from_checkpoint
from llmreg.trainer_utils import check_dataset_columns, import_object, without_zero3


logger = logging.getLogger(__name__)


@dataclass
class RPGScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["llmreg.lab.arithmetic_reward"],
        metadata={"help": "Reward functions as importable dotted paths (module.function), in TRL's reward signature."},
    )


def lab_accuracy(model_path: str, eval_args: LabEvalArguments) -> float:
    """Held-out arithmetic accuracy (%) of a saved model or adapter, on this process alone."""
    with without_zero3():  # a whole copy, on the main process alone, also under ZeRO-3
        model, tokenizer = load_for_evaluation(model_path)
        return arithmetic_accuracy(model, tokenizer, eval_args.num_eval_prompts, **eval_args.generation())


def main(script_args: RPGScriptArguments, eval_args: LabEvalArguments, dropout: LoRADropoutConfig,
         training_args: RPGConfig, model_args: ModelConfig) -> None:
    # A rerun of a killed run continues from its last complete checkpoint (--resume_from_checkpoint false: anew).
    checkpoint = resolve_resume_from_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    train_dataset = load_recipe_dataset(script_args, script_args.dataset_train_split,
                                        model_name_or_path=model_args.model_name_or_path)
    check_dataset_columns(train_dataset, {"prompt-only": ("prompt",)}, "RPG")
    reward_funcs = [import_object(path) for path in script_args.reward_funcs]
    trainer = with_lora_dropout(RPGTrainer)(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
        lora_dropout=dropout,
    )
    # Held-out accuracy is measured from the saved weights (a whole model or the adapter) on the main process, so it
    # works under any launcher.
    on_lab_task = script_args.dataset_name == "llmreg/arithmetic" and eval_args.num_eval_prompts > 0
    accelerator = trainer.accelerator
    if not on_lab_task and accelerator.is_main_process:
        logger.warning("No held-out evaluation: %s.", "--num_eval_prompts 0" if eval_args.num_eval_prompts == 0 else
                       f"it scores the lab arithmetic task, and the dataset is {script_args.dataset_name}")
    before = None
    if on_lab_task and accelerator.is_main_process:
        before = lab_accuracy(model_args.model_name_or_path, eval_args)

    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)

    kl_key = f"rpg/{training_args.divergence}"
    kls = [entry[kl_key] for entry in trainer.state.log_history if kl_key in entry]
    if accelerator.is_main_process:
        summary = {"variant": trainer.variant, "mean_kl_to_reference": statistics.fmean(kls) if kls else None}
        if on_lab_task:
            summary.update(arithmetic_accuracy_before=before, arithmetic_accuracy_after=lab_accuracy(
                training_args.output_dir, eval_args))
        trainer.save_metrics("rpg", summary)
        accelerator.print("RPG summary: " + ", ".join(f"{key} {value}" for key, value in summary.items()))
    accelerator.wait_for_everyone()
    trainer.end()


def make_parser():
    # With no arguments the recipe runs what recipes/configs/rpg_lab.yaml spells out.
    return make_recipe_parser(
        (RPGScriptArguments, LabEvalArguments, LoRADropoutConfig, RPGConfig, ModelConfig),
        dataset_name="llmreg/arithmetic",
        output_dir="outputs/rpg",
        max_steps=800,
        learning_rate=1e-4,
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=16,
        temperature=1.0,
        activation_checkpointing=False,
        logging_steps=20,
        save_strategy="steps",  # a killed run's rerun continues from the last checkpoint
        save_steps=100,  # a multiple of the 4 optimizer steps per generation
        save_total_limit=2,
    )


if __name__ == "__main__":
    run_recipe(main, make_parser())
