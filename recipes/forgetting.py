"""Fine-tuning that forgets less: the lab model fine-tuned on arithmetic with each anti-forgetting regularizer and with
replay, against plain SFT; the arithmetic it gains against the facts it keeps. On the lab by default
(recipes/configs/forgetting_lab.yaml spells it out):

    accelerate launch recipes/forgetting.py
    accelerate launch recipes/forgetting.py --arms sft ewc:30 replay:0.2 --seeds 0 1 2
    accelerate launch recipes/forgetting.py --config recipes/configs/forgetting_smollm2.yaml

Each arm is ``name`` or ``name:strength``: ``sft``; ``l2sp:λ`` and ``ewc:λ`` (the anchor toward the starting weights,
llmreg/anchor.py), ``l2sp_decoupled:λ`` and ``ewc_decoupled:λ`` (the same applied after each optimizer step, as
AdamW's weight decay); ``kl_to_base:β`` (llmreg/kl_to_base.py); ``replay:share`` (that share of the training rows are
old ones, llmreg/replay.py). The old behaviour is ``--old_dataset_name``/``--old_dataset_split`` (the lab's facts,
retain split): EWC's Fisher is estimated on it (once, saved under output_dir and shared by the seeds) and replay
mixes it in. The held-out facts, which the model knows and no arm trains on, are ``--heldout_dataset_name``/
``--heldout_dataset_split`` (the lab's facts, forget split). A real model does not know the lab's invented facts:
recipes/configs/forgetting_smollm2.yaml takes real capitals instead (llmreg/world-facts, its old and heldout halves).

Each arm and seed is a stage (``<name>=<strength>/seed<s>/``: reused by a rerun with the same settings, refused with
others); the starting model is scored once (``base/``). Scores: arithmetic accuracy on held-out questions, and the
accuracy on the old facts and on the held-out facts. Results: ``forgetting_results.{md,json}`` (mean ± standard error
over seeds, and each arm's difference from SFT paired by seed) and ``forgetting_pareto.png`` (arithmetic gain against
fact retention).
"""

import llmreg  # noqa: F401  (first: it quiets a bitsandbytes warning that importing TRL triggers)


# isort: split
import io
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, get_peft_config

from llmreg.anchor import AnchorConfig, AnchorMixin
from llmreg.errors import InputError
from llmreg.kl_to_base import KLToBaseConfig, KLToBaseMixin
from llmreg.lab import arithmetic_accuracy, facts_accuracy, generate_completions
from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, model_init_kwargs, run_recipe
from llmreg.replay import mix_replay
from llmreg.report import format_mean_se, mean_se
from llmreg.stages import Stage, dataset_digest, last_complete_checkpoint, training_settings
from llmreg.trainer_utils import (
    check_assistant_only_loss,
    reset_accelerator_state,
    save_trained_model,
    without_zero3,
    write_atomically,
)


ARMS = ("sft", "l2sp", "ewc", "kl_to_base", "replay", "l2sp_decoupled", "ewc_decoupled")
ANCHOR_ARMS = ("l2sp", "ewc", "l2sp_decoupled", "ewc_decoupled")
METRICS = [("arithmetic_accuracy", "arithmetic acc. (%)"), ("old_facts_accuracy", "old facts acc. (%)"),
           ("heldout_facts_accuracy", "held-out facts acc. (%)")]


