"""Claim: loss-based sample reweighting (LinUpper) reaches uniform weighting's loss sooner (Sow et al., ICLR 2025).

    python benchmarks/claims/reweight.py                  # the real lab model, 2 seeds (~15 minutes on 2 cores)
    python benchmarks/claims/reweight.py --scale paper    # longer, bigger batches, 3 seeds (a GPU)

Continued pretraining of ``llmreg/smollm2-135m`` (full fine-tuning, as the paper pretrains) on the lab corpus (60 %
informative, 25 % near-duplicate, 15 % noisy text), with uniform weights (the baseline), LinUpper (the paper's main
method) and Quadratic, each from the same weights on the same batches (the recipe's ``--seed`` orders the data), at
the code's default temperature r = 1. The paper's learning rate (5e-4, pretraining GPT-2 from scratch) is lowered
for continuing a trained model: 5e-5 with cosine decay. Held-out loss on fresh informative text along training.

Reported per strategy, over seeds (mean ± standard error): the final held-out loss, its difference from uniform's
(paired by seed), how many seeds reached uniform's final held-out loss, and at what share of uniform's steps.
Runs ``recipes/reweight.py`` per seed into ``--output-dir/<scale>/seed<s>``; a rerun reuses finished runs.

Where the weight goes: on the first training rows, the starting model's mean loss per kind of text and the share of
each strategy's weight that each kind receives (batches of the training size; uniform gives each kind its share of
rows).
"""

import json
import statistics
import time

from common import RECIPES, claim_parser, default_jobs, fmt, parse_claim_args, run_arms, write_report


STRATEGIES = ["uniform", "linupper", "quadratic"]
SIZES = {
    "cpu": {"max_steps": 60, "per_device_train_batch_size": 8, "eval_steps": 10, "num_eval_samples": 64},
    "paper": {"max_steps": 2000, "per_device_train_batch_size": 32, "eval_steps": 100, "num_eval_samples": 500},
}
SETTINGS = ["--learning_rate", "5e-5", "--lr_scheduler_type", "cosine", "--warmup_steps", "5", "--reweight_r", "1.0",
            "--max_length", "64", "--from_scratch", "false", "--per_device_eval_batch_size", "32",
            "--logging_steps", "10"]


def weight_by_kind(model_name: str, num_rows: int, batch_size: int, r: float = 1.0) -> dict:
    """On the first ``num_rows`` training rows, at the starting model: each kind's mean per-sample loss, and each
    strategy's average share of a batch's weight that goes to each kind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmreg.lab import corpus_dataset, resolve_model_name_or_path
    from llmreg.losses.reweighting import per_sample_losses, sample_weights

    path = resolve_model_name_or_path(model_name)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    rows = corpus_dataset(num_rows)
    losses = []
    with torch.no_grad():
        for start in range(0, num_rows, batch_size):
            batch = tokenizer(rows["text"][start:start + batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=64)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            losses.append(per_sample_losses(model(**batch).logits, labels)[0])
    kinds, flat = rows["kind"], torch.cat(losses).tolist()
    result = {"mean_loss": {kind: statistics.fmean(loss for loss, k in zip(flat, kinds) if k == kind)
                            for kind in dict.fromkeys(kinds)}}
    for strategy in STRATEGIES:
        shares = dict.fromkeys(result["mean_loss"], 0.0)
        for index, batch_losses in enumerate(losses):
            weights = sample_weights(batch_losses, strategy, r=r)
            for weight, kind in zip(weights.tolist(), kinds[index * batch_size:(index + 1) * batch_size]):
                shares[kind] += weight / len(losses)
        result[strategy] = shares
    return result


def main(argv=None) -> dict:
    parser = claim_parser(__doc__, default_seeds=[0, 1])
    args = parse_claim_args(parser, argv)
    output_dir = args.output_dir or RECIPES.parent / "outputs" / "claims" / "reweight"
    size = SIZES[args.scale]
    started = time.time()
    runs = []
    for seed in args.seeds:
        run_dir = output_dir / args.scale / f"seed{seed}"
        command = [str(RECIPES / "reweight.py"), "--model_name_or_path", args.model, "--strategies", *STRATEGIES,
                   "--seed", str(seed), "--output_dir", str(run_dir), *SETTINGS,
                   *[item for key, value in size.items() for item in (f"--{key}", str(value))]]
        runs.append({"name": f"seed {seed}", "command": command, "log": run_dir.with_suffix(".log"),
                     "done": run_dir / "reweight_results.json"})
    run_arms(runs, args.jobs or default_jobs())

    results = [{row["strategy"]: row for row in json.loads(run["done"].read_text())} for run in runs]
    intro = (f"Model `{args.model}`, {size['max_steps']} steps of {size['per_device_train_batch_size']} rows, "
             f"held-out loss on {size['num_eval_samples']} rows every {size['eval_steps']} steps; seeds "
             f"{', '.join(map(str, args.seeds))}; mean ± standard error over seeds.\n")
    header = ("| strategy | held-out loss at start | final held-out loss | final − uniform's (paired) | seeds "
              "reaching uniform's final loss | share of uniform's steps |")
    lines = [intro, header, "|---|---|---|---|---|---|"]
    summary = {}
    for strategy in STRATEGIES:
        finals = [seed[strategy]["final_heldout_loss"] for seed in results]
        starts = [seed[strategy]["curve"][0][1] for seed in results]
        differences = [seed[strategy]["final_heldout_loss"] - seed["uniform"]["final_heldout_loss"]
                       for seed in results]
        shares = [seed[strategy]["steps_to_uniform_final"] / seed[strategy]["uniform_steps"] for seed in results
                  if seed[strategy]["steps_to_uniform_final"] is not None and seed[strategy]["uniform_steps"]]
        summary[strategy] = {"final": finals, "start": starts, "difference": differences, "shares": shares,
                             "curves": [seed[strategy]["curve"] for seed in results]}
        lines.append(f"| {strategy} | {fmt(starts, 4)} | {fmt(finals, 4)} | "
                     f"{'—' if strategy == 'uniform' else fmt(differences, 4)} | {len(shares)} of {len(results)} | "
                     f"{fmt(shares, 2) if shares else '—'} |")
    by_kind = weight_by_kind(args.model, num_rows=256, batch_size=size["per_device_train_batch_size"])
    kinds = list(by_kind["mean_loss"])
    where = (f"Where the weight goes, at the starting model on the first 256 training rows (batches of "
             f"{size['per_device_train_batch_size']}):\n")
    lines += ["", where, "| | " + " | ".join(kinds) + " |",
              "|---" * (len(kinds) + 1) + "|",
              "| mean loss (nats/token) | " + " | ".join(f"{by_kind['mean_loss'][k]:.2f}" for k in kinds) + " |"]
    lines += [f"| {strategy}: share of the weight | " + " | ".join(f"{by_kind[strategy][k]:.2f}" for k in kinds)
              + " |" for strategy in STRATEGIES]
    table = "\n".join(lines) + "\n"
    write_report(output_dir, f"reweight_{args.scale}", table, {"seeds": args.seeds, "size": size,
                                                               "settings": SETTINGS, "strategies": summary,
                                                               "weight_by_kind": by_kind}, started)
    return summary


if __name__ == "__main__":
    main()
