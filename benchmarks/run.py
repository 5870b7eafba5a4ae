"""Benchmark llmreg trainers against their stock base trainers on the lab model and print a table of ratios.

    python benchmarks/run.py [--cases sft] [--rounds 5] [--steps-per-round 10] [--warmup 5] [--threads N]

A case is a function returning ``(make_candidate, make_baseline)``, two zero-argument callables that each build a
fresh, ready-to-train Trainer; register it in ``CASES``. See benchmarks/README.md.
"""

import argparse
import os
import tempfile

import torch
from datasets import Dataset
from harness import compare
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from llmreg.anchor import AnchorConfig, with_anchor
from llmreg.booster import BoosterConfig, BoosterTrainer
from llmreg.kl_to_base import KLToBaseConfig, with_kl_to_base
from llmreg.l1_penalty import with_l1_penalty
from llmreg.lab import (
    arithmetic_dataset,
    arithmetic_reward,
    ensure_lab_model,
    facts_dataset,
    safety_alignment_dataset,
    safety_harmful_dataset,
)
from llmreg.lora_dropout import LoRADropoutConfig, with_lora_dropout
from llmreg.reweight import ReweightConfig, ReweightTrainer
from llmreg.rpg import RPGConfig, RPGTrainer
from llmreg.rspo import RSPOConfig, RSPOTrainer
from llmreg.spin import SPINConfig, SPINTrainer
from llmreg.weight_perturbation import WeightPerturbationConfig, with_weight_perturbation


# Every round is one train() call stopped by the harness, so max_steps only has to exceed the longest round; the
# linear LR decay over this many steps keeps the learning rate practically constant during a benchmark.
MAX_STEPS = 10_000
NUM_EXAMPLES = 1024
OUTPUT_DIR = os.path.join(tempfile.gettempdir(), "llmreg-benchmarks")  # nothing is saved (save_strategy="no")


# Every case, both sides: CPU-safe, no saving, reporting or progress bars, a fixed seed.
COMMON_ARGS = dict(
    output_dir=OUTPUT_DIR,
    use_cpu=not torch.cuda.is_available(),
    bf16=False,
    activation_checkpointing=False,
    report_to="none",
    save_strategy="no",
    logging_steps=1000,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=0,
    max_steps=MAX_STEPS,
    include_num_input_tokens_seen="non_padding",  # for tokens/s
)
# --model replaces the lab model (benchmarks/gpu_check.sh passes a random ~0.5B model); --bf16 sets bf16 on both sides.
MODEL_DIR: str | None = None
# benchmarks/cost_growth.py grows the work: every per-device batch times "batch", and "filler_words" words before each
# prompt (so sequences grow; max_length grows with them so nothing is cut).
SCALE = {"batch": 1, "filler_words": 0}
_FILLER = ["the", "river", "carried", "old", "boats", "past", "quiet", "mills", "and", "bright", "towers"]


def batch(size: int) -> int:
    return size * SCALE["batch"]


def max_length() -> int:
    return 128 + 2 * SCALE["filler_words"]


def prompts_lengthened(dataset: Dataset) -> Dataset:
    """``dataset`` with SCALE["filler_words"] words before the first message of every prompt."""
    if SCALE["filler_words"] == 0:
        return dataset
    filler = " ".join(_FILLER[i % len(_FILLER)] for i in range(SCALE["filler_words"]))

    def lengthen(row):
        first, *rest = row["prompt"]
        return {"prompt": [{**first, "content": f"{filler} {first['content']}"}, *rest]}

    return dataset.map(lengthen)


def benchmark_model() -> str:
    return MODEL_DIR or str(ensure_lab_model())


def sft_config() -> SFTConfig:
    """SFT arguments shared by every case: small batches of the lab task."""
    return SFTConfig(**{**COMMON_ARGS, "per_device_train_batch_size": batch(8), "max_length": max_length(),
                        "learning_rate": 1e-4})


def make_sft_case(trainer_cls: type[SFTTrainer] = SFTTrainer):
    """``trainer_cls`` (default: SFTTrainer itself, a sanity check with ratios near 1) against TRL's SFTTrainer."""
    model_dir = benchmark_model()
    dataset = prompts_lengthened(arithmetic_dataset(NUM_EXAMPLES))

    def make_candidate():
        return trainer_cls(model=model_dir, args=sft_config(), train_dataset=dataset)

    def make_baseline():
        return SFTTrainer(model=model_dir, args=sft_config(), train_dataset=dataset)

    return make_candidate, make_baseline


def grpo_kwargs() -> dict:
    """GRPO/RPG arguments shared by both sides: the same generation batch, clip range and reward scaling, so the
    trainers differ only in their loss."""
    return dict(COMMON_ARGS, per_device_train_batch_size=batch(16), num_generations=8, max_completion_length=16,
                learning_rate=1e-5, steps_per_generation=4, epsilon_high=0.28, scale_rewards="none")


