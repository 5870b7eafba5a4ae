"""Fine-tuning as a service: align (SFT, Booster, Vaccine or Booster + Vaccine), let a customer fine-tune with a share
p of harmful samples, then measure the harmful score and the fine-tune accuracy, for a grid of methods × p. On the lab
by default (recipes/configs/ftaas_lab.yaml spells it out):

    accelerate launch recipes/ftaas.py          # the lab: SFT vs Booster at p in {0, 0.05, 0.1, 0.2}, ~2 min on 2 CPUs
    accelerate launch recipes/ftaas.py --methods sft booster vaccine booster_vaccine --vaccine_rho 2
    accelerate launch recipes/ftaas.py --booster_alpha 0.1    # the paper's α: overshoots on the lab model

The paper's setting (Llama-2-7B with LoRA, BeaverTails, SST2; see the comments in the config):

    accelerate launch recipes/ftaas.py --config recipes/configs/ftaas.yaml

The alignment stage's settings are BoosterConfig's (`--booster_lambda`, `--learning_rate`, `--max_steps`, ...), the
customer's fine-tune the `--finetune_*` options. Results: `<output_dir>/results.{md,csv,json,png}`; a rerun resumes.
"""

import llmreg  # noqa: F401  (first: it quiets a bitsandbytes warning that importing TRL triggers)


# isort: split
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, get_peft_config

from llmreg.booster import BoosterConfig
from llmreg.ftaas import FTaaSArguments, FTaaSPipeline, results_table
from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, model_init_kwargs, run_recipe
from llmreg.trainer_utils import check_assistant_only_loss


@dataclass
class FTaaSScriptArguments(ScriptArguments):
    """The datasets (``dataset_name`` is the alignment data: harmful prompt → refusal). Each is a lab dataset, a local
    dataset directory or a hub id, in prompt/completion or messages format."""

    harmful_dataset_name: str = field(
        default="llmreg/safety-harmful",
        metadata={"help": "Harmful prompts with harmful answers (train split): its first half is Booster's h, its "
                          "second half the attack's harmful samples."},
    )
    task_dataset_name: str = field(
        default="llmreg/sentiment",
        metadata={"help": "The customer's benign task (train split to fine-tune, test split to score accuracy)."},
    )
    harmful_eval_dataset_name: str = field(
        default="llmreg/safety-harmful",
        metadata={"help": "Held-out harmful prompts for the harmful score (test split; only `prompt` is used)."},
    )
    dataset_eval_split: str = field(default="test", metadata={"help": "Split of the evaluation datasets."})
    num_eval_samples: int = field(
        default=200, metadata={"help": "Harmful prompts and task items evaluated, at most (paper: 1000)."}
    )


def dataset(name: str, split: str, model: str, limit: int | None = None):
    data = load_recipe_dataset(ScriptArguments(dataset_name=name), split, model_name_or_path=model)
    return data if limit is None else data.select(range(min(limit, len(data))))


def main(script_args: FTaaSScriptArguments, ftaas_args: FTaaSArguments, training_args: BoosterConfig,
         model_args: ModelConfig) -> None:
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    check_assistant_only_loss(model_args.model_name_or_path, training_args)  # the alignment stage's SFT loss
    split, limit, model = script_args.dataset_eval_split, script_args.num_eval_samples, model_args.model_name_or_path
    pipeline = FTaaSPipeline(
        ftaas_args, training_args, model,
        alignment_dataset=load_recipe_dataset(script_args, script_args.dataset_train_split, model_name_or_path=model),
        harmful_dataset=dataset(script_args.harmful_dataset_name, script_args.dataset_train_split, model),
        task_dataset=dataset(script_args.task_dataset_name, script_args.dataset_train_split, model),
        task_eval_dataset=dataset(script_args.task_dataset_name, split, model, limit),
        harmful_eval_prompts=dataset(script_args.harmful_eval_dataset_name, split, model,
                                     limit).select_columns(["prompt"]),
        peft_config=get_peft_config(model_args),
    )
    rows = pipeline.run()
    if training_args.process_index == 0:
        print(results_table(rows))


def make_parser():
    # With no arguments the recipe runs what recipes/configs/ftaas_lab.yaml spells out.
    return make_recipe_parser(
        (FTaaSScriptArguments, FTaaSArguments, BoosterConfig, ModelConfig),
        dataset_name="llmreg/safety-alignment",
        output_dir="outputs/ftaas",
        max_steps=200,
        booster_alpha=0.01,  # the paper's 0.1 overshoots on the lab model (docs/booster.md, Lab results)
        per_device_train_batch_size=16,
        learning_rate=1e-4,
        max_length=128,
        harmful_ratios=[0.0, 0.05, 0.1, 0.2],
        num_finetune_samples=400,
        finetune_learning_rate=5e-5,
        finetune_epochs=2,
        finetune_batch_size=16,
        activation_checkpointing=False,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
    )


if __name__ == "__main__":
    run_recipe(main, make_parser())
