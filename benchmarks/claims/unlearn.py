"""Claim: CLEAR's ℓ1 penalty on the unlearning LoRA keeps the model's utility (retain accuracy) where GA, GD and NPO
alone destroy it, at similar forgetting (Dontsov et al. 2025, arXiv 2410.18057, Table 4).

    python benchmarks/claims/unlearn.py                  # the real lab model, 2 seeds (~10 minutes on 2 cores)
    python benchmarks/claims/unlearn.py --scale paper    # the lab's whole fact sets, 3 seeds (a GPU)
    python benchmarks/claims/unlearn.py --l1-lambda 0.01 --objectives ga npo    # CLEAR's λ1, two objectives
    python benchmarks/claims/unlearn.py -- --learning_rate 1e-3      # recipe options after --, for every arm

TOFU's setup as ``recipes/unlearn.py`` runs it (docs/unlearn.md), on ``llmreg/smollm2-135m``:

1. ``original``: the real model fully fine-tuned on facts about invented people (``llmreg/new-facts``: the forget
   and retain splits) and on real capitals it mostly knew already (``llmreg/world-facts``, kept in the fine-tune so
   that it keeps them), each fact in two wordings;
2. ``gold``: the same fine-tune without the forget split;
3. unlearning: a fresh LoRA (CLEAR's r = 8, α = 32, every linear layer, no dropout) on the original, trained on the
   forget split with GA, GD or NPO, without and with the ℓ1 penalty λ1·Σ|θ| on the adapter's entries (``--l1-lambda``,
   default 0.001).

Why λ1 = 0.001. Under AdamW an entry of B (which starts at 0) moves only while the loss's gradient on it outweighs
λ1; otherwise ℓ1 holds it at 0 (docs/unlearn.md). CLEAR's smallest value and the lab's headline one, 0.01, froze
98.6 % of ``llmreg/tiny``'s B entries under GA, so the adapter barely moved and nothing was forgotten. On the 2-layer
truncation of the real model (same widths), fine-tuned on the facts, GA's gradient on the fresh B entries (a batch of
4 forget rows, answer tokens) has median 3e-4, and 82 % of the entries are below 1e-3, 99.9 % below 1e-2: 0.01 would
pin all of B, as in the lab, while 0.001 pins most of it and leaves free the entries the forget set pulls hardest, a
sparse update: the regime where "similar forgetting" can be compared. ``--l1-lambda 0.01`` runs CLEAR's value.

The original and gold models are trained once, by the first arm's run (into its ``original/`` and ``gold/``, with
the first seed), and shared: every other arm runs the recipe with ``--finetune_epochs 0`` from them (``--gold_model``),
with copies of their evaluation stages, so the reference models are scored once and the seeds vary the unlearning
alone (the LoRA's initialization and the order of the forget rows), as in ``benchmarks/unlearn_lab.py``. A later run
with other objectives, λ1 or seeds starts from the fine-tunes already under its directory.

Sizes. ``--scale cpu``: 2 forget people (8 facts), 4 retain people (16 facts) and 8 capitals; the fine-tunes run 5
epochs at lr 3e-4 in batches of 8 (40 steps for the original, 30 for the gold; the lab's 15 epochs at 1e-3 are for its
1M-parameter model), the unlearning 10 epochs over the 8 forget facts (20 steps of 4 rows) at the lab's lr 1e-3, and
each model is scored on 8 questions of each set (all forget facts). ``--scale paper``: the lab's whole sets (5 forget
people, 45 retain, 40 capitals), 5 fine-tune epochs at 1e-4, 10 unlearning epochs (50 steps), every question scored.
At 6 epochs of 2e-4 (CLEAR's 1e-5 scaled up less) no objective moved the real model's forget accuracy off 100 %.

The 2-layer truncation ``llmreg/smollm2-135m-2layers`` (a loss of ~21 nats per answer token at the start; the real
model's is a few) learned nothing at 3 epochs of 3e-4 and a quarter of the forget facts at 6 epochs of 1e-3 (the smoke
test below), so the CPU scale's fine-tune is 5 epochs for the 30-layer model. The report says in bold when the
original's forget accuracy is not 25 points above the gold model's: then there was little to unlearn.

Duration at ``--scale cpu`` on 2 cores, one torch thread per process (from a LoRA step on 8 × 64 tokens of ~7.5 s and
greedy generation at ~28 tokens/s) it was estimated at ~26 minutes and took 9 (at 6 unlearning epochs): the first arm,
alone, about 5 minutes (the two fine-tunes, 70 full steps, 2.5 minutes with 2 threads; the scoring of the original,
the gold model and its own adapter, 24 questions each with their greedy answers and 5 answer likelihoods, most of the
rest), then the 11 other arms two at a time, under a minute each (start and model load, the unlearning steps of 4
forget rows, plus 4 retain rows for GD or a teacher pass for NPO, one scoring). ``OMP_NUM_THREADS=2`` in the
environment gives the first arm both cores (the others keep one each).

Reported per arm over seeds (mean ± standard error): forget, retain and world accuracy (greedy answers stating their
fact), log10 forget quality (the KS p-value of the forget truth ratios against the gold model's), model utility (the
harmonic mean of ROUGE-L, answer probability and truth-ratio score on the retain and world sets) and the share of the
adapter's B entries within one AdamW step (the learning rate) of 0, which ℓ1 holds there; the original and gold
models' rows; then, per objective, ℓ1's effect paired by seed (the ℓ1 arm minus the arm without, same seed). Each arm
runs ``recipes/unlearn.py`` into ``--output-dir/<scale>/<objective>_l1-<λ1>/seed<s>``; a rerun reuses finished arms.
Recipe options after ``--`` (or another ``--model``) put the arms under a directory of their own; the smoke test:

    python benchmarks/claims/unlearn.py --model llmreg/smollm2-135m-2layers --seeds 0 --jobs 1 \\
        --output-dir /tmp/unlearn_claims_smoke -- --finetune_epochs 6 --finetune_learning_rate 1e-3 \\
        --num_train_epochs 2 --num_eval_questions 4       # ~4 minutes on a busy 2-core CPU
"""

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from common import REAL_MODEL, RECIPES, claim_parser, default_jobs, fmt, parse_claim_args, run_arms, write_report