def make_rpg_case():
    """RPGTrainer (UFKL, full estimator, old policy as reference) against GRPOTrainer with beta = 0 (no KL)."""
    model_dir = benchmark_model()
    dataset = prompts_lengthened(arithmetic_dataset(NUM_EXAMPLES))

    def make_candidate():
        return RPGTrainer(model_dir, arithmetic_reward, args=RPGConfig(**grpo_kwargs()), train_dataset=dataset)

    def make_baseline():
        return GRPOTrainer(model_dir, arithmetic_reward, args=GRPOConfig(**grpo_kwargs()), train_dataset=dataset)

    return make_candidate, make_baseline


def preference_dataset() -> Dataset:
    """Lab arithmetic pairs: the right answer against a wrong one, with SPPO's win-probability columns."""
    rows = prompts_lengthened(arithmetic_dataset(NUM_EXAMPLES))
    wrong = [[{"role": "assistant", "content": f"{message[0]['content'].split('=')[0]}= {int(answer) + 1}"}]
             for message, answer in zip(rows["completion"], rows["answer"])]
    return Dataset.from_dict({
        "prompt": list(rows["prompt"]), "chosen": list(rows["completion"]), "rejected": wrong,
        "chosen_probs_win": [0.6 + 0.3 * (i % 3) / 2 for i in range(NUM_EXAMPLES)],
        "chosen_probs_lose": [0.4 - 0.3 * (i % 3) / 2 for i in range(NUM_EXAMPLES)],
        "chosen_probs": [0.9] * NUM_EXAMPLES,
    })


def preference_kwargs() -> dict:
    """DPO-family arguments shared by both sides: reference log-probs precomputed before training (no reference
    model in memory), the same batches."""
    return dict(COMMON_ARGS, per_device_train_batch_size=batch(8), max_length=max_length(), learning_rate=1e-5,
                precompute_ref_log_probs=True)


def make_selfplay_case(config_cls, trainer_cls, **method_args):
    """``trainer_cls`` against TRL's DPOTrainer (sigmoid loss), both with precomputed reference log-probs; the
    candidate's base model (the lab model's own weights, loaded from its path) is precomputed too."""
    model_dir = benchmark_model()
    dataset = preference_dataset()

    def make_candidate():
        args = config_cls(**preference_kwargs(), base_model_name_or_path=model_dir, **method_args)
        return trainer_cls(model_dir, args=args, train_dataset=dataset)

    def make_baseline():
        return DPOTrainer(model_dir, args=DPOConfig(**preference_kwargs()), train_dataset=dataset)

    return make_candidate, make_baseline


def make_rspo_case():
    """RSPOTrainer (soft SPPO + λ·(IS-forward + reverse KL) to a precomputed base) against DPOTrainer."""
    return make_selfplay_case(RSPOConfig, RSPOTrainer, regularizers="forward_kl_is=0.01,reverse_kl=0.5")


def make_spin_case():
    """SPINTrainer (α-SPIN, α = 0.3, precomputed base) against DPOTrainer."""
    return make_selfplay_case(SPINConfig, SPINTrainer, alpha=0.3)


def make_alignment_case(harmful=None, **booster_args):
    """BoosterTrainer with ``booster_args`` against SFTTrainer on the lab safety-alignment data, batches of 10
    alignment (and 10 harmful) rows as in the paper."""
    model_dir = benchmark_model()
    alignment = prompts_lengthened(safety_alignment_dataset())
    harmful = prompts_lengthened(safety_harmful_dataset() if harmful is None else harmful)
    kwargs = dict(COMMON_ARGS, per_device_train_batch_size=batch(10), max_length=max_length(), learning_rate=1e-4)

    def make_candidate():
        args = BoosterConfig(**kwargs, harmful_batch_size=batch(10), **booster_args)
        return BoosterTrainer(model_dir, args=args, train_dataset=alignment, harmful_dataset=harmful)

    def make_baseline():
        return SFTTrainer(model=model_dir, args=SFTConfig(**kwargs), train_dataset=alignment)

    return make_candidate, make_baseline


def make_booster_case():
    """Booster (λ = 5, α = 0.1): two harmful passes and the alignment pass per step, as the paper's code."""
    return make_alignment_case(booster_lambda=5.0, booster_alpha=0.1)


def make_booster_equal_passes_case():
    """Booster's cost when a harmful batch costs what an alignment batch does (the paper's count of 3 equal passes):
    for timing only, the 'harmful' rows are alignment rows of the same length distribution. On the lab's real
    harmful data (the booster case) a harmful batch has about 4 times the answer tokens of an alignment batch."""
    return make_alignment_case(harmful=safety_alignment_dataset(seed=1), booster_lambda=5.0, booster_alpha=0.1)


