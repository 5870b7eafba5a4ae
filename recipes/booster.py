"""Booster's alignment stage: SFT on refusals plus the harmful-perturbation regularizer (and, on request, Vaccine's
hidden-state perturbation), on the lab by default.

With no arguments it aligns the lab model ``llmreg/tiny`` on the lab safety data (harmful prompts → refusals, with
harmful answers for the regularizer) on a CPU in a few minutes, and prints the harmful score and refusal rate on
held-out harmful prompts before and after (recipes/configs/booster_lab.yaml spells it out):

    accelerate launch recipes/booster.py
    accelerate launch recipes/booster.py --booster_lambda 0     # plain SFT alignment, for comparison
    accelerate launch recipes/booster.py --vaccine_rho 2        # Booster + Vaccine (with --booster_lambda 0: Vaccine)
    accelerate launch recipes/booster.py --use_peft --lora_dropout_p 0.1    # Booster on a LoRA with LoRA Dropout
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/booster.py

The paper's setting (Llama-2-7B with LoRA; see the comments in the config):

    accelerate launch recipes/booster.py --config recipes/configs/booster.yaml
"""

import llmreg  # noqa: F401  (first: it quiets a bitsandbytes warning that importing TRL triggers)


# isort: split
import logging
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, get_peft_config

from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.lab import generate_completions, harmful_score, is_refusal, safety_eval_prompts
from llmreg.lora_dropout import LoRADropoutConfig, with_lora_dropout
from llmreg.recipe_utils import (
    LabEvalArguments,
    load_for_evaluation,
    load_recipe_dataset,
    make_recipe_parser,
    model_init_kwargs,
    run_recipe,
)
from llmreg.stages import resolve_resume_from_checkpoint
from llmreg.trainer_utils import without_zero3


logger = logging.getLogger(__name__)


@dataclass
class BoosterScriptArguments(ScriptArguments):
    harmful_dataset_name: str = field(
        default="llmreg/safety-harmful",
        metadata={"help": "Harmful prompts with harmful answers (the regularizer's h): a lab dataset, a local "
                          "dataset directory or a hub id; its train split is used."},
    )


def lab_safety(model_path: str, eval_args: LabEvalArguments) -> dict[str, float]:
    """Harmful score and refusal rate (%) of a saved model or adapter on the lab's held-out harmful prompts, on this
    process alone."""
    with without_zero3():
        model, tokenizer = load_for_evaluation(model_path)
        answers = generate_completions(model, tokenizer, safety_eval_prompts(eval_args.num_eval_prompts)["prompt"],
                                       desc="safety evaluation", **eval_args.generation())
    return {"harmful_score": harmful_score(answers),
            "refusal_rate": 100.0 * sum(map(is_refusal, answers)) / len(answers)}


def main(script_args: BoosterScriptArguments, eval_args: LabEvalArguments, dropout: LoRADropoutConfig,
         training_args: BoosterConfig, model_args: ModelConfig) -> None:
    # A rerun of a killed run continues from its last complete checkpoint (--resume_from_checkpoint false: anew).
    checkpoint = resolve_resume_from_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    model = model_args.model_name_or_path
    train_dataset = load_recipe_dataset(script_args, script_args.dataset_train_split, model_name_or_path=model)
    harmful_args = ScriptArguments(dataset_name=script_args.harmful_dataset_name)
    harmful_dataset = load_recipe_dataset(harmful_args, script_args.dataset_train_split, model_name_or_path=model)
    trainer = with_lora_dropout(BoosterTrainer)(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        harmful_dataset=harmful_dataset,
        peft_config=get_peft_config(model_args),
        lora_dropout=dropout,
    )
    # The held-out harmful prompts are the lab's, so they score a model aligned on lab data.
    on_lab = script_args.dataset_name.startswith("llmreg/") and eval_args.num_eval_prompts > 0
    accelerator = trainer.accelerator
    if not on_lab and accelerator.is_main_process:
        logger.warning("No held-out safety evaluation: %s.", "--num_eval_prompts 0" if eval_args.num_eval_prompts == 0
                       else f"it scores the lab's harmful prompts, and the dataset is {script_args.dataset_name}")
    before = lab_safety(model, eval_args) if on_lab and accelerator.is_main_process else None

    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)

    if accelerator.is_main_process:
        gaps = [entry["booster/gap"] for entry in trainer.state.log_history if "booster/gap" in entry]
        summary = {"booster_lambda": training_args.booster_lambda, "booster_alpha": training_args.booster_alpha,
                   "vaccine_rho": training_args.vaccine_rho, "final_harmful_gap": gaps[-1] if gaps else None}
        if on_lab:
            after = lab_safety(training_args.output_dir, eval_args)
            summary.update({f"{key}_before": value for key, value in before.items()})
            summary.update({f"{key}_after": value for key, value in after.items()})
        trainer.save_metrics("booster", summary)
        accelerator.print("Booster summary: " + ", ".join(f"{key} {value}" for key, value in summary.items()))
    accelerator.wait_for_everyone()
    trainer.end()


def make_parser():
    # With no arguments the recipe runs what recipes/configs/booster_lab.yaml spells out.
    return make_recipe_parser(
        (BoosterScriptArguments, LabEvalArguments, LoRADropoutConfig, BoosterConfig, ModelConfig),
        dataset_name="llmreg/safety-alignment",
        output_dir="outputs/booster",
        max_steps=200,
        booster_alpha=0.01,  # the paper's 0.1 overshoots on the lab model (docs/booster.md, Lab results)
        per_device_train_batch_size=16,
        learning_rate=1e-4,
        max_length=128,
        activation_checkpointing=False,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
    )


if __name__ == "__main__":
    run_recipe(main, make_parser())
