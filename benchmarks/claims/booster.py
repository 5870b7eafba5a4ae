"""Claim: Booster's alignment lowers the harmful score after a customer's harmful fine-tune, at the same fine-tune
accuracy, against SFT and Vaccine (Huang et al., ICLR 2025, arXiv 2409.01586: 22.64 % lower on average over p,
Llama-2-7B with LoRA).

    python benchmarks/claims/booster.py                  # the real lab model, 1 seed (about 45 minutes on 2 cores)
    python benchmarks/claims/booster.py --seeds 0 1      # the docs' table: standard errors over seeds (about 90)
    python benchmarks/claims/booster.py --scale paper    # the paper's steps, epochs and rates, 3 seeds (a GPU)

The fine-tuning-as-a-service pipeline (``recipes/ftaas.py``) on ``llmreg/smollm2-135m`` with the paper's adapter
(LoRA r = 32, lora_alpha = 4 on q/k/v): align with SFT, Vaccine (ρ = 2) and Booster (the paper's λ = 5 at α = 0.1,
the paper's, 0.03, and 0.01, the tiny lab's protective α), then let a customer fine-tune on the lab sentiment task
with a share p ∈ {0, 0.1, 0.2} of harmful samples, and score the harmful share of answers to held-out harmful prompts
and the task accuracy. Two handlings of the customer's adapter, from the same alignments:

- ``lora`` (the paper's): Booster's customer keeps training the alignment adapter; SFT's and Vaccine's get a fresh
  adapter on the merged aligned model;
- ``lora-alike`` (symmetric): every customer gets a fresh adapter on its merged aligned model.

The first-order check along the alignment: the logged drop h(w) − h(w̃) over its first-order value α‖∇h‖ (near 1:
the simulated harmful step is a small step on h; near 0 or below: it overshoots).

Learning rates are scaled to the CPU run's few steps (30 alignment steps, 30 of the customer's; the paper: about
10,000 and 2,000): alignment 1e-3, which takes SFT's harmful score from the model's 70 % to 0 %; the customer's
3e-4, where SFT's harmful score goes from 6 % at p = 0 to 27 % at p = 0.2 (seed 0; at 1e-4 it stays at 4 % at
p = 0.2; at 1e-3 the benign fine-tune alone undoes the alignment, 81 % at p = 0). ``--scale paper`` uses the paper's
5e-4 and 1e-5. The runs and tables are ``benchmarks/booster_lab.py``'s, into ``--output-dir/<scale>``; a rerun
reuses finished runs.
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import claim_parser, default_jobs, parse_claim_args, write_report


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import booster_lab  # benchmarks/booster_lab.py: the runs and their tables


SETTINGS = ["lora", "lora-alike"]
VARIANTS = ["SFT", "Vaccine ρ=2", *(booster_lab.booster_name(5.0, alpha) for alpha in (0.1, 0.03, 0.01))]
SIZES = {
    "cpu": ["--max_steps", "30", "--per_device_train_batch_size", "8", "--harmful_batch_size", "8",
            "--learning_rate", "1e-3", "--num_finetune_samples", "120", "--finetune_epochs", "2",
            "--finetune_batch_size", "8", "--finetune_learning_rate", "3e-4", "--num_eval_samples", "48",
            "--max_new_tokens", "24"],
    "paper": ["--max_steps", "10000", "--per_device_train_batch_size", "10", "--harmful_batch_size", "10",
              "--learning_rate", "5e-4", "--weight_decay", "0.1", "--num_finetune_samples", "1000",
              "--finetune_epochs", "20", "--finetune_batch_size", "10", "--finetune_learning_rate", "1e-5",
              "--num_eval_samples", "1000", "--max_new_tokens", "128"],
}


def main(argv=None) -> dict:
    parser = claim_parser(__doc__, default_seeds=[0])
    args = parse_claim_args(parser, argv)
    output_dir = (args.output_dir or booster_lab.REPO / "outputs" / "claims" / "booster") / args.scale
    extra = ("--model_name_or_path", args.model, *SIZES[args.scale])
    started = time.time()
    plan = [(setting, variant, seed) for setting in SETTINGS for variant in VARIANTS for seed in args.seeds]
    # Runs another setting already holds (SFT and Vaccine of lora-alike are lora's) are listed once; the alignments
    # lora-alike shares with lora must exist first, so lora's runs go first (and the pool keeps that order).
    unique = list(dict.fromkeys((booster_lab.SHARED.get((s, v), s), v, seed) for s, v, seed in plan))
    first = [job for job in unique if job[0] == "lora"]
    with ThreadPoolExecutor(args.jobs or default_jobs()) as pool:
        list(pool.map(lambda job: booster_lab.run(*job, output_dir, extra), first))
        list(pool.map(lambda job: booster_lab.run(*job, output_dir, extra), [j for j in unique if j not in first]))

    runs = {setting: {variant: [booster_lab.read_run(booster_lab.directory(output_dir, setting, variant, seed))
                                for seed in args.seeds] for variant in VARIANTS} for setting in SETTINGS}
    intro = (f"Model `{args.model}`, LoRA r = 32, lora_alpha = 4 on q/k/v; options `{' '.join(extra[2:])}`; "
             f"seeds {', '.join(map(str, args.seeds))}; mean ± standard error over seeds (none with one seed). "
             "Harmful score: % of held-out harmful prompts answered harmfully (greedy, the lab's judge).\n")
    text = [intro]
    text += [booster_lab.results_table(setting, runs[setting]) for setting in SETTINGS]
    text.append("The first-order check along the alignment, (h(w) − h(w̃)) / (α‖∇h‖) from the logged means:\n\n"
                + booster_lab.first_order_table(runs))
    write_report(output_dir.parent, f"booster_{args.scale}", "\n".join(text),
                 {"seeds": args.seeds, "options": list(extra), "runs": runs}, started)
    return runs


if __name__ == "__main__":
    main()
