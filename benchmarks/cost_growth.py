"""Cost growth: each trainer's step time and peak memory against its base trainer as the work doubles.

    python benchmarks/cost_growth.py                                   # every case (long on a CPU)
    python benchmarks/cost_growth.py --cases reweight l1 --rounds 2 --steps-per-round 4 --warmup 2

From one base point, each dimension doubles twice while the others stay:

- sequence length: filler words before every prompt (``run.SCALE["filler_words"]``), the measured tokens per sample
  in the table;
- batch size: every per-device batch ×2 and ×4 (``run.SCALE["batch"]``);
- model width: random models (benchmarks/random_model.py) of hidden size 128 (the base), 256 and 512, MLP 4× the
  hidden size, 4 layers; the base point uses the width-128 model too, so the three widths compare alike.

Each point is one ``run.py`` comparison (same harness, same cases). Written to ``--output-dir``:
``cost_growth.md`` (time and memory ratios per case and point) and ``cost_growth.png`` (time ratio against the
factor, one panel per dimension). The ratios should stay flat: an overhead that grows with the work shows as a rising
line.
"""

import argparse
import io
import json
from pathlib import Path

import random_model
import run
import torch
from harness import compare


REPO = Path(__file__).resolve().parents[1]
FILLER_WORDS = {1: 0, 2: 24, 4: 72}  # about ×2 and ×4 the lab arithmetic sample's ~30 tokens
WIDTHS = {1: 128, 2: 256, 4: 512}
POINTS = [("base", 1), ("sequence", 2), ("sequence", 4), ("batch", 2), ("batch", 4), ("width", 2), ("width", 4)]


def measure(case: str, dimension: str, factor: int, models: dict[int, Path], rounds: int, steps: int,
            warmup: int) -> dict:
    run.MODEL_DIR = str(models[factor if dimension == "width" else 1])
    run.SCALE.update(batch=factor if dimension == "batch" else 1,
                     filler_words=FILLER_WORDS[factor if dimension == "sequence" else 1])
    make_candidate, make_baseline = run.CASES[case]()
    result = compare(make_candidate, make_baseline, rounds=rounds, steps_per_round=steps, warmup_steps=warmup)
    candidate = result["candidate"]
    tokens_per_step = candidate["tokens_per_s"] * candidate["median_ms"] / 1000
    return {"case": case, "dimension": dimension, "factor": factor, "time_ratio": result["time_ratio"],
            "mem_ratio": result["mem_ratio"], "median_ms": candidate["median_ms"],
            "tokens_per_step": tokens_per_step}


def table(rows: list[dict]) -> str:
    lines = ["| case | point | tokens/step (cand.) | median ms (cand.) | time ratio | mem ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        point = "base" if r["dimension"] == "base" else f"{r['dimension']} ×{r['factor']}"
        tokens = f"{r['tokens_per_step']:.0f}" if r["tokens_per_step"] else "—"
        lines.append(f"| {r['case']} | {point} | {tokens} | {r['median_ms']:.1f} | {r['time_ratio']:.2f} | "
                     f"{r['mem_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> bytes:
    from matplotlib.figure import Figure  # the object API: no pyplot, no display backend

    figure = Figure(figsize=(11, 3.6), layout="constrained")
    panels = figure.subplots(1, 3, sharey=True)
    for axes, dimension in zip(panels, ("sequence", "batch", "width"), strict=True):
        for case in dict.fromkeys(r["case"] for r in rows):
            base = [r for r in rows if r["case"] == case and r["dimension"] == "base"]
            grown = [r for r in rows if r["case"] == case and r["dimension"] == dimension]
            points = sorted(base + grown, key=lambda r: r["factor"])
            axes.plot([r["factor"] for r in points], [r["time_ratio"] for r in points], marker="o", label=case)
        axes.set(xscale="log", xticks=[1, 2, 4], xticklabels=["×1", "×2", "×4"], xlabel=f"{dimension} factor",
                 title=f"{dimension} doubles")
        axes.minorticks_off()  # a log axis would also label 3
        axes.axhline(1.0, color="grey", linewidth=0.8)
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("step time, candidate / base")
    panels[-1].legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(run.CASES),
                        default=[c for c in run.CASES if c not in ("sft", "reweight_vs_uniform",
                                                                   "booster_equal_passes")])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "cost_growth")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for factor, width in WIDTHS.items():
        models[factor] = args.output_dir / f"model-width{width}"
        if not (models[factor] / "config.json").is_file():
            random_model.build("tiny", models[factor], hidden_size=width, intermediate_size=4 * width)
    print(f"device: {run.device_description()}, torch {torch.__version__}")
    rows = []
    for case in args.cases:
        for dimension, factor in POINTS:
            rows.append(measure(case, dimension, factor, models, args.rounds, args.steps_per_round, args.warmup))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    (args.output_dir / "cost_growth.json").write_text(json.dumps(rows, indent=1))
    (args.output_dir / "cost_growth.md").write_text(table(rows))
    (args.output_dir / "cost_growth.png").write_bytes(plot(rows))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
