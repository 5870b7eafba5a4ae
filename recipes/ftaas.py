"""Fine-tuning as a service: align (SFT or Booster), let a customer fine-tune with a share p of harmful samples, then
measure the harmful score and the fine-tune accuracy, for a grid of methods × p. On the lab by default:

    accelerate launch recipes/ftaas.py          # the lab: SFT vs Booster at p in {0, 0.05, 0.1, 0.2}, ~3 min on 2 CPUs
    accelerate launch recipes/ftaas.py --harmful_ratios 0 0.05 0.1 0.2 --booster_lambda 1

The alignment stage's settings are BoosterConfig's (`--booster_lambda`, `--learning_rate`, `--max_steps`, ...), the
customer's fine-tune the `--finetune_*` options. Results: `<output_dir>/results.{md,csv,json}`; a rerun resumes.
"""

from trl import ModelConfig, ScriptArguments, get_peft_config

from llmreg.booster import BoosterConfig
from llmreg.ftaas import FTaaSArguments, FTaaSPipeline, results_table
from llmreg.lab import safety_eval_prompts
from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, model_init_kwargs, parse_recipe_args


def dataset(name: str, split: str):
    return load_recipe_dataset(ScriptArguments(dataset_name=name), split)


def main(script_args: ScriptArguments, ftaas_args: FTaaSArguments, training_args: BoosterConfig,
         model_args: ModelConfig) -> None:
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    pipeline = FTaaSPipeline(
        ftaas_args, training_args, model_args.model_name_or_path,
        alignment_dataset=load_recipe_dataset(script_args, script_args.dataset_train_split),
        harmful_dataset=dataset("llmreg/safety-harmful", "train"),
        task_dataset=dataset("llmreg/sentiment", "train"),
        task_eval_dataset=dataset("llmreg/sentiment", "test").select(range(200)),
        harmful_eval_prompts=safety_eval_prompts(),
        peft_config=get_peft_config(model_args),
    )
    rows = pipeline.run()
    if training_args.process_index == 0:
        print(results_table(rows))


def make_parser():
    # With no arguments the recipe runs what recipes/configs/ftaas_lab.yaml spells out.
    return make_recipe_parser(
        (ScriptArguments, FTaaSArguments, BoosterConfig, ModelConfig),
        dataset_name="llmreg/safety-alignment",
        output_dir="outputs/ftaas",
        max_steps=200,
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
    main(*parse_recipe_args(make_parser()))
