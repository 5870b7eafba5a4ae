"""RPG variants next to GRPO on the lab arithmetic task: held-out accuracy before and after, same settings and seed.

    python benchmarks/rpg_lab.py                       # GRPO + RPG {ufkl, urkl} x {full, reinforce}, ~10 min on 2 CPUs
    python benchmarks/rpg_lab.py --variants grpo ufkl/full --max-steps 200

Every run starts from the lab model and uses the settings of ``recipes/rpg.py`` with no arguments (recipes/configs/
rpg_lab.yaml); GRPO is TRL's GRPOTrainer with its own defaults for what RPG changes (k3 KL off, clip (0.2, 0.2),
rewards scaled by the group std). The table is what docs/rpg.md reports.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import rpg as rpg_recipe
import torch
from trl import GRPOConfig, GRPOTrainer

from llmreg.lab import arithmetic_accuracy, arithmetic_dataset, arithmetic_reward, load_lab_model
from llmreg.rpg import RPGConfig, RPGTrainer


def run(variant: str, max_steps: int, seed: int) -> dict:
    # The recipe's no-argument settings, so the table describes what `accelerate launch recipes/rpg.py` does.
    _, _, recipe_args, _ = rpg_recipe.make_parser().parse_args_and_config([])
    shared = {
        name: getattr(recipe_args, name)
        for name in ("learning_rate", "per_device_train_batch_size", "num_generations", "max_completion_length",
                     "temperature", "steps_per_generation", "lr_scheduler_type", "warmup_steps")
    }
    shared.update(output_dir=tempfile.mkdtemp(prefix="rpg-lab-"), max_steps=max_steps, seed=seed, use_cpu=True,
                  bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
                  logging_steps=20, disable_tqdm=True)
    model, tokenizer = load_lab_model()
    dataset = arithmetic_dataset(2000, seed=0)
    if variant == "grpo":
        trainer = GRPOTrainer(model, arithmetic_reward, args=GRPOConfig(**shared), train_dataset=dataset,
                              processing_class=tokenizer)
        kl_key = None
    else:
        divergence, estimator = variant.split("/")
        args = RPGConfig(**shared, divergence=divergence, estimator=estimator)
        trainer = RPGTrainer(model, arithmetic_reward, args=args, train_dataset=dataset, processing_class=tokenizer)
        kl_key = f"rpg/{divergence}"
    before = arithmetic_accuracy(model, tokenizer, show_progress=False)
    started = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - started) / 60
    after = arithmetic_accuracy(trainer.model, tokenizer, show_progress=False)
    kls = [entry[kl_key] for entry in trainer.state.log_history if kl_key and kl_key in entry]
    return {"variant": variant, "before": before, "after": after,
            "kl": statistics.fmean(kls) if kls else float("nan"), "minutes": minutes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+",
                        default=["grpo", "ufkl/full", "urkl/full", "ufkl/reinforce", "urkl/reinforce"])
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.max_steps} steps, seed {args.seed}")
    print("| variant | held-out accuracy before | after | mean KL to reference | train minutes |")
    print("|---|---|---|---|---|")
    for variant in args.variants:
        result = run(variant, args.max_steps, args.seed)
        print(f"| {result['variant']} | {result['before']:.1f} % | {result['after']:.1f} % | {result['kl']:.2e} | "
              f"{result['minutes']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
