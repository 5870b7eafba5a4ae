"""Unlearn the forget split of a question set with CLEAR's objectives and ℓ1 penalty on a fresh LoRA, and score it
TOFU-style. On the lab by default (recipes/configs/unlearn_lab.yaml spells it out):

    accelerate launch recipes/unlearn.py
    accelerate launch recipes/unlearn.py --objective ga --l1_lambda 0.01
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/unlearn.py --objective gd

The lab (TOFU's setup on ``llmreg/new-facts``, facts about entities the lab model has never seen):

1. ``original``: the lab model fully fine-tuned on every new fact (forget and retain splits) together with the
   ``world`` facts it knew already (so that it keeps them);
2. ``gold``: the same fine-tune without the forget split, the model that never saw it;
3. unlearning: a fresh LoRA on ``original``, trained with ``--objective`` (and ``--l1_lambda``) on the forget split.

``--finetune_epochs 0`` skips 1 and 2: then ``--model_name_or_path`` is the model that already knows the forget set,
and ``--gold_model`` (optional) the one for forget quality. Each model and its evaluation is a resumable stage under
``output_dir`` (``original/``, ``gold/``, ``unlearned/``, each with ``eval/``): a rerun with the same settings reuses
them, a rerun with other settings is refused naming them (``--overwrite`` recomputes). Results:
``<output_dir>/unlearn_results.{md,json}``, one row each for the original, the gold model and the unlearned one —
forget and retain accuracy, ROUGE-L, answer probability, truth ratio, model utility and forget quality (see
docs/unlearn.md).
"""

import llmreg  # noqa: F401  (first: it quiets a bitsandbytes warning that importing TRL triggers)


# isort: split
import json
import logging
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from trl import ModelConfig, ScriptArguments

from llmreg.lab.facts import fact_is_correct
from llmreg.lab.prompts import prompt_style_of
from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, model_init_kwargs, run_recipe
from llmreg.trainer_utils import check_assistant_only_loss, write_atomically
from llmreg.unlearn import UnlearnConfig
from llmreg.unlearn.protocol import (
    UnlearnScriptArguments,
    prepare_models,
    reference_rows,
    results_table,
    unlearn,
)


logger = logging.getLogger(__name__)


def load_question_sets(script_args: UnlearnScriptArguments, model: str) -> dict:
    """The forget, retain and (when named) world question sets, phrased for ``model`` (lab datasets)."""
    sets = {"forget": load_recipe_dataset(script_args, script_args.dataset_forget_split, model_name_or_path=model),
            "retain": load_recipe_dataset(script_args, script_args.dataset_retain_split, model_name_or_path=model)}
    world = script_args.world_dataset_name
    if world == "auto":
        # The lab's invented entities are facts only llmreg/tiny learned: a real model's utility needs real facts.
        world = "llmreg/facts" if prompt_style_of(model) == "lab" else "llmreg/world-facts"
        logger.info("World facts (model utility): %s.", world)
    if world and world.lower() != "none":
        sets["world"] = load_recipe_dataset(ScriptArguments(dataset_name=world), script_args.world_dataset_split,
                                            model_name_or_path=model)
    return sets


def main(script_args: UnlearnScriptArguments, training_args: UnlearnConfig, model_args: ModelConfig) -> list[dict]:
    # Before the fine-tunes: the unlearning stage trains on their models, which keep this model's tokenizer.
    check_assistant_only_loss(model_args.model_name_or_path, training_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    sets = load_question_sets(script_args, model_args.model_name_or_path)
    original, gold = prepare_models(script_args, training_args, model_args, sets)
    limit = script_args.num_eval_questions
    eval_sets = {name: rows.select(range(min(limit, len(rows)))) if limit is not None else rows
                 for name, rows in sets.items()}
    output_dir = Path(training_args.output_dir)
    rows, gold_ratios = reference_rows(original, gold, eval_sets, output_dir, script_args.overwrite,
                                       answer_is_correct=fact_is_correct)
    rows.append(unlearn(original, sets, training_args, model_args, gold_ratios, eval_sets, gold,
                        script_args.overwrite, answer_is_correct=fact_is_correct))
    if PartialState().is_main_process:
        settings = {"objective": training_args.objective, "l1_lambda": training_args.l1_lambda,
                    "beta": training_args.objective_beta, "script": asdict(script_args)}
        write_atomically(output_dir / "unlearn_results.json", json.dumps({"settings": settings, "rows": rows},
                                                                        indent=1))
        write_atomically(output_dir / "unlearn_results.md", results_table(rows))
        print(results_table(rows))
    PartialState().wait_for_everyone()
    return rows


def make_parser():
    # With no arguments the recipe runs what recipes/configs/unlearn_lab.yaml spells out.
    return make_recipe_parser(
        (UnlearnScriptArguments, UnlearnConfig, ModelConfig),
        dataset_name="llmreg/new-facts",
        output_dir="outputs/unlearn",
        objective="npo",
        use_peft=True,
        lora_r=8,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        num_train_epochs=10,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_length=64,
        activation_checkpointing=False,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
    )


if __name__ == "__main__":
    run_recipe(main, make_parser())
