"""TOFU's unlearning protocol on resumable stages (``recipes/unlearn.py`` is its command line):

1. ``original``: the model fully fine-tuned on every fact of the forget and retain sets, with the world facts it knew
   already (``prepare_models``);
2. ``gold``: the same fine-tune without the forget set, the model that never saw it;
3. unlearning: a fresh LoRA on ``original``, trained with an ``UnlearnConfig`` objective on the forget set
   (``unlearn``);

each model scored TOFU-style into a table row (``reference_rows``, ``unlearn``; ``results_table``). Every model and
its evaluation is a ``Stage``: a rerun with the same settings reuses it. Accuracy needs the caller's rule for whether
an answer states a fact, ``answer_is_correct(answer, value)`` (the lab's is ``llmreg.lab.facts.fact_is_correct``);
without one the rows have no accuracy. ``training_args.model_init_kwargs`` loads every model (the recipe sets it from
its model options).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import concatenate_datasets
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, get_peft_config

from llmreg.stages import RECORD, Stage, dataset_digest, last_complete_checkpoint, training_settings
from llmreg.trainer_utils import (
    derived_config,
    reset_accelerator_state,
    save_trained_model,
    without_zero3,
    write_atomically,
)
from llmreg.unlearn.evaluation import evaluate_unlearning
from llmreg.unlearn.metrics import ROUGE_L, forget_quality
from llmreg.unlearn.unlearn_config import RETAIN_OBJECTIVES, UnlearnConfig
from llmreg.unlearn.unlearn_trainer import UnlearnTrainer


AnswerRule = Callable[[str, str], bool]  # answer_is_correct(greedy answer, the fact's value)

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
    # evaluation, best-model or hub push of an intermediate stage. No weight decay: the unlearning's (CLEAR's 0.01) is
    # for its adapter, and the facts are taught as before derived configs, so earlier results rerun the same.
    args = derived_config(SFTConfig, training_args, output_dir="finetune", max_steps=-1,
                          num_train_epochs=script_args.finetune_epochs,
                          learning_rate=script_args.finetune_learning_rate,
                          per_device_train_batch_size=script_args.finetune_batch_size, save_strategy="no",
                          eval_strategy="no", load_best_model_at_end=False, push_to_hub=False,
                          lr_scheduler_type="constant_with_warmup", warmup_steps=10, weight_decay=0.0,
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


def evaluate(model_path, sets: dict, gold_ratios, directory: Path, settings: dict, overwrite: bool,
             answer_is_correct: AnswerRule | None = None) -> dict:
    """The table row of a saved model, a whole one or a LoRA adapter (merged into its base), in the stage
    ``directory`` (``eval.json``): scored by the main process while the others wait."""
    settings = {"stage": "eval", "model": model_identity(model_path), **settings}
    if answer_is_correct is None:  # a row without accuracy is another row: recorded, so it is not reused for one with
        settings["accuracy"] = "not scored: no answer_is_correct"
    stage = Stage(directory, settings, overwrite=overwrite)
    if not stage.is_finished():
        with stage.build() as work:
            if PartialState().is_main_process:
                row = score(model_path, sets, gold_ratios, answer_is_correct)
                write_atomically(work / "eval.json", json.dumps(row, indent=1))
    return json.loads((stage.path / "eval.json").read_text())


def score(model_path, sets: dict, gold_ratios, answer_is_correct: AnswerRule | None = None) -> dict:
    with without_zero3():  # loading and generating by this process alone, even in a ZeRO-3 run
        if (Path(model_path) / "adapter_config.json").is_file():
            model = AutoPeftModelForCausalLM.from_pretrained(model_path).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        return evaluate_unlearning(model.to(PartialState().device), tokenizer, sets["forget"], sets["retain"],
                                   sets.get("world"), gold_ratios, answer_is_correct=answer_is_correct)


def results_table(rows: list[dict]) -> str:
    keys = [k for k in TABLE_KEYS if any(k in row for row in rows)]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in rows:
        cells = [("—" if row.get(k) is None else f"{row[k]:.3g}") for k in keys]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def prepare_models(script_args, training_args, model_args, sets: dict) -> tuple[str, str | None]:
    """The original model (knows the forget split) and the gold one (never saw it): fine-tuned here, or given."""
    original, gold = model_args.model_name_or_path, script_args.gold_model
    if script_args.finetune_epochs <= 0:
        return original, gold
    if gold is not None:
        raise ValueError("--gold_model is for a model that already knows the forget set (--finetune_epochs 0); "
                         "with fine-tunes, the gold model is trained here.")
    # Full fine-tunes: a 4-bit or 8-bit base (QLoRA) is for the unlearning stage's adapter only.
    init_kwargs = {key: value for key, value in (training_args.model_init_kwargs or {}).items()
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
    """What an evaluation stage records besides its model: the question sets scored and how ROUGE was computed."""
    return {"questions": {name: dataset_digest(rows) for name, rows in sets.items()}, "rouge": ROUGE_L}


def reference_rows(original: str, gold: str | None, sets: dict, output_dir: Path, overwrite: bool = False,
                   answer_is_correct: AnswerRule | None = None) -> tuple[list[dict], list | None]:
    """The table rows of the original and gold models, and the gold model's forget truth ratios."""
    rows, gold_ratios = [], None
    settings = evaluation_settings(sets)
    if gold is not None:
        gold_row = evaluate(gold, sets, None, output_dir / "gold" / "eval", settings, overwrite, answer_is_correct)
        gold_ratios = gold_row["forget_truth_ratios"]
        rows.append({"model": "gold (never saw the forget split)", **gold_row,
                     "forget_quality": forget_quality(gold_ratios, gold_ratios)})
    original_row = evaluate(original, sets, gold_ratios, output_dir / "original" / "eval",
                            {**settings, "gold": model_identity(gold)}, overwrite, answer_is_correct)
    rows.insert(0, {"model": "original", **original_row})
    return rows, gold_ratios


def unlearn(original: str, sets: dict, training_args: UnlearnConfig, model_args: ModelConfig, gold_ratios,
            eval_sets: dict, gold: str | None = None, overwrite: bool = False,
            answer_is_correct: AnswerRule | None = None) -> dict:
    """Unlearn the forget split from ``original`` into the stage ``output_dir/unlearned`` and score it."""
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
                   {**evaluation_settings(eval_sets), "gold": model_identity(gold)}, overwrite, answer_is_correct)
    name = objective + (f" + ℓ1 (λ1 = {training_args.l1_lambda:g})" if training_args.l1_lambda else "")
    return {"model": name, "objective": objective, "l1_lambda": training_args.l1_lambda, **row}
