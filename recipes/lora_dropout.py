"""LoRA SFT with LoRA Dropout against plain LoRA, on a split small enough to overfit; each scored with and without the
test-time ensemble. On the lab by default (recipes/configs/lora_dropout_lab.yaml spells it out):

    accelerate launch recipes/lora_dropout.py
    accelerate launch recipes/lora_dropout.py --lora_dropout_p 0.3 --lora_dropout_train_samples 2 --seed 1
    accelerate launch --config_file accelerate_configs/multi_process.yaml recipes/lora_dropout.py

It trains the same LoRA twice on ``num_train_samples`` rows, with p = 0 and with ``--lora_dropout_p``, and reports for
each: the held-out loss, and the accuracy and expected calibration error (ECE) of classifying the held-out rows by
the answers' likelihoods, over ``label_choices`` — one pass (the expected adapter) and the ensemble of
``--lora_dropout_eval_samples`` masks. Results: ``<output_dir>/lora_dropout_results.{md,json}``.
``--weight_perturbation sam`` (asam, gradient_norm, awp; llmreg/weight_perturbation.py) trains both arms with it: the
flatness regularizers on the same small-data task (recipes/sweeps/weight_perturbation_lora.yaml compares them).
"""

import llmreg  # noqa: F401  (first: it quiets a bitsandbytes warning that importing TRL triggers)


# isort: split
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import PartialState
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, get_peft_config

from llmreg.lab import expected_calibration_error
from llmreg.lora_dropout import LoRADropoutConfig, choice_probabilities, with_lora_dropout
from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, model_init_kwargs, run_recipe
from llmreg.stages import Stage, dataset_digest, last_complete_checkpoint, training_settings
from llmreg.trainer_utils import check_assistant_only_loss, reset_accelerator_state, write_atomically
from llmreg.weight_perturbation import WeightPerturbationConfig, with_weight_perturbation


@dataclass
class LoRADropoutScriptArguments(ScriptArguments):
    num_train_samples: int = field(default=16, metadata={"help": "Training rows: few, so that LoRA overfits."})
    num_eval_samples: int = field(default=200, metadata={"help": "Held-out rows (the test split)."})
    label_choices: list[str] = field(
        default_factory=lambda: ["positive", "negative"],
        metadata={"help": "The answers to classify among (the `label` column holds the right one)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Retrain the arms in output_dir that were trained with other settings (a rerun otherwise "
                          "reuses the arms trained with the same settings and refuses the others)."},
    )