OBJECTIVES = ["ga", "gd", "npo"]
BY_COST = ["gd", "npo", "ga"]  # GD trains on a retain batch too, NPO runs the teacher too
# Rows of each question set, the first N (None: all): forget and retain facts of llmreg/new-facts (4 per person), world
# facts (capitals) of llmreg/world-facts.
FACTS = {"cpu": {"forget": 8, "retain": 16, "world": 8}, "paper": {"forget": None, "retain": None, "world": None}}
SIZES = {
    "cpu": {"finetune_epochs": 5, "finetune_learning_rate": 3e-4, "num_train_epochs": 10, "num_eval_questions": 8},
    "paper": {"finetune_epochs": 5, "finetune_learning_rate": 1e-4, "num_train_epochs": 10},
}
FINETUNE_OPTIONS = ("finetune_epochs", "finetune_learning_rate")  # the first arm's alone: it trains the fine-tunes
SETTINGS = ["--finetune_batch_size", "8", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4",
            "--lora_r", "8", "--lora_alpha", "32", "--lora_dropout", "0.0", "--max_length", "80",
            "--logging_steps", "2", "--disable_tqdm", "true"]
METRICS = [("forget_accuracy", "forget acc. (%)", 1), ("retain_accuracy", "retain acc. (%)", 1),
           ("world_accuracy", "world acc. (%)", 1), ("log10_forget_quality", "log10 forget quality", 2),
           ("model_utility", "model utility", 3), ("b_near_zero", "LoRA B entries near 0 (%)", 1)]
EFFECTS = ["forget_accuracy", "retain_accuracy", "world_accuracy", "model_utility", "log10_forget_quality"]


def facts_data(path: Path, sizes: dict) -> str:
    """The question sets as a dataset directory with the splits forget, retain and world: the first rows of
    ``llmreg/new-facts``' forget and retain splits (whole people, 4 facts each) and of ``llmreg/world-facts``."""
    from datasets import DatasetDict

    from llmreg.lab.facts import new_facts_dataset, world_facts_dataset

    if (path / "dataset_dict.json").is_file():
        return str(path)
    sets = {"forget": new_facts_dataset("forget"), "retain": new_facts_dataset("retain"),
            "world": world_facts_dataset("all")}
    DatasetDict({name: rows.select(range(min(sizes[name] or len(rows), len(rows))))
                 for name, rows in sets.items()}).save_to_disk(str(path))
    return str(path)


def arm_name(objective: str, l1_lambda: float) -> str:
    return objective + (f" + ℓ1 (λ1 = {l1_lambda:g})" if l1_lambda else "")


