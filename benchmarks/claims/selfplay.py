"""Claims of the regularized self-play papers, on the real lab model, per iteration:

- RSPO (Tang et al. 2025, "Game-Theoretic Regularized Self-Play Alignment of LLMs"): adding a reverse-KL (or
  IS-forward + reverse) regularizer to SPPO keeps the policy closer to the base and its responses shorter, at an
  equal or better win rate — measured against a judge with something to over-optimise;
- α-SPIN and fictitious play (KL-regularized SPIN: the geometric-mixture opponent, and the opponent over the last
  iterates): the policy stays closer to the base than SPIN's, at an equal accuracy.

    python benchmarks/claims/selfplay.py --method rspo    # SPPO vs RSPO (λ = 0.5), 2 seeds (~25 min, 2 cores)
    python benchmarks/claims/selfplay.py --method spin    # SPIN vs α-SPIN, 2 seeds (~16 minutes)
    python benchmarks/claims/selfplay.py --method spin --arms SPIN "SPIN history 2 (data)"   # any arm of ARMS
    python benchmarks/claims/selfplay.py --method rspo --scale paper   # more prompts and iterations (a GPU)

Each arm is ``recipes/rspo.py`` or ``recipes/spin.py`` on ``llmreg/smollm2-135m`` (full fine-tuning, as the papers),
on the lab arithmetic prompts (two worked examples, then "What is 37 + 48?"), from the same weights on the same
prompts and samples of the base (``--seed``). The learning rate and η = 1/β are the lab's, scaled to a few steps per
iteration of a 135M model (see SETTINGS); every arm of a method shares them and differs only in its regularizer.

- RSPO arms are judged, in training and for the win rate, by ``llmreg.lab.length_biased_arithmetic_reward``: the
  rule judge (1 for the right number) plus 0.02 per word, up to 50 words — a reward-model-like judge that a longer
  answer pleases. The accuracy column is the rule judge's on the same responses: a win rate bought with length shows
  as a win rate that rises while accuracy does not.
- SPIN needs no judge to train; its win rate and accuracy are the rule judge's.

Per iteration, on held-out prompts, one response each sampled at temperature 1 (so the mean log-ratio estimates
KL(π_t ‖ π_base)): the win rate against the base model's responses (the judge's Bradley–Terry preference), the
accuracy, the KL to the base (nats per response) and the mean response length (tokens). Reported over seeds (mean ±
standard error), with each arm's paired difference from SPPO's / SPIN's at the last iteration. Runs go into
``--output-dir/<method>/<scale>/<arm>/seed<s>``; a rerun reuses finished runs (the loop resumes its stages).
"""

import json
import sys
import time
from pathlib import Path

from common import RECIPES, claim_parser, default_jobs, fmt, parse_claim_args, run_arms, write_report


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfplay_lab import ABLATIONS as ARMS  # the tiny lab's arms: the same options on the real model


BASELINE = {"rspo": "SPPO", "spin": "SPIN"}
CPU_ARMS = {"rspo": ["SPPO", "RSPO reverse KL (λ=0.5)"], "spin": ["SPIN", "α-SPIN (α=0.5)"]}
# Per method and scale. At the CPU scale, prompts whose K responses tie (same correctness and word count) give no
# pair: about 60 % of RSPO's, hence its larger slice; SPIN pairs every prompt with its real answer.
SIZES = {
    "rspo": {"cpu": {"iterations": 2, "prompts_per_iteration": 96, "num_eval_prompts": 48},
             "paper": {"iterations": 3, "prompts_per_iteration": 1024, "num_eval_prompts": 500}},
    "spin": {"cpu": {"iterations": 2, "prompts_per_iteration": 64, "num_eval_prompts": 48},
             "paper": {"iterations": 3, "prompts_per_iteration": 1024, "num_eval_prompts": 500}},
}
SHARED = ["--max_new_tokens", "32", "--temperature", "1.0", "--top_p", "1.0", "--generation_batch_size", "32",
          "--judge_temperature", "0.1", "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
          "--max_grad_norm", "1.0", "--learning_rate", "1e-5", "--logging_steps", "4"]
SETTINGS = {
    "rspo": [*SHARED, "--num_samples", "4", "--sppo_variant", "soft", "--beta", "0.1",
             "--judge", "reward_func:llmreg.lab.length_biased_arithmetic_reward"],
    "spin": [*SHARED, "--loss_type", "sigmoid", "--beta", "0.1",
             "--judge", "reward_func:llmreg.lab.arithmetic_reward"],
}
METRICS = [("win_rate_vs_base", "win rate vs base (%)", 1), ("accuracy", "accuracy (%)", 1),
           ("kl_to_base", "KL to base (nats)", 3), ("mean_length", "length (tokens)", 1)]