def evaluate(trainer, dataset, choices: list[str], num_samples: int) -> dict[str, float]:
    """Held-out loss (on the trainer's eval dataset, ``dataset``), accuracy (%) and ECE (%), one pass
    (num_samples = 0) or the ensemble of num_samples masks."""
    trainer.lora_dropout_config.lora_dropout_eval_samples = num_samples
    loss = trainer.evaluate()["eval_loss"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    probs = choice_probabilities(model, trainer.processing_class, list(dataset["prompt"]), choices,
                                 trainer.lora_dropout, num_samples)
    confidence, predicted = probs.max(-1)
    correct = [choices[j] == label for j, label in zip(predicted.tolist(), dataset["label"])]
    return {"heldout_loss": loss, "accuracy": 100.0 * sum(correct) / len(correct),
            "ece": expected_calibration_error(confidence, correct)}


def check_arguments(model_args: ModelConfig) -> None:
    """Refuse what would fail only after the first arm has trained."""
    # The plain-LoRA arm (p = 0) attaches no mask and would train a whole model; the LoRA Dropout arm then has no
    # adapter to mask.
    if not model_args.use_peft:
        raise ValueError("--use_peft false: the LoRA Dropout recipe trains a LoRA adapter in both arms, and LoRA "
                         "Dropout masks the input and output dimensions of that adapter's matrices, so without one "
                         "there is nothing to drop. Remove --use_peft false (the recipe turns --use_peft on).")


def main(script_args: LoRADropoutScriptArguments, dropout: LoRADropoutConfig, perturbation: WeightPerturbationConfig,
         training_args: SFTConfig, model_args: ModelConfig) -> None:
    check_arguments(model_args)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    check_assistant_only_loss(model_args.model_name_or_path, training_args)
    model = model_args.model_name_or_path
    train = load_recipe_dataset(script_args, script_args.dataset_train_split, model_name_or_path=model)
    train = train.select(range(script_args.num_train_samples))
    heldout = load_recipe_dataset(script_args, script_args.dataset_test_split, model_name_or_path=model)
    heldout = heldout.select(range(min(script_args.num_eval_samples, len(heldout))))
    base_dir, rows, trainer = Path(training_args.output_dir), [], None
    shared = {"model": model_args.model_name_or_path, "peft": get_peft_config(model_args).to_dict(),
              "data": {"train": dataset_digest(train), "heldout": dataset_digest(heldout)},
              "label_choices": script_args.label_choices, "weight_perturbation": asdict(perturbation),
              "num_processes": PartialState().num_processes}
    for name, p in (("LoRA", 0.0), (f"LoRA Dropout (p = {dropout.lora_dropout_p:g})", dropout.lora_dropout_p)):
        config = LoRADropoutConfig(lora_dropout_p=p, lora_dropout_train_samples=dropout.lora_dropout_train_samples if p
                                   else 1, lora_dropout_per_example=dropout.lora_dropout_per_example)
        samples = [0] if p == 0 else [0, dropout.lora_dropout_eval_samples]
        # Each arm (training and its scores) is a resumable stage (<arm>/): reused by a rerun with the same settings,
        # refused with other settings (--overwrite retrains it).
        stage = Stage(base_dir / ("lora" if p == 0 else "lora_dropout"),
                      {"stage": "arm", **shared, "lora_dropout": asdict(config), "ensemble_samples": samples,
                       "training": training_settings(training_args)}, overwrite=script_args.overwrite)
        if not stage.is_finished():
            with stage.build() as work:
                training_args.output_dir = str(work)
                reset_accelerator_state()  # a second Trainer under DeepSpeed needs its own Accelerator
                trainer = with_weight_perturbation(with_lora_dropout(SFTTrainer))(
                    model_args.model_name_or_path, args=training_args, train_dataset=train, eval_dataset=heldout,
                    peft_config=get_peft_config(model_args), lora_dropout=config, weight_perturbation=perturbation)
                trainer.train(resume_from_checkpoint=last_complete_checkpoint(work))
                trainer.save_state()  # <arm>/trainer_state.json: the curves llmreg report and llmreg ablate read
                arm_rows, scores = [], {}  # scores: flat, heldout_loss, ..., ensemble_heldout_loss, ... (eval.json)
                for num_samples in dict.fromkeys(samples):
                    row = evaluate(trainer, heldout, script_args.label_choices, num_samples)
                    arm_rows.append({"model": name, "ensemble": num_samples, **row})
                    scores.update({("ensemble_" if num_samples else "") + key: value for key, value in row.items()})
                if training_args.process_index == 0:
                    write_atomically(work / "eval.json", json.dumps(scores, indent=1))
                    write_atomically(work / "rows.json", json.dumps(arm_rows, indent=1))
            training_args.output_dir = str(base_dir)
        rows += json.loads((stage.path / "rows.json").read_text())
    if trainer is not None:
        trainer.end()
    if training_args.process_index == 0:
        lines = ["| model | test-time masks | held-out loss | accuracy (%) | ECE (%) |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['ensemble'] or 'none (expected adapter)'} | {r['heldout_loss']:.4f} | "
                  f"{r['accuracy']:.1f} | {r['ece']:.1f} |" for r in rows]
        table = "\n".join(lines) + "\n"
        (base_dir / "lora_dropout_results.md").write_text(table)
        (base_dir / "lora_dropout_results.json").write_text(json.dumps(rows, indent=1))
        print(table)


def make_parser():
    # With no arguments the recipe runs what recipes/configs/lora_dropout_lab.yaml spells out.
    return make_recipe_parser(
        (LoRADropoutScriptArguments, LoRADropoutConfig, WeightPerturbationConfig, SFTConfig, ModelConfig),
        dataset_name="llmreg/sentiment",
        output_dir="outputs/lora_dropout",
        use_peft=True,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout_p=0.2,
        lora_dropout_train_samples=2,
        lora_dropout_eval_samples=8,
        num_train_epochs=60,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_length=64,
        activation_checkpointing=False,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
    )


if __name__ == "__main__":
    run_recipe(main, make_parser())
