"""Booster on the lab: harmful score after the customer's fine-tune, for SFT, Vaccine and Booster over α and λ, with
full fine-tuning and with the paper's LoRA, 4 seeds each, and Booster's first-order check along training.

    python benchmarks/booster_lab.py                              # every setting, every variant, seeds 0-3
    python benchmarks/booster_lab.py --settings full --seeds 0 1  # a part of it
    python benchmarks/booster_lab.py --jobs 2                     # two runs at a time, one torch thread each

Every run is ``recipes/ftaas.py`` with its no-argument lab settings (the lab model, 200 alignment steps, the
customer's 400 samples, p ∈ {0, 0.1, 0.2}) plus the setting's and the variant's options and ``--seed``, as a
subprocess into ``--output-dir/<setting>/<variant>/seed<s>``; a rerun skips finished runs. Settings:

- ``full``: full fine-tuning at both stages (the recipe's lab default).
- ``lora``: the paper's adapter, LoRA r = 32, lora_alpha = 4 on q/k/v, and its asymmetric handling of the customer's
  fine-tune (``finetune_adapter: paper``): Booster's customer keeps training the alignment adapter, SFT's and
  Vaccine's get a fresh adapter on the merged aligned model. Learning rates scaled for the lab (see LORA below).
- ``lora-alike``: the same, but every method's customer gets a fresh adapter (``finetune_adapter: fresh``); SFT and
  Vaccine are then the very runs of ``lora`` and are taken from there.
- ``lora-continue``: the control of the other side: every method's customer continues its alignment adapter
  (``finetune_adapter: continue``); Booster's runs are those of ``lora``.

Written to ``--output-dir``: ``booster_lab.md`` (the tables of docs/booster.md: harmful score and fine-tune accuracy,
mean ± standard error over seeds, the first-order check, the aligned models' diagnostics), ``booster_lab.json`` and
``booster_lab.png`` (harmful score at each p against α, and the first-order ratio along training).

The first-order check: Booster's regularizer is h(w) − h(w̃) with w̃ = w − α·∇h/‖∇h‖. To first order this drop is
α‖∇h‖; the logged ``booster/gap`` over α·``booster/harmful_grad_norm`` says how well the linearization holds. Near 1,
the simulated step is a small step on h; near 0 or negative, it overshoots (h rises after it) and the regularizer
stops measuring what the paper means.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmreg.report import format_mean_se, mean_se


REPO = Path(__file__).resolve().parents[1]
RATIOS = [0.0, 0.1, 0.2]
ALPHAS = [0.1, 0.03, 0.01, 0.003]
LAMBDAS = [1.0, 5.0]

# The paper's adapter, with learning rates for the lab. At the full-fine-tuning rates (1e-4, 5e-5) an adapter scaled
# by lora_alpha / r = 1/8 moves nothing in 200 + 50 steps (the harmful score stays the base model's 42 %). Alignment
# at 1e-3 takes SFT's harmful score to 0 %. The customer's rate, SFT seed 0, harmful score at p = 0.1 / 0.2: 5e-4:
# 0 / 0; 2e-3: 0 / 28.5; 3e-3: 12.5 / 79.5; 5e-3: 65 / 100; 2e-2: 98.5 / 97. 3e-3 leaves room both ways. The
# sentiment accuracy barely moves below 2e-2 (an adapter on q/k/v of a 4-layer model learns the harmful answers'
# pattern long before the task), so under LoRA the lab measures harm, not the task.
LORA = ["--use_peft", "--lora_r", "32", "--lora_alpha", "4", "--lora_dropout", "0",
        "--lora_target_modules", "q_proj", "k_proj", "v_proj", "--learning_rate", "1e-3",
        "--finetune_learning_rate", "3e-3"]
SETTINGS = {
    "full": [],
    "lora": [*LORA, "--finetune_adapter", "paper"],
    "lora-alike": [*LORA, "--finetune_adapter", "fresh"],
    "lora-continue": [*LORA, "--finetune_adapter", "continue"],
}
# Settings whose alignment stage is another setting's (only the customer's adapter differs).
ALIGNMENT_OF = {"lora-alike": "lora", "lora-continue": "lora"}


def booster_name(lam: float, alpha: float) -> str:
    return f"Booster λ={lam:g} α={alpha:g}"


VARIANTS = {
    "SFT": ["--methods", "sft"],
    "Vaccine ρ=2": ["--methods", "vaccine", "--vaccine_rho", "2"],
    **{booster_name(lam, alpha): ["--methods", "booster", "--booster_lambda", f"{lam:g}", "--booster_alpha",
                                  f"{alpha:g}"]
       for lam in LAMBDAS for alpha in ALPHAS},
}
# Runs that do not depend on the adapter handling: with a fresh adapter for every method, SFT and Vaccine are the
# runs of the paper's handling.
SHARED = {("lora-alike", "SFT"): "lora", ("lora-alike", "Vaccine ρ=2"): "lora",
          **{("lora-continue", booster_name(lam, alpha)): "lora" for lam in LAMBDAS for alpha in ALPHAS}}


def directory(output_dir: Path, setting: str, variant: str, seed: int) -> Path:
    setting = SHARED.get((setting, variant), setting)
    return output_dir / setting / "".join(c if c.isalnum() else "_" for c in variant) / f"seed{seed}"


def run(setting: str, variant: str, seed: int, output_dir: Path, extra: tuple[str, ...] = ()) -> Path:
    """One ``recipes/ftaas.py`` run (skipped when finished); ``extra`` options follow the setting's and variant's
    (benchmarks/claims/booster.py passes the real model and its sizes)."""
    run_dir = directory(output_dir, setting, variant, seed)
    source = directory(output_dir, ALIGNMENT_OF.get(setting, setting), variant, seed)
    if source != run_dir and (source / "results.json").exists() and not (run_dir / "align").exists():
        # The same alignment, bit for bit (only the customer's adapter differs): the pipeline resumes after it.
        shutil.copytree(source / "align", run_dir / "align")
    if not (run_dir / "results.json").exists():
        command = [sys.executable, str(REPO / "recipes" / "ftaas.py"), "--output_dir", str(run_dir),
                   "--seed", str(seed), "--harmful_ratios", *map(str, RATIOS), "--logging_steps", "10",
                   *SETTINGS[setting], *VARIANTS[variant], *extra]
        print("running", " ".join(command[1:]), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        log = run_dir.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            subprocess.run(command, cwd=REPO, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    return run_dir


def read_run(run_dir: Path) -> dict:
    """The run's scores per p, the aligned model's, and Booster's logged gap and ‖∇h‖ along training."""
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    method = rows[0]["method"]
    tuned = {row["harmful_ratio"]: row for row in rows if row["stage"] == "fine-tuned"}
    aligned = next(row for row in rows if row["stage"] == "aligned")
    history = json.loads((run_dir / "align" / method / "log_history.json").read_text())
    curve = [(e["step"], e["booster/gap"], e["booster/harmful_grad_norm"]) for e in history if "booster/gap" in e]
    return {"harmful": [tuned[p]["harmful_score"] for p in RATIOS],
            "accuracy": [tuned[p]["finetune_accuracy"] for p in RATIOS],
            "aligned_harmful": aligned["harmful_score"], "curve": curve}