def make_vaccine_case():
    """Vaccine (ρ = 2, no Booster): the hidden-gradient pass and the perturbed alignment pass."""
    return make_alignment_case(booster_lambda=0.0, vaccine_rho=2.0)


def make_lora_case(trainer_cls, **extra):
    """``trainer_cls`` with ``extra`` against SFTTrainer, both with the same LoRA adapter (r = 16 on every linear
    layer) on the lab arithmetic task."""
    model_dir = benchmark_model()
    dataset = prompts_lengthened(arithmetic_dataset(NUM_EXAMPLES))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def lora():
        return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)

    def make_candidate():
        return trainer_cls(model=model_dir, args=sft_config(), train_dataset=dataset, peft_config=lora(), **extra)

    def make_baseline():
        return SFTTrainer(model=model_dir, args=sft_config(), train_dataset=dataset, peft_config=lora())

    return make_candidate, make_baseline


def make_lora_dropout_case():
    """LoRA Dropout (p = 0.1, N = 1: the masks' hooks) against plain LoRA."""
    config = LoRADropoutConfig(lora_dropout_p=0.1, lora_dropout_train_samples=1)
    return make_lora_case(with_lora_dropout(SFTTrainer), lora_dropout=config)


def make_l1_case():
    """The ℓ1 penalty (λ1 = 0.01 on the LoRA entries) against plain LoRA."""
    return make_lora_case(with_l1_penalty(SFTTrainer), l1_lambda=0.01)


def make_sam_case():
    """SAM (ρ = 0.05) on LoRA against plain LoRA: one extra forward and backward per micro-batch."""
    return make_lora_case(with_weight_perturbation(SFTTrainer), weight_perturbation=WeightPerturbationConfig("sam"))


def make_gradient_norm_case():
    """Finite-difference gradient-norm regularization on LoRA against plain LoRA: SAM's passes plus the combination's
    hooks."""
    return make_lora_case(with_weight_perturbation(SFTTrainer),
                          weight_perturbation=WeightPerturbationConfig("gradient_norm"))


def make_l2sp_case():
    """L2-SP on the LoRA update ΔW = s·B·A (λ = 0.01) against plain LoRA: the closed-form gradient once a step."""
    return make_lora_case(with_anchor(SFTTrainer), anchor=AnchorConfig("l2sp", 0.01))


def make_ewc_case(decoupled: bool = False):
    """EWC on ΔW (λ = 100; the Fisher of 16 fact rows, estimated when the trainer is built, not timed) against plain
    LoRA; ``decoupled``: applied after the optimizer step (the least-squares B for the prox of ΔW)."""
    fisher = os.path.join(tempfile.mkdtemp(prefix="llmreg-bench-"), "fisher.safetensors")
    old = facts_dataset("retain").select_columns(["prompt", "completion"])
    anchor = AnchorConfig("ewc", 100.0, fisher_path=fisher, fisher_num_samples=16, anchor_decoupled=decoupled)
    return make_lora_case(with_anchor(SFTTrainer), anchor=anchor, fisher_dataset=old)


def make_ewc_decoupled_case():
    return make_ewc_case(decoupled=True)


def make_kl_to_base_case():
    """KL to the base (β = 0.5, the adapter disabled) on LoRA against plain LoRA: one more forward without gradients
    and the logits rebuilt from the last hidden state."""
    return make_lora_case(with_kl_to_base(SFTTrainer), kl_to_base=KLToBaseConfig(0.5))


def make_kl_to_base_top_k_case():
    """KL to the base (β = 0.5) against its top-32 log-probabilities, precomputed when the trainer is built (not
    timed), on LoRA against plain LoRA: no extra forward, the logits rebuilt from the last hidden state."""
    return make_lora_case(with_kl_to_base(SFTTrainer), kl_to_base=KLToBaseConfig(0.5, kl_to_base_top_k=32))


def make_reweight_case(baseline: str = "sft"):
    """ReweightTrainer (LinUpper, r = 1, no warmup) against SFTTrainer on the lab arithmetic task, or, with
    ``baseline="uniform"``, against ReweightTrainer with uniform weights (SFT's loss computed the same way), which
    isolates the weighting's own cost: SFTTrainer also computes its entropy and token-accuracy metrics every step."""
    model_dir = benchmark_model()
    dataset = prompts_lengthened(arithmetic_dataset(NUM_EXAMPLES))
    kwargs = dict(COMMON_ARGS, per_device_train_batch_size=batch(8), max_length=max_length(), learning_rate=1e-4)

    def make_candidate():
        args = ReweightConfig(**kwargs, reweight_strategy="linupper", reweight_r=1.0)
        return ReweightTrainer(model=model_dir, args=args, train_dataset=dataset)

    def make_baseline():
        if baseline == "uniform":
            args = ReweightConfig(**kwargs, reweight_strategy="uniform")
            return ReweightTrainer(model=model_dir, args=args, train_dataset=dataset)
        return SFTTrainer(model=model_dir, args=SFTConfig(**kwargs), train_dataset=dataset)

    return make_candidate, make_baseline


