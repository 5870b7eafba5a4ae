"""Booster on the lab: harmful score after the customer's fine-tune, SFT- vs Booster-aligned, over λ, α and seeds.

    python benchmarks/booster_lab.py                           # every variant, seeds 0 and 1 (~30 min on 2 cores)
    python benchmarks/booster_lab.py --variants SFT "Booster λ=5 α=0.1" --seeds 0

Every run is ``recipes/ftaas.py`` with its no-argument lab settings (full fine-tuning; customer data of 400 samples)
plus the variant's options, ``--harmful_ratios`` and ``--seed``, run as a subprocess into
``--output-dir/<variant>/seed<s>``; a rerun skips finished runs (the pipeline resumes). The table (mean over seeds and
each seed) is what docs/booster.md reports; it is also written to ``--output-dir/booster_lab.md``. The last column is
the alignment's final gap h(w) − h(w̃) (its last logged value), the quantity Booster minimizes.

A second table describes the aligned models themselves (before any fine-tune), averaged over seeds: the harmful loss
h and the alignment loss f on held-out rows (200 each), the norm of ∇h on those harmful rows, and the distance of the
weights from the SFT-aligned model of the same seed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "SFT": ["--methods", "sft"],
    "Booster λ=5 α=0.1": ["--methods", "booster"],
    "Booster λ=5 α=0.01": ["--methods", "booster", "--booster_alpha", "0.01"],
    "Booster λ=5 α=0.001": ["--methods", "booster", "--booster_alpha", "0.001"],
    "Booster λ=1 α=0.01": ["--methods", "booster", "--booster_lambda", "1", "--booster_alpha", "0.01"],
    "Vaccine ρ=2": ["--methods", "vaccine", "--vaccine_rho", "2"],
    "Booster + Vaccine λ=5 α=0.1 ρ=2": ["--methods", "booster_vaccine", "--vaccine_rho", "2"],
}


def directory(output_dir: Path, variant: str, seed: int) -> Path:
    return output_dir / "".join(c if c.isalnum() else "_" for c in variant) / f"seed{seed}"


def run(variant: str, options: list[str], ratios: list[float], seed: int, output_dir: Path) -> dict:
    run_dir = directory(output_dir, variant, seed)
    results = run_dir / "results.json"
    if not results.exists():
        command = [sys.executable, str(REPO / "recipes" / "ftaas.py"), "--output_dir", str(run_dir),
                   "--seed", str(seed), "--harmful_ratios", *map(str, ratios), *options]
        print("running", " ".join(command), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads(results.read_text())["rows"]
    method = rows[0]["method"]
    history = json.loads((run_dir / "align" / method / "log_history.json").read_text())
    gaps = [entry["booster/gap"] for entry in history if "booster/gap" in entry]
    return {"rows": rows, "gap": gaps[-1] if gaps else None}


def table(results: dict[str, list[dict]], ratios: list[float]) -> str:
    ratio_names = " / ".join(f"{p:g}" for p in ratios)
    header = (f"| variant | harmful score at p = {ratio_names} (%) | fine-tune accuracy (%) | per seed: harmful score "
              "| final gap h(w) − h(w̃) |")
    lines = [header, "|---|---|---|---|---|"]
    for variant, runs in results.items():
        def cells(run: dict, key: str) -> list[float]:
            return [row[key] for row in run["rows"] if row["stage"] == "fine-tuned"]

        harm = [statistics.fmean(values) for values in zip(*(cells(r, "harmful_score") for r in runs))]
        accuracy = [statistics.fmean(values) for values in zip(*(cells(r, "finetune_accuracy") for r in runs))]
        seeds = "; ".join(" / ".join(f"{v:.1f}" for v in cells(r, "harmful_score")) for r in runs)
        gaps = [r["gap"] for r in runs if r["gap"] is not None]
        gap = f"{statistics.fmean(gaps):.3f}" if gaps else "—"
        lines.append(f"| {variant} | {' / '.join(f'{v:.1f}' for v in harm)} | "
                     f"{' / '.join(f'{v:.1f}' for v in accuracy)} | {seeds} | {gap} |")
    return "\n".join(lines) + "\n"


def aligned_model(run_dir: Path) -> Path:
    return next((run_dir / "align").glob("*/model"))


def diagnose(model_dir: Path, sft_dir: Path) -> dict:
    """h and f on held-out rows, ‖∇h‖ there, and ‖w − w_SFT‖ of an aligned model (cached next to it)."""
    path = model_dir.parent / "diagnostics.json"
    if path.exists():
        return json.loads(path.read_text())
    from trl import SFTConfig, SFTTrainer

    from llmreg.lab import safety_alignment_dataset, safety_harmful_dataset

    harmful, alignment = safety_harmful_dataset(200, split="test"), safety_alignment_dataset(200, split="test")
    args = SFTConfig(str(model_dir.parent / "diagnose"), use_cpu=True, report_to="none", max_length=128,
                     per_device_eval_batch_size=200, disable_tqdm=True)
    trainer = SFTTrainer(str(model_dir), args=args, train_dataset=harmful,
                         eval_dataset={"harmful": harmful, "alignment": alignment})
    losses = trainer.evaluate()
    batch = next(iter(trainer.get_eval_dataloader(trainer.eval_dataset["harmful"])))
    model = trainer.model
    loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    weights, sft = load_file(model_dir / "model.safetensors"), load_file(sft_dir / "model.safetensors")
    result = {"harmful_loss": losses["eval_harmful_loss"], "alignment_loss": losses["eval_alignment_loss"],
              "harmful_grad_norm": torch.sqrt(sum(g.double().square().sum() for g in grads)).item(),
              "distance_to_sft": torch.sqrt(sum((weights[n].double() - sft[n].double()).square().sum()
                                                for n in sft)).item()}
    path.write_text(json.dumps(result, indent=1))
    return result


def diagnostics_table(diagnostics: dict[str, list[dict]]) -> str:
    lines = ["| variant | h on held-out harmful rows | f on held-out alignment rows | ‖∇h‖ | ‖w − w_SFT‖ |",
             "|---|---|---|---|---|"]
    for variant, runs in diagnostics.items():
        mean = {key: statistics.fmean(run[key] for run in runs) for key in runs[0]}
        lines.append(f"| {variant} | {mean['harmful_loss']:.3f} | {mean['alignment_loss']:.3f} | "
                     f"{mean['harmful_grad_norm']:.2f} | {mean['distance_to_sft']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--harmful-ratios", nargs="+", type=float, default=[0.0, 0.1, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "booster_lab")
    args = parser.parse_args(argv)
    results = {variant: [run(variant, VARIANTS[variant], args.harmful_ratios, seed, args.output_dir)
                         for seed in args.seeds]
               for variant in args.variants}
    text = table(results, args.harmful_ratios)
    if "SFT" in args.variants:
        sft = {seed: aligned_model(directory(args.output_dir, "SFT", seed)) for seed in args.seeds}
        diagnostics = {variant: [diagnose(aligned_model(directory(args.output_dir, variant, seed)), sft[seed])
                                 for seed in args.seeds] for variant in args.variants}
        text += "\nThe aligned models (before the customer's fine-tune):\n\n" + diagnostics_table(diagnostics)
    (args.output_dir / "booster_lab.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
