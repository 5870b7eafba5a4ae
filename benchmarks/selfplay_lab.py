"""Self-play ablations on the lab: SPPO vs RSPO, and SPIN vs α-SPIN vs history-2 SPIN, per iteration.

    python benchmarks/selfplay_lab.py                          # both ablations, 3 iterations, seeds 0 and 1 (~15 min)
    python benchmarks/selfplay_lab.py --ablations rspo --seeds 0 --iterations 2

Every run is the recipe (``recipes/rspo.py`` or ``recipes/spin.py``) with its no-argument lab settings plus the
variant's options and ``--iterations``/``--seed``, run as a subprocess into
``--output-dir/<ablation>/<variant>/seed<s>``; a rerun skips finished runs (the loop resumes). The table (mean over
seeds, and each seed) is what docs/rspo.md and docs/spin.md report; it is also written to
``--output-dir/<ablation>.md``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

ABLATIONS = {
    "rspo": {
        "SPPO": ["--regularizers", ""],
        "RSPO reverse KL (λ=0.05)": ["--regularizers", "reverse_kl=0.05"],
        "RSPO reverse KL (λ=0.5)": ["--regularizers", "reverse_kl=0.5"],
        "RSPO IS-forward + reverse KL (λ=0.01, 0.05)": ["--regularizers", "forward_kl_is=0.01,reverse_kl=0.05"],
    },
    "spin": {
        "SPIN": [],
        "α-SPIN (α=0.5)": ["--alpha", "0.5"],
        "SPIN history 2 (data)": ["--history", "2"],
        "SPIN history 2 (arith)": ["--history", "2", "--opponent_mixture", "arith"],
    },
}
METRICS = ("win_rate_vs_base", "kl_to_base", "mean_length", "score")


def run(ablation: str, variant: str, options: list[str], iterations: int, seed: int, output_dir: Path) -> list[dict]:
    name = "".join(c if c.isalnum() else "_" for c in variant)
    directory = output_dir / ablation / name / f"seed{seed}"
    summary = directory / "summary.json"
    if not summary.exists():
        command = [sys.executable, str(REPO / "recipes" / f"{ablation}.py"), "--output_dir", str(directory),
                   "--iterations", str(iterations), "--seed", str(seed), *options]
        print("running", " ".join(command), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def table(results: dict[str, list[list[dict]]]) -> str:
    header = ("| variant | model | win rate vs base (%) | KL to base (nats) | mean length (tokens) | score (accuracy) "
              "| per seed: win rate / KL |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for variant, runs in results.items():
        for index, model in enumerate(row["model"] for row in runs[0]):
            rows = [seed_rows[index] for seed_rows in runs]
            means = {m: statistics.fmean(row[m] for row in rows) for m in METRICS}
            seeds = ", ".join(f"{row['win_rate_vs_base']:.1f} / {row['kl_to_base']:.2f}" for row in rows)
            lines.append(f"| {variant} | {model} | {means['win_rate_vs_base']:.1f} | {means['kl_to_base']:.3f} | "
                         f"{means['mean_length']:.1f} | {means['score']:.3f} | {seeds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablations", nargs="+", choices=sorted(ABLATIONS), default=sorted(ABLATIONS))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "selfplay_lab")
    args = parser.parse_args(argv)
    for ablation in args.ablations:
        results = {variant: [run(ablation, variant, options, args.iterations, seed, args.output_dir)
                             for seed in args.seeds]
                   for variant, options in ABLATIONS[ablation].items()}
        text = table(results)
        (args.output_dir / f"{ablation}.md").write_text(text)
        print(f"\n{ablation}: {args.iterations} iterations, seeds {args.seeds}\n{text}")


if __name__ == "__main__":
    main()
