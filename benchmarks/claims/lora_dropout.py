"""Claim: LoRA Dropout, with its test-time ensemble, generalizes and calibrates better than LoRA when LoRA overfits
(Lin et al. 2024, arXiv 2404.09610: GLUE/SQuAD accuracy, ECE, LLaMA2-7B MMLU after Alpaca).

    python benchmarks/claims/lora_dropout.py                  # the real lab model, 2 seeds (~16 minutes on 2 cores)
    python benchmarks/claims/lora_dropout.py --task sentiment # the lab's sentiment task instead (as easy as it gets)
    python benchmarks/claims/lora_dropout.py --scale paper    # more data and epochs, 3 seeds (a GPU)

LoRA (r = 16, lora_alpha = 32, on every linear layer of ``llmreg/smollm2-135m``) fine-tuned on a split small enough
to overfit, without and with LoRA Dropout (p = 0.2 on A's input and B's output dimensions, N = 2 masks
per training forward), from the same weights on the same rows and order (``--seed``). Scored on held-out rows: the
loss, and the accuracy and expected calibration error (ECE, 10 bins) of classifying each row by the likelihood of
each answer — for LoRA Dropout with one pass of the expected adapter and with the ensemble of 8 masks (the paper's
test-time ensemble). Tasks (``--task``):

- ``parity`` (the default): "Is 37 + 48 even or odd?", answered "even" or "odd" — a rule the real model does not
  know, which 16 rows can be memorized without learning, so LoRA overfits;
- ``sentiment``: the lab's sentiment reviews ("positive" / "negative"), which the real model classifies almost
  perfectly after a few steps: a ceiling, not an overfitting regime.

Reported over seeds (mean ± standard error), with each arm's difference from LoRA of the same seed. Runs
``recipes/lora_dropout.py`` per seed into ``--output-dir/<scale>/seed<s>``; a rerun reuses finished runs.
"""

import json
import random
import time
from pathlib import Path

from common import RECIPES, claim_parser, default_jobs, fmt, parse_claim_args, run_arms, write_report


SIZES = {
    "cpu": {"num_train_samples": 16, "num_train_epochs": 20, "num_eval_samples": 100},
    "paper": {"num_train_samples": 256, "num_train_epochs": 20, "num_eval_samples": 1000},
}
SETTINGS = ["--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--lora_dropout_p", "0.2",
            "--lora_dropout_train_samples", "2", "--lora_dropout_eval_samples", "8", "--logging_steps", "5",
            "--per_device_eval_batch_size", "16"]
METRICS = [("heldout_loss", "held-out loss", 4), ("accuracy", "accuracy (%)", 1), ("ece", "ECE (%)", 1)]


TASKS = {"parity": ["even", "odd"], "sentiment": ["positive", "negative"]}


def parity_dataset(path: Path) -> str:
    """The parity task as a dataset directory (train: 256 rows, test: 1000 rows, disjoint seeds): "Is a + b even or
    odd?" for two-digit a and b, in the lab's conversational prompt/completion format with a ``label`` column."""
    from datasets import Dataset, DatasetDict

    if (path / "dataset_dict.json").is_file():
        return str(path)

    def rows(count: int, split: str) -> Dataset:
        rng, data = random.Random(f"parity-{split}"), {"prompt": [], "completion": [], "label": []}
        for _ in range(count):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            label = "even" if (a + b) % 2 == 0 else "odd"
            data["prompt"].append([{"role": "user", "content": f"Is {a} + {b} even or odd? Answer with one word: "
                                                               "even or odd."}])
            data["completion"].append([{"role": "assistant", "content": label}])
            data["label"].append(label)
        return Dataset.from_dict(data)

    DatasetDict({"train": rows(256, "train"), "test": rows(1000, "test")}).save_to_disk(str(path))
    return str(path)


def arm_name(row: dict) -> str:
    if row["model"] == "LoRA":
        return "LoRA"
    return f"{row['model']}, " + (f"ensemble of {row['ensemble']} masks" if row["ensemble"] else "one pass")


def main(argv=None) -> dict:
    parser = claim_parser(__doc__, default_seeds=[0, 1])
    parser.add_argument("--task", choices=list(TASKS), default="parity")
    args = parse_claim_args(parser, argv)
    output_dir = args.output_dir or RECIPES.parent / "outputs" / "claims" / "lora_dropout"
    size = SIZES[args.scale]
    started = time.time()
    dataset = (parity_dataset(output_dir / "parity_data") if args.task == "parity" else "llmreg/sentiment")
    runs = []
    for seed in args.seeds:
        run_dir = output_dir / args.task / args.scale / f"seed{seed}"
        command = [str(RECIPES / "lora_dropout.py"), "--model_name_or_path", args.model, "--seed", str(seed),
                   "--output_dir", str(run_dir), "--dataset_name", dataset, "--label_choices", *TASKS[args.task],
                   *SETTINGS,
                   *[item for key, value in size.items() for item in (f"--{key}", str(value))]]
        runs.append({"name": f"seed {seed}", "command": command, "log": run_dir.with_suffix(".log"),
                     "done": run_dir / "lora_dropout_results.json"})
    run_arms(runs, args.jobs or default_jobs())

    results = [{arm_name(row): row for row in json.loads(run["done"].read_text())} for run in runs]
    arms = list(results[0])
    intro = (f"Task `{args.task}`; model `{args.model}` with LoRA, {size['num_train_samples']} training rows for "
             f"{size['num_train_epochs']} epochs, {size['num_eval_samples']} held-out rows; seeds "
             f"{', '.join(map(str, args.seeds))}; mean ± standard error over seeds; Δ = the arm minus LoRA of the "
             "same seed.\n")
    header = "| arm | " + " | ".join(f"{label} | Δ" for _, label, _ in METRICS) + " |"
    lines = [intro, header, "|---" * (1 + 2 * len(METRICS)) + "|"]
    summary = {}
    for arm in arms:
        cells, summary[arm] = [], {}
        for key, _, digits in METRICS:
            values = [seed[arm][key] for seed in results]
            deltas = [seed[arm][key] - seed["LoRA"][key] for seed in results]
            summary[arm][key] = {"values": values, "deltas": deltas}
            cells += [fmt(values, digits), "—" if arm == "LoRA" else fmt(deltas, digits)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    write_report(output_dir, f"lora_dropout_{args.task}_{args.scale}", table,
                 {"task": args.task, "seeds": args.seeds, "size": size, "settings": SETTINGS, "arms": summary},
                 started)
    return summary


if __name__ == "__main__":
    main()