def slug(arm: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in arm).strip("_")


def with_accuracy(run_dir, rows: list[dict], answers: list[str]) -> list[dict]:
    """The loop's summary rows, each with the rule judge's accuracy (%) of its held-out responses."""
    from llmreg.lab import is_correct

    for row in rows:
        samples = [json.loads(line) for line in (run_dir / row["model"] / "eval_samples.jsonl").read_text()
                   .splitlines()]
        texts = [group[0]["text"] for group in samples]
        row["accuracy"] = 100.0 * sum(map(is_correct, texts, answers[:len(texts)])) / len(texts)
    return rows


def main(argv=None) -> dict:
    parser = claim_parser(__doc__, default_seeds=[0, 1])
    parser.add_argument("--method", choices=list(ARMS), required=True)
    parser.add_argument("--arms", nargs="+", default=None,
                        help="Arms by name (ARMS in this file). Default: the baseline and the main regularizer "
                             "(cpu), every arm (paper).")
    args = parse_claim_args(parser, argv)
    output_dir = (args.output_dir or RECIPES.parent / "outputs" / "claims" / "selfplay") / args.method / args.scale
    size = SIZES[args.method][args.scale]
    started = time.time()
    runs = []
    arms = args.arms or (CPU_ARMS[args.method] if args.scale == "cpu" else list(ARMS[args.method]))
    unknown = sorted(set(arms) - set(ARMS[args.method]))
    if unknown:
        parser.error(f"unknown arms for {args.method}: {unknown}; valid: {list(ARMS[args.method])}")
    for arm in arms:
        options = ARMS[args.method][arm]
        for seed in args.seeds:
            run_dir = output_dir / slug(arm) / f"seed{seed}"
            command = [str(RECIPES / f"{args.method}.py"), "--model_name_or_path", args.model, "--seed", str(seed),
                       "--output_dir", str(run_dir), *SETTINGS[args.method], *options,
                       *[item for key, value in size.items() for item in (f"--{key}", str(value))]]
            runs.append({"name": f"{arm} seed {seed}", "arm": arm, "seed": seed, "command": command,
                         "log": run_dir.with_suffix(".log"), "done": run_dir / "summary.json"})
    run_arms(runs, args.jobs or default_jobs())

    from llmreg.lab import load_lab_dataset, resolve_model_name_or_path
    from llmreg.lab.prompts import prompt_style_of

    style = prompt_style_of(resolve_model_name_or_path(args.model))
    answers = load_lab_dataset("llmreg/arithmetic", split="test", style=style)["answer"]
    results: dict[str, list[list[dict]]] = {}
    for run in runs:
        rows = with_accuracy(run["done"].parent, json.loads(run["done"].read_text()), answers)
        results.setdefault(run["arm"], []).append(rows)
    baseline = BASELINE[args.method]
    intro = (f"Model `{args.model}` (full fine-tuning), {size['iterations']} iterations of "
             f"{size['prompts_per_iteration']} prompts, evaluated on {size['num_eval_prompts']} held-out prompts "
             f"(one response each at temperature 1); seeds {', '.join(map(str, args.seeds))}; mean ± standard error "
             "over seeds.\n")
    lines = [intro, "| arm | model | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    summary = {}
    for arm, seeds in results.items():
        summary[arm] = {}
        for index, model in enumerate(row["model"] for row in seeds[0]):
            values = {key: [rows[index][key] for rows in seeds] for key, _, _ in METRICS}
            summary[arm][model] = values
            lines.append(f"| {arm} | {model} | " + " | ".join(fmt(values[key], digits) for key, _, digits in METRICS)
                         + " |")
    last = f"iter_{size['iterations']}"
    lines += ["", f"Each arm minus {baseline}, at {last}, paired by seed:", "",
              "| arm | " + " | ".join(label for _, label, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for arm in results:
        if arm == baseline:
            continue
        cells = [fmt([a - b for a, b in zip(summary[arm][last][key], summary[baseline][last][key])], digits)
                 for key, _, digits in METRICS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    write_report(output_dir.parent, f"{args.method}_{args.scale}", table,
                 {"seeds": args.seeds, "size": size, "settings": SETTINGS[args.method], "arms": summary}, started)
    return summary


if __name__ == "__main__":
    main()