def b_near_zero(arm_dir: Path) -> float:
    """The share (%) of the unlearning adapter's B entries within one AdamW step (its learning rate) of 0: the
    entries ℓ1 holds at 0 oscillate there."""
    from safetensors.torch import load_file

    stage = arm_dir / "unlearned"
    learning_rate = json.loads((stage / "llmreg_stage.json").read_text())["settings"]["training"]["learning_rate"]
    tensors = [t for name, t in load_file(stage / "adapter_model.safetensors").items() if "lora_B" in name]
    return 100.0 * sum(int((t.abs() < learning_rate).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def with_log_quality(row: dict) -> dict:
    return {**row, "log10_forget_quality": math.log10(max(row["forget_quality"], 1e-300))}


def tables(reference: list[dict], arms: dict[tuple[str, float], list[dict]]) -> tuple[str, dict]:
    """The markdown tables and their numbers. ``reference``: the original's and the gold model's rows;
    ``arms``: (objective, λ1) -> its rows, one per seed in the same seed order for every arm, each row with the
    recipe's keys and ``b_near_zero``."""
    header = "| model | seeds | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [header, "|---|---|" + "---|" * len(METRICS)]
    summary = {"reference": {}, "arms": {}, "l1_effect": {}}
    for row in map(with_log_quality, reference):
        summary["reference"][row["model"]] = {key: row.get(key) for key, _, _ in METRICS}
        cells = ["—" if row.get(key) is None else f"{row[key]:.{digits}f}" for key, _, digits in METRICS]
        lines.append(f"| {row['model']} | 1 | " + " | ".join(cells) + " |")
    for (objective, l1_lambda), rows in arms.items():
        rows = [with_log_quality(row) for row in rows]
        values = {key: [row[key] for row in rows] for key, _, _ in METRICS}
        summary["arms"][arm_name(objective, l1_lambda)] = values
        lines.append(f"| {arm_name(objective, l1_lambda)} | {len(rows)} | "
                     + " | ".join(fmt(values[key], digits) for key, _, digits in METRICS) + " |")
    labels = {key: (label, digits) for key, label, digits in METRICS}
    effect = ["", "ℓ1's effect, paired by seed (the ℓ1 arm minus the arm without ℓ1, same seed):", "",
              "| objective | " + " | ".join(f"Δ {labels[key][0]}" for key in EFFECTS) + " |",
              "|---|" + "---|" * len(EFFECTS)]
    for objective, l1_lambda in arms:
        if not l1_lambda or (objective, 0.0) not in arms:
            continue
        with_l1, without = summary["arms"][arm_name(objective, l1_lambda)], summary["arms"][objective]
        deltas = {key: [a - b for a, b in zip(with_l1[key], without[key], strict=True)] for key in EFFECTS}
        summary["l1_effect"][arm_name(objective, l1_lambda)] = deltas
        effect.append(f"| {arm_name(objective, l1_lambda)} | "
                      + " | ".join(fmt(deltas[key], labels[key][1]) for key in EFFECTS) + " |")
    if summary["l1_effect"]:
        lines += effect
    return "\n".join(lines) + "\n", summary


def run_root(output_dir: Path, scale: str, model: str, extra: list[str]) -> Path:
    """Where the arms go: ``<scale>``, with the model's name and a digest of the recipe options added when they are
    not the defaults (a finished arm is reused by its directory, so other settings need their own)."""
    parts = [scale] + ([Path(model).name] if model != REAL_MODEL else [])
    if extra:
        parts.append(hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8])
    return output_dir / "-".join(parts)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = claim_parser(__doc__, default_seeds=[0, 1])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=OBJECTIVES)
    parser.add_argument("--l1-lambda", type=float, default=0.001, help="λ1 of the ℓ1 arms (default: 0.001).")
    args = parse_claim_args(parser, argv[:argv.index("--")] if "--" in argv else argv)
    if args.l1_lambda <= 0:
        parser.error("--l1-lambda must be > 0 (the arms without ℓ1 run anyway).")
    output_dir = args.output_dir or RECIPES.parent / "outputs" / "claims" / "unlearn"
    size, started = SIZES[args.scale], time.time()
    root = run_root(output_dir, args.scale, args.model, extra)
    data = facts_data(output_dir / f"facts_{args.scale}", FACTS[args.scale])
    arms = [(objective, l1_lambda) for objective in args.objectives for l1_lambda in (0.0, args.l1_lambda)]
    runs = []
    for seed in args.seeds:
        for objective, l1_lambda in arms:
            run_dir = root / f"{objective}_l1-{l1_lambda:g}" / f"seed{seed}"
            command = [str(RECIPES / "unlearn.py"), "--dataset_name", data, "--world_dataset_name", data,
                       "--world_dataset_split", "world", "--objective", objective, "--l1_lambda", str(l1_lambda),
                       "--seed", str(seed), "--output_dir", str(run_dir), *SETTINGS,
                       *[item for key, value in size.items() if key not in FINETUNE_OPTIONS
                         for item in (f"--{key}", str(value))]]
            runs.append({"name": f"{arm_name(objective, l1_lambda)}, seed {seed}", "command": command,
                         "log": run_dir.with_suffix(".log"), "done": run_dir / "unlearn_results.json",
                         "dir": run_dir, "objective": objective})
    # One arm's run fine-tunes the original and gold models (the first arm, unless an arm under root has them
    # already); every other arm starts from them.
    home = next((run for run in runs if (run["dir"] / "gold" / "model").is_dir()), None)
    trained = sorted(path.parent.parent for path in root.glob("*/seed*/gold/model"))
    source = home["dir"] if home else trained[0] if trained else runs[0]["dir"]
    first = home or (None if trained else runs[0])
    if first is not None:
        first["command"] += ["--model_name_or_path", args.model,
                             *[item for key in FINETUNE_OPTIONS for item in (f"--{key}", str(size[key]))], *extra]
        run_arms([first], 1)
    # The costliest first, so that the last two finish together.
    others = sorted((run for run in runs if run is not first), key=lambda run: BY_COST.index(run["objective"]))
    for run in others:
        run["command"] += [*extra, "--model_name_or_path", str(source / "original" / "model"),  # last: these win
                           "--finetune_epochs", "0", "--gold_model", str(source / "gold" / "model")]
        for model in ("original", "gold"):  # their scoring, done by that run, as a finished stage to reuse
            if (source / model / "eval").is_dir() and not (run["dir"] / model / "eval").exists():
                shutil.copytree(source / model / "eval", run["dir"] / model / "eval")
    run_arms(others, args.jobs or default_jobs())

    results = {}
    for run in runs:
        rows = json.loads(run["done"].read_text())["rows"]
        results.setdefault(run["name"].rsplit(", seed", 1)[0], []).append(
            {**rows[-1], "b_near_zero": b_near_zero(run["dir"])})
    reference = json.loads(runs[0]["done"].read_text())["rows"][:-1]  # the same original and gold in every run
    by_arm = {arm: results[arm_name(*arm)] for arm in arms}
    table, summary = tables(reference, by_arm)
    original, gold = reference[0]["forget_accuracy"], reference[-1]["forget_accuracy"]
    facts = {name: count or "all" for name, count in FACTS[args.scale].items()}
    finetune, unlearning = (json.loads((path / "llmreg_stage.json").read_text())["settings"]["training"]
                            for path in (source / "original", runs[0]["dir"] / "unlearned"))
    script = json.loads(runs[0]["done"].read_text())["settings"]["script"]
    wordings = " each in two wordings" if script["finetune_paraphrases"] else ""
    intro = (f"Model `{args.model}` fully fine-tuned on {facts['forget']} forget, {facts['retain']} retain and "
             f"{facts['world']} world facts,{wordings} ({finetune['num_train_epochs']:g} epochs at lr "
             f"{finetune['learning_rate']:g}; the gold model without the forget facts), then a fresh LoRA trained "
             f"{unlearning['num_train_epochs']:g} epochs on the forget facts per arm (lr "
             f"{unlearning['learning_rate']:g}, batches of {unlearning['per_device_train_batch_size']}); "
             f"{script['num_eval_questions'] or 'all'} questions scored per set; seeds "
             f"{', '.join(map(str, args.seeds))}; mean ± standard error over seeds"
             + (f"; recipe options `{' '.join(extra)}`" if extra else "") + ".\n")
    if original - gold < 25:
        intro += (f"\n**The original model did not learn the forget facts** (forget accuracy {original:.1f} % against "
                  f"the gold model's {gold:.1f} %): the unlearning arms have little to remove.\n")
    write_report(output_dir, f"unlearn_{root.name}", intro + "\n" + table,
                 {"seeds": args.seeds, "facts": FACTS[args.scale], "size": size, "settings": SETTINGS,
                  "extra": extra, "l1_lambda": args.l1_lambda, **summary}, started)
    return summary


if __name__ == "__main__":
    main()
