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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import concatenate_datasets
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, get_peft_config

from llmreg.lab.facts import fact_is_correct
from llmreg.lab.prompts import prompt_style_of
from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, model_init_kwargs, run_recipe
from llmreg.stages import RECORD, Stage, dataset_digest, last_complete_checkpoint, training_settings
from llmreg.trainer_utils import (
    check_assistant_only_loss,
    derived_config,
    reset_accelerator_state,
    save_trained_model,
    without_zero3,
    write_atomically,
)
from llmreg.unlearn import UnlearnConfig, UnlearnTrainer
from llmreg.unlearn.evaluation import evaluate_unlearning
from llmreg.unlearn.metrics import forget_quality
from llmreg.unlearn.unlearn_config import RETAIN_OBJECTIVES


logger = logging.getLogger(__name__)

TABLE_KEYS = ("forget_accuracy", "retain_accuracy", "world_accuracy", "forget_rouge", "retain_rouge",
              "forget_truth_ratio", "model_utility", "forget_quality")


@dataclass
class UnlearnScriptArguments(ScriptArguments):
    dataset_forget_split: str = field(default="forget", metadata={"help": "The split to unlearn."})
    dataset_retain_split: str = field(default="retain", metadata={"help": "The split to keep."})
    world_dataset_name: str | None = field(
        default="auto",
        metadata={"help": "Questions the model knew before, kept in the fine-tunes and scored for model utility; "
                          "'none' to skip. 'auto': the lab model's own facts (llmreg/facts) for a model with the lab "
                          "tokenizer, real-world facts (llmreg/world-facts: capitals) for any other model."},
    )
    world_dataset_split: str = field(default="all", metadata={"help": "The split of world_dataset_name."})
    gold_model: str | None = field(
        default=None, metadata={"help": "A model never trained on the forget split, for forget quality (with "
                                        "--finetune_epochs 0; otherwise it is trained here)."}
    )
    finetune_epochs: float = field(
        default=15.0, metadata={"help": "Epochs of the full fine-tunes that make the original and gold models; 0 = "
                                        "model_name_or_path already knows the forget set."}
    )
    num_eval_questions: int | None = field(
        default=None,
        metadata={"help": "Questions of each set (forget, retain, world) scored per model; the first N. None: all."},
    )
    finetune_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of those fine-tunes."})
    finetune_batch_size: int = field(default=16, metadata={"help": "Per-device batch size of those fine-tunes."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete and recompute the stages in output_dir made with other settings (a rerun otherwise "
                          "reuses the stages made with the same settings and refuses the others)."},
    )
    finetune_paraphrases: bool = field(
        default=True,
        metadata={"help": "Teach each fact in its paraphrased words too (the `paraphrased_answer` column): the lab "
                          "model does not carry a fact over to new words, so the truth ratio, which compares the "
                          "paraphrase with its perturbations, would not see the fact otherwise."},
    )


def training_rows(dataset, paraphrases: bool):
    """Prompt-completion rows of a question set, and with ``paraphrases`` each question again with its paraphrased
    answer (in the completion's format)."""
    rows = dataset.select_columns(["prompt", "completion"])
    if not paraphrases:
        return rows
    conversational = isinstance(dataset[0]["completion"], list)
    paraphrased = dataset.select_columns(["prompt"]).add_column("completion", [
        [{"role": "assistant", "content": a}] if conversational else a for a in dataset["paraphrased_answer"]])
    return concatenate_datasets([rows, paraphrased])


def finetune(directory: Path, model_name_or_path: str, data, script_args, training_args, init_kwargs: dict) -> Path:
    """Fully fine-tune ``model_name_or_path`` on ``data`` into the stage ``directory`` (its model in ``model/``); a
    rerun with the same settings reuses it."""
    # The run's settings (precision, optimizer, clipping, ...) but the fine-tune's own length, rate and batch; no
    # evaluation, best-model or hub push of an intermediate stage.
    args = derived_config(SFTConfig, training_args, output_dir="finetune", max_steps=-1,
                          num_train_epochs=script_args.finetune_epochs,
                          learning_rate=script_args.finetune_learning_rate,
                          per_device_train_batch_size=script_args.finetune_batch_size, save_strategy="no",
                          eval_strategy="no", load_best_model_at_end=False, push_to_hub=False,
                          lr_scheduler_type="constant_with_warmup", warmup_steps=10,
                          model_init_kwargs=init_kwargs or None)
    settings = {"stage": "finetune", "model": model_identity(model_name_or_path), "data": dataset_digest(data),
                "training": training_settings(args), "num_processes": PartialState().num_processes}
    stage = Stage(directory, settings, overwrite=script_args.overwrite)
    if not stage.is_finished():
        with stage.build() as work:
            args.output_dir = str(work / "train")
            reset_accelerator_state()
            trainer = SFTTrainer(model_name_or_path, args=args, train_dataset=data)
            trainer.train(resume_from_checkpoint=last_complete_checkpoint(work / "train"))
            trainer.save_state()
            save_trained_model(trainer, work / "model")
    return stage.path / "model"


def model_identity(path: str | Path | None):
    """What a stage records of a model it starts from: the settings of the stage that made it, or its path."""
    if path is None:
        return None
    record = Path(path).parent / RECORD
    return json.loads(record.read_text())["settings"] if record.is_file() else str(path)


def evaluate(model_path, sets: dict, gold_ratios, directory: Path, settings: dict, overwrite: bool) -> dict:
    """The table row of a saved model, a whole one or a LoRA adapter (merged into its base), in the stage
    ``directory`` (``eval.json``): scored by the main process while the others wait."""
    stage = Stage(directory, {"stage": "eval", "model": model_identity(model_path), **settings}, overwrite=overwrite)
    if not stage.is_finished():
        with stage.build() as work:
            if PartialState().is_main_process:
                write_atomically(work / "eval.json", json.dumps(score(model_path, sets, gold_ratios), indent=1))
    return json.loads((stage.path / "eval.json").read_text())


def score(model_path, sets: dict, gold_ratios) -> dict:
    with without_zero3():  # loading and generating by this process alone, even in a ZeRO-3 run
        if (Path(model_path) / "adapter_config.json").is_file():
            model = AutoPeftModelForCausalLM.from_pretrained(model_path).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        return evaluate_unlearning(model.to(PartialState().device), tokenizer, sets["forget"], sets["retain"],
                                   sets.get("world"), gold_ratios, answer_is_correct=fact_is_correct)


def results_table(rows: list[dict]) -> str:
    keys = [k for k in TABLE_KEYS if any(k in row for row in rows)]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in rows:
        cells = [("—" if row.get(k) is None else f"{row[k]:.3g}") for k in keys]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


def prepare_models(script_args, training_args, model_args, sets: dict) -> tuple[str, str | None]:
    """The original model (knows the forget split) and the gold one (never saw it): fine-tuned here, or given."""
    original, gold = model_args.model_name_or_path, script_args.gold_model
    if script_args.finetune_epochs <= 0:
        return original, gold
    if gold is not None:
        raise ValueError("--gold_model is for a model that already knows the forget set (--finetune_epochs 0); "
                         "with fine-tunes, the gold model is trained here.")
    # Full fine-tunes: a 4-bit or 8-bit base (QLoRA) is for the unlearning stage's adapter only.
    init_kwargs = {key: value for key, value in model_init_kwargs(model_args, training_args).items()
                   if key != "quantization_config"}
    paraphrases = script_args.finetune_paraphrases
    kept = [training_rows(sets[name], paraphrases) for name in ("retain", "world") if name in sets]
    everything = [training_rows(sets["forget"], paraphrases), *kept]
    output_dir = Path(training_args.output_dir)
    original = finetune(output_dir / "original", original, concatenate_datasets(everything), script_args,
                        training_args, init_kwargs)
    gold = finetune(output_dir / "gold", model_args.model_name_or_path, concatenate_datasets(kept), script_args,
                    training_args, init_kwargs)
    return str(original), str(gold)


def evaluation_settings(sets: dict) -> dict:
    """What an evaluation stage records besides its model: the question sets scored."""
    return {"questions": {name: dataset_digest(rows) for name, rows in sets.items()}}


def reference_rows(original: str, gold: str | None, sets: dict, output_dir: Path,
                   overwrite: bool = False) -> tuple[list[dict], list | None]:
    """The table rows of the original and gold models, and the gold model's forget truth ratios."""
    rows, gold_ratios = [], None
    settings = evaluation_settings(sets)
    if gold is not None:
        gold_row = evaluate(gold, sets, None, output_dir / "gold" / "eval", settings, overwrite)
        gold_ratios = gold_row["forget_truth_ratios"]
        rows.append({"model": "gold (never saw the forget split)", **gold_row,
                     "forget_quality": forget_quality(gold_ratios, gold_ratios)})
    original_row = evaluate(original, sets, gold_ratios, output_dir / "original" / "eval",
                            {**settings, "gold": model_identity(gold)}, overwrite)
    rows.insert(0, {"model": "original", **original_row})
    return rows, gold_ratios


def unlearn(original: str, sets: dict, training_args: UnlearnConfig, model_args: ModelConfig,
            gold_ratios, eval_sets: dict, gold: str | None = None, overwrite: bool = False) -> dict:
    """Unlearn the forget split from ``original`` into the stage ``output_dir/unlearned`` and score it."""
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    objective = training_args.objective
    retain = sets["retain"] if objective in RETAIN_OBJECTIVES else None
    peft_config = get_peft_config(model_args)
    output_dir = Path(training_args.output_dir)
    settings = {"stage": "unlearn", "model": model_identity(original), "training": training_settings(training_args),
                "peft": None if peft_config is None else peft_config.to_dict(),
                "data": {"forget": dataset_digest(sets["forget"]),
                         "retain": None if retain is None else dataset_digest(retain)},
                "num_processes": PartialState().num_processes}
    stage = Stage(output_dir / "unlearned", settings, overwrite=overwrite)
    if not stage.is_finished():
        with stage.build() as work:
            training_args.output_dir = str(work / "train")
            try:
                reset_accelerator_state()
                trainer = UnlearnTrainer(original, args=training_args, forget_dataset=sets["forget"],
                                         retain_dataset=retain, peft_config=peft_config)
                trainer.train(resume_from_checkpoint=last_complete_checkpoint(work / "train"))
                trainer.save_state()
                trainer.save_model(str(work))  # the adapter, or the whole model without LoRA
            finally:
                training_args.output_dir = str(output_dir)
    row = evaluate(stage.path, eval_sets, gold_ratios, stage.path / "eval",
                   {**evaluation_settings(eval_sets), "gold": model_identity(gold)}, overwrite)
    name = objective + (f" + ℓ1 (λ1 = {training_args.l1_lambda:g})" if training_args.l1_lambda else "")
    return {"model": name, "objective": objective, "l1_lambda": training_args.l1_lambda, **row}


def main(script_args: UnlearnScriptArguments, training_args: UnlearnConfig, model_args: ModelConfig) -> list[dict]:
    # Before the fine-tunes: the unlearning stage trains on their models, which keep this model's tokenizer.
    check_assistant_only_loss(model_args.model_name_or_path, training_args)
    sets = load_question_sets(script_args, model_args.model_name_or_path)
    original, gold = prepare_models(script_args, training_args, model_args, sets)
    limit = script_args.num_eval_questions
    eval_sets = {name: rows.select(range(min(limit, len(rows)))) if limit is not None else rows
                 for name, rows in sets.items()}
    output_dir = Path(training_args.output_dir)
    rows, gold_ratios = reference_rows(original, gold, eval_sets, output_dir, script_args.overwrite)
    rows.append(unlearn(original, sets, training_args, model_args, gold_ratios, eval_sets, gold,
                        script_args.overwrite))
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