@dataclass
class ForgettingArguments(ScriptArguments):
    arms: list[str] = field(
        default_factory=lambda: ["sft", "l2sp:0.01", "ewc:10", "kl_to_base:0.3", "replay:0.1"],
        metadata={"help": f"The arms, `name` or `name:strength`; names: {', '.join(ARMS)}."},
    )
    seeds: list[int] | None = field(
        default_factory=lambda: [0, 1],
        metadata={"help": "One run per arm and seed, in <arm>/seed<s>/. None (null in YAML): the run's --seed alone, "
                          "in <arm>/ (as llmreg ablate runs it, one seed per run)."},
    )
    old_dataset_name: str = field(default="llmreg/facts", metadata={"help": "The old behaviour's data."})
    old_dataset_split: str = field(default="retain", metadata={"help": "Its split."})
    heldout_dataset_name: str = field(
        default="llmreg/facts", metadata={"help": "Facts the model knows that no arm trains on (scored only)."}
    )
    heldout_dataset_split: str = field(default="forget", metadata={"help": "Its split."})
    fisher_num_samples: int = field(default=256, metadata={"help": "EWC: old rows the Fisher is estimated on."})
    kl_to_base_top_k: int = field(
        default=0, metadata={"help": "kl_to_base: 0, the exact KL against the base run each step (a frozen copy in "
                                     "full fine-tuning); k > 0, against the base's top-k precomputed once (no copy)."}
    )
    num_eval_samples: int = field(default=200, metadata={"help": "Held-out arithmetic questions scored."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Retrain the arms in output_dir that were trained with other settings (a rerun otherwise "
                          "reuses the arms trained with the same settings and refuses the others)."},
    )


class ForgettingSFTTrainer(AnchorMixin, KLToBaseMixin, SFTTrainer):
    """SFT with an anchor (L2-SP, EWC) and the KL to the base, each off unless its arm turns it on."""


def parse_arm(spec: str) -> tuple[str, float]:
    name, _, strength = spec.partition(":")
    if name not in ARMS:
        raise InputError(f"Unknown arm {spec!r}; valid arms: {', '.join(ARMS)} (as name or name:strength).")
    if name == "sft":
        return name, 0.0
    try:
        value = float(strength)
    except ValueError:
        raise InputError(f"Arm {spec!r} needs its strength, as {name}:<number>.") from None
    if value <= 0 or (name == "replay" and value >= 1):
        raise InputError(f"Arm {spec!r}: the strength must be > 0 (a replay share below 1).")
    return name, value


def score(model_path: Path, old_facts, heldout_facts, num_eval_samples: int) -> dict[str, float]:
    """Arithmetic accuracy and the two fact accuracies (%) of a saved model, by this process alone."""
    with without_zero3():
        model = AutoModelForCausalLM.from_pretrained(model_path).to(PartialState().device)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model.eval()

        def facts(rows, desc):
            return facts_accuracy(generate_completions(model, tokenizer, rows["prompt"], desc=desc), rows["value"])

        return {"arithmetic_accuracy": arithmetic_accuracy(model, tokenizer, num_eval_samples),
                "old_facts_accuracy": facts(old_facts, "old facts"),
                "heldout_facts_accuracy": facts(heldout_facts, "held-out facts")}


def scored_stage(directory: Path, settings: dict, overwrite: bool, build) -> dict:
    """The stage's ``eval.json``, building the stage with ``build(work)`` (every process) first if needed."""
    stage = Stage(directory, settings, overwrite=overwrite)
    if not stage.is_finished():
        with stage.build() as work:
            build(work)
    return json.loads((stage.path / "eval.json").read_text())


def fmt(values: list[float]) -> str:
    return format_mean_se(values, digits=1)


def results_table(base: dict, results: dict[str, list[dict]]) -> str:
    labels = [label for _, label in METRICS]
    lines = ["| arm | seeds | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(METRICS),
             "| base (before fine-tuning) | — | " + " | ".join(f"{base[key]:.1f}" for key, _ in METRICS) + " |"]
    for arm, rows in results.items():
        cells = [fmt([r[key] for r in rows]) for key, _ in METRICS]
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + " |")
    if "sft" in results and len(results) > 1:
        lines += ["", "Each arm minus SFT, paired by seed:", "",
                  "| arm | " + " | ".join(f"Δ {label}" for label in labels) + " |", "|---|" + "---|" * len(METRICS)]
        for arm, rows in results.items():
            if arm != "sft":
                deltas = {key: [r[key] - s[key] for r, s in zip(rows, results["sft"], strict=True)]
                          for key, _ in METRICS}
                lines.append(f"| {arm} | " + " | ".join(fmt(deltas[key]) for key, _ in METRICS) + " |")
    return "\n".join(lines) + "\n"


