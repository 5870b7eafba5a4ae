"""Loss-based sample reweighting: train with each strategy and compare held-out loss curves. On the lab by default
(recipes/configs/reweight_lab.yaml spells it out):

    accelerate launch recipes/reweight.py
    accelerate launch recipes/reweight.py --strategies uniform linupper --reweight_r 0.4 --seed 1
    accelerate launch --config_file accelerate_configs/multi_process.yaml recipes/reweight.py
    accelerate launch recipes/reweight.py --from_scratch false --use_peft --lora_dropout_p 0.1 --l1_lambda 1e-4

The lab is pretraining-style: the lab model's architecture and tokenizer, initialized from the seed
(``--from_scratch``: unset, it is on for the lab model ``llmreg/tiny`` only; any other ``--model_name_or_path`` keeps
its weights unless ``--from_scratch true``), trained on the lab corpus (informative, near-duplicate and noisy text)
and evaluated on fresh informative text every ``eval_steps``. Each strategy of ``--strategies`` gets one run
(``--reweight_strategy`` is replaced by each in turn; without ``--strategies`` the recipe runs ``--reweight_strategy``
alone). Results, under ``output_dir``: ``reweight_results.{md,json}`` (final held-out loss, and the steps each
strategy took to reach uniform's final held-out loss) and ``reweight_curves.png``. recipes/configs/reweight.yaml
holds the paper's settings.
With ``--use_peft`` a LoRA adapter trains, and LoRA Dropout (``--lora_dropout_p``) and the ℓ1 penalty
(``--l1_lambda``) compose with the reweighting (docs/lora_dropout.md, "Composing with other regularizers").
"""

import llmreg  # noqa: F401  (first: it quiets a bitsandbytes warning that importing TRL triggers)


# isort: split
import io
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, ScriptArguments, get_peft_config

from llmreg.l1_penalty import with_l1_penalty
from llmreg.lab import LAB_MODEL_ID, is_lab_model, read_lab_info
from llmreg.lora_dropout import LoRADropoutConfig, with_lora_dropout
from llmreg.losses.reweighting import STRATEGIES
from llmreg.recipe_utils import load_recipe_dataset, make_recipe_parser, model_init_kwargs, run_recipe
from llmreg.reweight import ReweightConfig, ReweightTrainer
from llmreg.stages import Stage, dataset_digest, last_complete_checkpoint, training_settings
from llmreg.trainer_utils import check_assistant_only_loss, reset_accelerator_state, write_atomically


logger = logging.getLogger(__name__)