def first_order_ratios(curve: list, alpha: float) -> list[tuple[int, float]]:
    """gap / (α‖∇h‖) at each logged step (each logged value is the mean over the steps since the last log)."""
    return [(step, gap / (alpha * norm)) for step, gap, norm in curve if norm > 0]


def aligned_model(run_dir: Path) -> Path:
    return next((run_dir / "align").glob("*/model"))


def heldout_trainer(model_dir: Path, output_dir: Path):
    """An SFTTrainer of the model whose eval datasets are 200 held-out harmful rows (h) and alignment rows (f), each
    one batch, tokenized as training tokenizes them (the loss on the answers)."""
    from trl import SFTConfig, SFTTrainer

    from llmreg.lab import safety_alignment_dataset, safety_harmful_dataset

    harmful, alignment = safety_harmful_dataset(200, split="test"), safety_alignment_dataset(200, split="test")
    args = SFTConfig(str(output_dir), use_cpu=True, report_to="none", max_length=128,
                     per_device_eval_batch_size=200, disable_tqdm=True)
    return SFTTrainer(str(model_dir), args=args, train_dataset=harmful,
                      eval_dataset={"harmful": harmful, "alignment": alignment})


def harmful_inputs(trainer) -> dict:
    batch = next(iter(trainer.get_eval_dataloader(trainer.eval_dataset["harmful"])))
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def diagnose(model_dir: Path, sft_dir: Path) -> dict:
    """h and f on held-out rows, ‖∇h‖ there (every weight), and ‖w − w_SFT‖ of an aligned (merged) model; cached."""
    path = model_dir.parent / "diagnostics.json"
    if path.exists():
        return json.loads(path.read_text())
    trainer = heldout_trainer(model_dir, model_dir.parent / "diagnose")
    losses = trainer.evaluate()
    model = trainer.model
    loss = model(**harmful_inputs(trainer)).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    weights, sft = load_file(model_dir / "model.safetensors"), load_file(sft_dir / "model.safetensors")
    result = {"harmful_loss": losses["eval_harmful_loss"], "alignment_loss": losses["eval_alignment_loss"],
              "harmful_grad_norm": torch.sqrt(sum(g.double().square().sum() for g in grads)).item(),
              "distance_to_sft": torch.sqrt(sum((weights[n].double() - sft[n].double()).square().sum()
                                                for n in sft)).item()}
    path.write_text(json.dumps(result, indent=1))
    return result