def make_reweight_vs_uniform_case():
    return make_reweight_case(baseline="uniform")


def make_reweight_step_scope_case():
    """LinUpper weighted over the whole optimizer step (``reweight_scope="step"``: one extra forward pass without
    gradients over the step's micro-batches) against the same weights per micro-batch, both with 4 micro-batches of 2
    rows per step: the price of the paper's minibatch under gradient accumulation."""
    model_dir = benchmark_model()
    dataset = prompts_lengthened(arithmetic_dataset(NUM_EXAMPLES))
    kwargs = dict(COMMON_ARGS, per_device_train_batch_size=batch(2), gradient_accumulation_steps=4,
                  max_length=max_length(), learning_rate=1e-4, reweight_strategy="linupper", reweight_r=1.0)

    def make(scope):
        return lambda: ReweightTrainer(model=model_dir, args=ReweightConfig(**kwargs, reweight_scope=scope),
                                       train_dataset=dataset)

    return make("step"), make("micro_batch")


CASES = {"sft": make_sft_case, "rpg": make_rpg_case, "rspo": make_rspo_case, "spin": make_spin_case,
         "booster": make_booster_case, "booster_equal_passes": make_booster_equal_passes_case,
         "vaccine": make_vaccine_case, "lora_dropout": make_lora_dropout_case, "l1": make_l1_case,
         "reweight": make_reweight_case, "reweight_vs_uniform": make_reweight_vs_uniform_case,
         "reweight_step_scope": make_reweight_step_scope_case, "sam": make_sam_case,
         "gradient_norm": make_gradient_norm_case, "l2sp": make_l2sp_case, "ewc": make_ewc_case,
         "ewc_decoupled": make_ewc_decoupled_case,
         "kl_to_base": make_kl_to_base_case, "kl_to_base_top_k": make_kl_to_base_top_k_case}

COLUMNS = [
    "case", "candidate", "baseline", "steps", "median ms cand", "median ms base", "time ratio",
    "peak MiB cand", "peak MiB base", "mem ratio", "tokens/s cand", "tokens/s base",
]


def table_row(case: str, result: dict) -> list[str]:
    candidate, baseline = result["candidate"], result["baseline"]
    return [
        case, candidate["trainer"], baseline["trainer"], str(result["steps"]),
        f"{candidate['median_ms']:.1f}", f"{baseline['median_ms']:.1f}", f"{result['time_ratio']:.2f}",
        f"{candidate['peak_mib']:.1f}", f"{baseline['peak_mib']:.1f}", f"{result['mem_ratio']:.2f}",
        *(f"{side['tokens_per_s']:.0f}" if side["tokens_per_s"] else "—" for side in (candidate, baseline)),
    ]


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--model", help="a model directory to benchmark instead of the lab model")
    parser.add_argument("--bf16", action="store_true", help="train both sides in bf16 (GPUs)")
    parser.add_argument("--batch-scale", type=int, default=1,
                        help="every per-device batch times this (8: about 1,900 tokens a step instead of 240)")
    args = parser.parse_args(argv)
    if args.batch_scale < 1:
        parser.error(f"--batch-scale must be >= 1, got {args.batch_scale}")
    SCALE["batch"] = args.batch_scale
    if args.threads:
        torch.set_num_threads(args.threads)
    global MODEL_DIR
    MODEL_DIR = args.model
    COMMON_ARGS["bf16"] = args.bf16

    print(f"device: {device_description()}, torch {torch.__version__}, model: {MODEL_DIR or 'the lab model'}"
          f"{', bf16' if args.bf16 else ''}{f', batches ×{args.batch_scale}' if args.batch_scale > 1 else ''}")
    rows = []
    for case in args.cases:
        make_candidate, make_baseline = CASES[case]()
        result = compare(
            make_candidate, make_baseline,
            rounds=args.rounds, steps_per_round=args.steps_per_round, warmup_steps=args.warmup,
        )
        rows.append(table_row(case, result))

    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(COLUMNS)]
    for row in [COLUMNS, ["-" * width for width in widths], *rows]:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
    if not torch.cuda.is_available():
        print("peak MiB on CPU is sampled process RSS: coarse, read the time ratio (see benchmarks/README.md).")


if __name__ == "__main__":
    main()