@dataclass
class ReweightScriptArguments(ScriptArguments):
    strategies: list[str] | None = field(
        default=None,
        metadata={"help": f"Strategies to compare, one run each ({', '.join(STRATEGIES)}); they replace "
                          "--reweight_strategy. None: one run with --reweight_strategy."},
    )
    from_scratch: bool | None = field(
        default=None,
        metadata={"help": "Initialize the model from its config and the seed (pretraining) instead of loading its "
                          f"weights. None: from scratch for the lab model {LAB_MODEL_ID} only (the lab's pretraining "
                          "setup), false for any other model, whose weights are kept; true / false force it."},
    )
    num_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    num_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N held-out rows."})
    l1_lambda: float = field(default=0.0, metadata={"help": "λ1 of the ℓ1 penalty on the trainable parameters "
                                                            "(0: off)."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Retrain the strategies in output_dir that were trained with other settings (a rerun "
                          "otherwise reuses the strategies trained with the same settings and refuses the others)."},
    )


def resolve_from_scratch(from_scratch: bool | None, model_name_or_path: str) -> bool:
    """``--from_scratch`` as given, or when unset: true for the lab model llmreg/tiny only. ``model_name_or_path`` is
    resolved: the lab model is its cached directory, recognized by its lab_info.json."""
    # Only llmreg/tiny: the other lab models (SmolLM2 conversions) have a lab_info.json too, and real weights to keep.
    is_tiny = is_lab_model(model_name_or_path) and read_lab_info(model_name_or_path).get("model_id") == LAB_MODEL_ID
    if from_scratch is None:
        if is_tiny:
            logger.info("--from_scratch unset: the lab model %s trains from a seeded random initialization (the lab's "
                        "pretraining setup); pass --from_scratch false to start from its weights.", LAB_MODEL_ID)
        else:
            logger.info("--from_scratch unset: %s is not the lab model %s, so its weights are loaded; pass "
                        "--from_scratch true to pretrain its architecture from a random initialization.",
                        model_name_or_path, LAB_MODEL_ID)
        return is_tiny
    if from_scratch and not is_tiny:
        logger.warning("--from_scratch true: %s's architecture trains from a seeded random initialization; its "
                       "weights are not loaded.", model_name_or_path)
    else:
        logger.info("--from_scratch %s, as given.", str(from_scratch).lower())
    return from_scratch


def held_out_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose held-out loss is at or below ``target``; None if none is."""
    return next((step for step, loss in curve if loss <= target), None)


def results_table(rows: list[dict]) -> str:
    lines = ["| strategy | final held-out loss | steps to reach uniform's final loss | of uniform's steps |",
             "|---|---|---|---|"]
    for row in rows:
        reached = row["steps_to_uniform_final"]
        # No share when uniform reached its final loss at step 0 (it never improved on its start): no denominator.
        share = "—" if reached is None or not row["uniform_steps"] else f"{reached / row['uniform_steps']:.2f}"
        lines.append(f"| {row['strategy']} | {row['final_heldout_loss']:.4f} | "
                     f"{'not reached' if reached is None else reached} | {share} |")
    return "\n".join(lines) + "\n"


def curves_plot(curves: dict[str, list[tuple[int, float]]]) -> bytes:
    from matplotlib.figure import Figure  # the object API: no pyplot, no display backend

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for strategy, curve in curves.items():
        axes.plot([s for s, _ in curve], [loss for _, loss in curve], marker=".", label=strategy)
    axes.set(xlabel="optimizer step", ylabel="held-out loss (nats/token)", title="Held-out loss by strategy")
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def main(script_args: ReweightScriptArguments, dropout: LoRADropoutConfig, training_args: ReweightConfig,
         model_args: ModelConfig) -> list[dict]:
    strategies = script_args.strategies or [training_args.reweight_strategy]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown strategies {unknown}; valid strategies: {', '.join(STRATEGIES)}.")
    init_kwargs = model_init_kwargs(model_args, training_args)
    check_assistant_only_loss(model_args.model_name_or_path, training_args)
    from_scratch = resolve_from_scratch(script_args.from_scratch, model_args.model_name_or_path)
    model = model_args.model_name_or_path
    train = load_recipe_dataset(script_args, script_args.dataset_train_split, model_name_or_path=model)
    heldout = load_recipe_dataset(script_args, script_args.dataset_test_split, model_name_or_path=model)
    if script_args.num_train_samples:
        train = train.select(range(min(script_args.num_train_samples, len(train))))
    if script_args.num_eval_samples:
        heldout = heldout.select(range(min(script_args.num_eval_samples, len(heldout))))
    base_dir, curves, trainer = Path(training_args.output_dir), {}, None
    shared = {"model": model_args.model_name_or_path, "from_scratch": from_scratch,
              "peft": None if get_peft_config(model_args) is None else get_peft_config(model_args).to_dict(),
              "lora_dropout": asdict(dropout), "l1_lambda": script_args.l1_lambda,
              "data": {"train": dataset_digest(train), "heldout": dataset_digest(heldout)},
              "num_processes": PartialState().num_processes}
    for strategy in strategies:
        args = replace(training_args, output_dir=str(base_dir / strategy), reweight_strategy=strategy,
                       model_init_kwargs=None if from_scratch else init_kwargs)
        # Each strategy's run is a resumable stage (<strategy>/): reused by a rerun with the same settings, continued
        # from its last checkpoint after a kill, refused with other settings (--overwrite recomputes it).
        stage = Stage(base_dir / strategy, {"stage": "reweight", **shared, "training": training_settings(args)},
                      overwrite=script_args.overwrite)
        if not stage.is_finished():
            with stage.build() as work:
                args.output_dir = str(work)
                reset_accelerator_state()
                model = model_args.model_name_or_path
                if from_scratch:
                    config = AutoConfig.from_pretrained(model, trust_remote_code=training_args.trust_remote_code)
                    # from_config draws the weights from the global generator: seed it, so every strategy starts
                    # the same.
                    torch.manual_seed(args.seed)
                    model = AutoModelForCausalLM.from_config(config, dtype=init_kwargs["dtype"])
                tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                                          revision=model_args.model_revision)
                trainer = with_l1_penalty(with_lora_dropout(ReweightTrainer))(
                    model, args=args, train_dataset=train, eval_dataset=heldout, processing_class=tokenizer,
                    peft_config=get_peft_config(model_args), lora_dropout=dropout, l1_lambda=script_args.l1_lambda)
                trainer.train(resume_from_checkpoint=last_complete_checkpoint(work))
                trainer.save_state()  # <strategy>/trainer_state.json: the curves llmreg report and ablate read
        state = json.loads((stage.path / "trainer_state.json").read_text())
        curves[strategy] = held_out_curve(state["log_history"])
    if trainer is not None:
        trainer.end()
    if not PartialState().is_main_process:
        return []
    uniform = curves.get("uniform")
    target = uniform[-1][1] if uniform else None
    uniform_steps = steps_to_reach(uniform, target) if uniform else None
    rows = [{"strategy": s, "final_heldout_loss": c[-1][1], "uniform_steps": uniform_steps,
             "steps_to_uniform_final": steps_to_reach(c, target) if target is not None else None, "curve": c}
            for s, c in curves.items()]
    write_atomically(base_dir / "reweight_results.json", json.dumps(rows, indent=1))
    # Flat, per strategy, for llmreg report and llmreg ablate (<strategy>/final_heldout_loss); they compare the
    # strategies, so they are written next to each strategy's stage, not in it.
    for row in rows:
        write_atomically(base_dir / row["strategy"] / "eval.json", json.dumps(
            {key: value for key, value in row.items() if isinstance(value, (int, float))}, indent=1))
    write_atomically(base_dir / "reweight_results.md", results_table(rows))
    write_atomically(base_dir / "reweight_curves.png", curves_plot(curves))
    print(results_table(rows))
    return rows


def make_parser():
    # With no arguments the recipe runs what recipes/configs/reweight_lab.yaml spells out.
    return make_recipe_parser(
        (ReweightScriptArguments, LoRADropoutConfig, ReweightConfig, ModelConfig),
        dataset_name="llmreg/corpus",
        output_dir="outputs/reweight",
        strategies=["uniform", "linupper", "quadratic", "extremes"],
        num_eval_samples=200,
        reweight_r=1.0,
        max_steps=300,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        weight_decay=0.01,
        max_length=64,
        eval_strategy="steps",
        eval_steps=25,
        eval_on_start=True,
        per_device_eval_batch_size=64,
        activation_checkpointing=False,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
    )


if __name__ == "__main__":
    run_recipe(main, make_parser())