LINEARIZATION_ALPHAS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3]


def linearization(run_dir: Path, lora: bool) -> dict:
    """At an SFT-aligned model, how far the simulated harmful step stays first-order: for each α, the drop
    h(w) − h(w − α·g/‖g‖) over its first-order value α‖g‖, g = ∇h(w), on 200 held-out harmful rows (answer tokens).
    With LoRA, w is the alignment adapter (the parameters Booster moves), at the merged model's tokens. Cached."""
    path = run_dir / "linearization.json"
    if path.exists():
        return json.loads(path.read_text())
    merged = aligned_model(run_dir)
    trainer = heldout_trainer(merged, run_dir / "linearize")
    inputs = harmful_inputs(trainer)
    model = trainer.model
    if lora:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(merged.parent / "adapter"), is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**inputs).loss
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
    saved = [p.detach().clone() for p in params]
    ratios = {}
    with torch.no_grad():
        for alpha in LINEARIZATION_ALPHAS:
            for p, w, g in zip(params, saved, grads):
                p.copy_(w - alpha * g / norm)
            ratios[f"{alpha:g}"] = (loss.item() - model(**inputs).loss.item()) / (alpha * norm)
        for p, w in zip(params, saved):
            p.copy_(w)
    result = {"harmful_loss": loss.item(), "grad_norm": norm, "ratios": ratios}
    path.write_text(json.dumps(result, indent=1))
    return result


def linearization_table(by_setting: dict[str, list[dict]]) -> str:
    names = [f"{a:g}" for a in LINEARIZATION_ALPHAS]
    lines = ["| setting (SFT-aligned model) | ‖∇h‖ | " + " | ".join(f"α = {n}" for n in names) + " |",
             "|---" * (len(names) + 2) + "|"]
    for setting, seeds in by_setting.items():
        ratios = " | ".join(cell([s["ratios"][n] for s in seeds], 2) for n in names)
        lines.append(f"| {setting} | {cell([s['grad_norm'] for s in seeds], 2)} | {ratios} |")
    return "\n".join(lines) + "\n"


def cell(values: list[float], digits: int = 1) -> str:
    return format_mean_se(values, digits)