def pareto_plot(base: dict, results: dict[str, list[dict]]) -> bytes:
    """Arithmetic gain against each fact accuracy: one point per arm (mean ± standard error over seeds, the seeds
    faint), one color per regularizer, each point labeled with its arm."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no display backend

    colors = dict(zip(ARMS, ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:cyan", "tab:brown"]))
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    for axes, (key, label) in zip(figure.subplots(1, 2), METRICS[1:]):
        for arm, rows in results.items():
            color = colors[parse_arm(arm)[0]]
            gain = [r["arithmetic_accuracy"] - base["arithmetic_accuracy"] for r in rows]
            kept = [r[key] for r in rows]
            (x, x_se), (y, y_se) = mean_se(gain), mean_se(kept)
            axes.errorbar(x, y, xerr=None if math.isnan(x_se) else x_se, yerr=None if math.isnan(y_se) else y_se,
                          marker="o", capsize=3, color=color)
            axes.scatter(gain, kept, s=10, alpha=0.3, color=color)
            axes.annotate(arm, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        axes.axhline(base[key], color="gray", linestyle="--", linewidth=1)
        axes.set(xlabel="arithmetic gain over the base (points)", ylabel=label,
                 title=f"{label.replace(' (%)', '')} (dashed: before fine-tuning)")
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def main(script_args: ForgettingArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict:
    arms = [parse_arm(spec) for spec in script_args.arms]
    if len(set(script_args.arms)) != len(script_args.arms) or script_args.seeds == []:
        raise InputError("--arms must not repeat an arm, and --seeds needs at least one seed.")
    seeds = script_args.seeds if script_args.seeds is not None else [training_args.seed]
    check_assistant_only_loss(model_args.model_name_or_path, training_args)
    model = model_args.model_name_or_path
    train = load_recipe_dataset(script_args, script_args.dataset_train_split, model_name_or_path=model)
    old_args = replace(script_args, dataset_name=script_args.old_dataset_name)
    old = load_recipe_dataset(old_args, script_args.old_dataset_split, model_name_or_path=model)
    heldout_args = replace(script_args, dataset_name=script_args.heldout_dataset_name)
    heldout = load_recipe_dataset(heldout_args, script_args.heldout_dataset_split, model_name_or_path=model)
    for what, rows, needed in (("old-behaviour", old, ("prompt", "completion", "value")),
                               ("held-out", heldout, ("prompt", "value"))):
        missing = [column for column in needed if column not in rows.column_names]
        if missing:
            raise InputError(f"The {what} data lacks {missing}: it needs {', '.join(needed)} (the fact's value; the "
                             "lab's facts, llmreg/facts and llmreg/world-facts, have them).")
    init_kwargs = model_init_kwargs(model_args, training_args)
    peft_config = get_peft_config(model_args)
    output_dir = Path(training_args.output_dir)
    shared = {"model": model, "peft": None if peft_config is None else peft_config.to_dict(),
              "data": {"train": dataset_digest(train), "old": dataset_digest(old), "heldout": dataset_digest(heldout)},
              "num_eval_samples": script_args.num_eval_samples, "num_processes": PartialState().num_processes}

    def score_base(work: Path):
        if PartialState().is_main_process:
            write_atomically(work / "eval.json", json.dumps(score(Path(model), old, heldout,
                                                                  script_args.num_eval_samples), indent=1))

    base = scored_stage(output_dir / "base", {"stage": "forgetting-base", **shared}, script_args.overwrite, score_base)
    results = {}
    for arm_spec, (name, strength) in zip(script_args.arms, arms):
        for seed in seeds:
            arm_dir = output_dir / arm_spec.replace(":", "=")
            if script_args.seeds is not None:
                arm_dir = arm_dir / f"seed{seed}"
            args = replace(training_args, output_dir=str(arm_dir), seed=seed,
                           model_init_kwargs=init_kwargs)
            data = mix_replay(train, old, strength, seed) if name == "replay" else train
            anchor = AnchorConfig(name.removesuffix("_decoupled"), strength,
                                  fisher_path=str(output_dir / "fisher.safetensors"),
                                  fisher_num_samples=script_args.fisher_num_samples,
                                  anchor_decoupled=name.endswith("_decoupled")) \
                if name in ANCHOR_ARMS else AnchorConfig()
            kl_to_base = KLToBaseConfig(strength, kl_to_base_top_k=script_args.kl_to_base_top_k) \
                if name == "kl_to_base" else KLToBaseConfig()
            settings = {"stage": "forgetting", **shared, "arm": arm_spec, "anchor": asdict(anchor),
                        "kl_to_base": asdict(kl_to_base), "data": {**shared["data"], "train": dataset_digest(data)},
                        "training": training_settings(args)}

            def build(work: Path, args=args, data=data, anchor=anchor, kl_to_base=kl_to_base, name=name):
                args.output_dir = str(work / "train")
                reset_accelerator_state()
                trainer = ForgettingSFTTrainer(model, args=args, train_dataset=data, peft_config=peft_config,
                                               anchor=anchor, kl_to_base=kl_to_base,
                                               fisher_dataset=old if name.startswith("ewc") else None)
                trainer.train(resume_from_checkpoint=last_complete_checkpoint(work / "train"))
                trainer.save_state()
                save_trained_model(trainer, work / "model")
                if peft_config is not None:  # scored merged: save the whole model next to the adapter
                    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
                    if PartialState().is_main_process:
                        merged.save_pretrained(work / "merged")
                        trainer.processing_class.save_pretrained(work / "merged")
                if PartialState().is_main_process:
                    scored = work / ("merged" if peft_config is not None else "model")
                    write_atomically(work / "eval.json", json.dumps(
                        score(scored, old, heldout, script_args.num_eval_samples), indent=1))
                trainer.accelerator.wait_for_everyone()

            results.setdefault(arm_spec, []).append(
                scored_stage(arm_dir, settings, script_args.overwrite, build))
    if not PartialState().is_main_process:
        return {}
    table = results_table(base, results)
    write_atomically(output_dir / "forgetting_results.md", table)
    write_atomically(output_dir / "forgetting_results.json",
                     json.dumps({"base": base, "arms": results, "seeds": seeds}, indent=1))
    write_atomically(output_dir / "forgetting_pareto.png", pareto_plot(base, results))
    print(table)
    return {"base": base, "arms": results}


def make_parser():
    # With no arguments the recipe runs what recipes/configs/forgetting_lab.yaml spells out: the SFT demo's settings
    # (recipes/configs/sft.yaml), under which plain SFT forgets most of the facts.
    return make_recipe_parser(
        (ForgettingArguments, SFTConfig, ModelConfig),
        dataset_name="llmreg/arithmetic",
        output_dir="outputs/forgetting",
        max_steps=300,
        per_device_train_batch_size=16,
        learning_rate=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        max_length=128,
        activation_checkpointing=False,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
    )


if __name__ == "__main__":
    run_recipe(main, make_parser())