def results_table(setting: str, runs: dict[str, list[dict]]) -> str:
    header = ("| variant | harmful score before the attack (%) | harmful score at p = 0 / 0.1 / 0.2 (%) | "
              "minus SFT's of the same seed, p = 0.1 / 0.2 | fine-tune accuracy at p = 0 / 0.1 / 0.2 (%) | "
              "per seed: harmful score at p = 0.1 / 0.2 |")
    lines = [f"**{setting}**", "", header, "|---|---|---|---|---|---|"]
    sft = runs.get("SFT")
    for variant, seeds in runs.items():
        harm = " / ".join(cell([r["harmful"][i] for r in seeds]) for i in range(len(RATIOS)))
        accuracy = " / ".join(f"{statistics.fmean(r['accuracy'][i] for r in seeds):.1f}" for i in range(len(RATIOS)))
        per_seed = "; ".join(f"{r['harmful'][1]:.1f} / {r['harmful'][2]:.1f}" for r in seeds)
        paired = "—" if sft is None or variant == "SFT" else " / ".join(
            cell([r["harmful"][i] - b["harmful"][i] for r, b in zip(seeds, sft)]) for i in (1, 2))
        lines.append(f"| {variant} | {cell([r['aligned_harmful'] for r in seeds])} | {harm} | {paired} | {accuracy} | "
                     f"{per_seed} |")
    return "\n".join(lines) + "\n"


def first_order_table(runs_by_setting: dict[str, dict[str, list[dict]]]) -> str:
    lines = [("| setting | variant | gap / (α‖∇h‖) at step 10 | … at the last step | min along training | "
             "final gap h(w) − h(w̃) | final ‖∇h‖ |"), "|---|---|---|---|---|---|---|"]
    for setting, runs in runs_by_setting.items():
        if setting in ALIGNMENT_OF:  # the alignment stage is another setting's
            continue
        for variant, seeds in runs.items():
            if not variant.startswith("Booster"):
                continue
            alpha = float(variant.split("α=")[1])
            ratios = [first_order_ratios(r["curve"], alpha) for r in seeds]
            first = cell([r[0][1] for r in ratios], 2)
            last = cell([r[-1][1] for r in ratios], 2)
            low = cell([min(v for _, v in r) for r in ratios], 2)
            gap = cell([r["curve"][-1][1] for r in seeds], 4)
            norm = cell([r["curve"][-1][2] for r in seeds], 2)
            lines.append(f"| {setting} | {variant} | {first} | {last} | {low} | {gap} | {norm} |")
    return "\n".join(lines) + "\n"


def diagnostics_table(setting: str, diagnostics: dict[str, list[dict]]) -> str:
    lines = [f"**{setting}**", "", ("| variant | h on held-out harmful rows | f on held-out alignment rows | "
             "‖∇h‖ (all weights) | ‖w − w_SFT‖ |"), "|---|---|---|---|---|"]
    for variant, seeds in diagnostics.items():
        lines.append(f"| {variant} | {cell([d['harmful_loss'] for d in seeds], 3)} | "
                     f"{cell([d['alignment_loss'] for d in seeds], 3)} | "
                     f"{cell([d['harmful_grad_norm'] for d in seeds], 2)} | "
                     f"{cell([d['distance_to_sft'] for d in seeds], 2)} |")
    return "\n".join(lines) + "\n"


def plot(runs_by_setting: dict[str, dict[str, list[dict]]], linearizations: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(runs_by_setting)
    aligned_here = [setting for setting in settings if setting not in ALIGNMENT_OF]
    columns = max(len(settings), len(aligned_here) + 1)
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    for column, setting in enumerate(settings):
        runs = runs_by_setting[setting]
        ax = axes[0][column]
        for index, p in enumerate(RATIOS[1:], start=1):
            color = f"C{index}"
            sft = [r["harmful"][index] for r in runs["SFT"]]
            ax.axhline(statistics.fmean(sft), color=color, linestyle=":", label=f"SFT, p = {p:g}")
            for lam, style in zip(LAMBDAS, ("--", "-")):
                names = [booster_name(lam, a) for a in ALPHAS if booster_name(lam, a) in runs]
                if not names:
                    continue
                means, ses = zip(*(mean_se([r["harmful"][index] for r in runs[n]]) for n in names))
                alphas = [float(n.split("α=")[1]) for n in names]
                ax.errorbar(alphas, means, yerr=[0 if math.isnan(s) else s for s in ses], color=color,
                            linestyle=style, marker="o", capsize=3, label=f"Booster λ = {lam:g}, p = {p:g}")
        ax.set_xscale("log")
        ax.set_xlabel("α")
        ax.set_ylabel("harmful score after the fine-tune (%)")
        ax.set_title(f"{setting}: mean ± s.e. over seeds")
        ax.legend(fontsize=7)
    for column, setting in enumerate(aligned_here):  # the first-order check along each alignment
        runs, ax = runs_by_setting[setting], axes[1][column]
        for index, alpha in enumerate(ALPHAS):
            name = booster_name(5.0, alpha)
            if name not in runs:
                continue
            curves = [first_order_ratios(r["curve"], alpha) for r in runs[name]]
            steps = [s for s, _ in curves[0]]
            means = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
            ax.plot(steps, means, marker=".", color=f"C{index}", label=f"α = {alpha:g}")
        ax.axhline(1.0, color="gray", linestyle=":")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("alignment step")
        ax.set_ylabel("(h(w) − h(w̃)) / (α‖∇h‖)")
        ax.set_title(f"{setting}: first-order check along training, λ = 5")
        ax.legend(fontsize=7)
    ax = axes[1][len(aligned_here)]  # the step's linearity at the SFT-aligned models
    for index, (name, seeds) in enumerate(linearizations.items()):
        means = [statistics.fmean(s["ratios"][f"{a:g}"] for s in seeds) for a in LINEARIZATION_ALPHAS]
        ax.plot(LINEARIZATION_ALPHAS, means, marker="o", color=f"C{index}", label=name)
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("α")
    ax.set_ylabel("(h(w) − h(w − α·g/‖g‖)) / (α‖g‖)")
    ax.set_title("at the SFT-aligned model: how first-order the step is")
    ax.legend(fontsize=7)
    for column in range(len(aligned_here) + 1, columns):
        axes[1][column].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--jobs", type=int, default=1, help="Runs at a time (each with one torch thread).")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "booster_lab")
    args = parser.parse_args(argv)

    plan = [(setting, variant, seed) for setting in args.settings for variant in args.variants
            for seed in args.seeds]
    unique = list(dict.fromkeys((SHARED.get((s, v), s), v, seed) for s, v, seed in plan))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run(*job, args.output_dir), unique))

    runs_by_setting = {setting: {variant: [read_run(directory(args.output_dir, setting, variant, seed))
                                           for seed in args.seeds] for variant in args.variants}
                       for setting in args.settings}
    text = [(f"Seeds {args.seeds}; mean ± standard error over seeds. Reproduce: python benchmarks/booster_lab.py "
            f"--settings {' '.join(args.settings)} --seeds {' '.join(map(str, args.seeds))}\n")]
    for setting, runs in runs_by_setting.items():
        text.append(results_table(setting, runs))
    text.append("The first-order check along the alignment (Booster runs):\n\n" + first_order_table(runs_by_setting))
    by_setting = {}
    if "SFT" in args.variants:
        by_setting = {setting: [linearization(directory(args.output_dir, setting, "SFT", seed),
                                              lora=setting != "full") for seed in args.seeds]
                      for setting in args.settings if setting not in ALIGNMENT_OF}
        text.append("How first-order the simulated step is at the SFT-aligned model, (h(w) − h(w − α·g/‖g‖)) / "
                    "(α‖g‖), g = ∇h(w) over the parameters Booster moves (all weights; with LoRA the adapter):\n\n"
                    + linearization_table(by_setting))
        text.append("The aligned models, before the customer's fine-tune (200 held-out rows each):\n")
        for setting in args.settings:
            if setting in ALIGNMENT_OF:
                continue
            sft = {seed: aligned_model(directory(args.output_dir, setting, "SFT", seed)) for seed in args.seeds}
            diagnostics = {variant: [diagnose(aligned_model(directory(args.output_dir, setting, variant, seed)),
                                              sft[seed]) for seed in args.seeds] for variant in args.variants}
            text.append(diagnostics_table(setting, diagnostics))
    report = "\n".join(text)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "booster_lab.md").write_text(report)
    (args.output_dir / "booster_lab.json").write_text(json.dumps(runs_by_setting, indent=1))
    plot(runs_by_setting, by_setting, args.output_dir / "booster_lab.png")
    print(report)


if __name__ == "__main__":
    main()
