"""Loss-based reweighting on the lab over seeds and temperatures: the docs/reweight.md table.

    python benchmarks/reweight_lab.py                       # r = 1 and 0.4, seeds 0-2 (~10 min on 2 cores)
    python benchmarks/reweight_lab.py --rs 0.4 --seeds 0 -- --max_steps 200

Each run is ``recipes/reweight.py`` with its no-argument lab settings (the four strategies from one seeded
initialization), plus ``--reweight_r``, ``--seed`` and whatever follows ``--``, as a subprocess into
``--output-dir/r<r>/seed<s>``; a rerun skips the runs that have their results. The table gives, per r and strategy,
the final held-out loss (mean ± std over seeds), how many seeds reached uniform's final held-out loss of the same
seed, and the mean share of uniform's steps they took. It is written to ``--output-dir/reweight_lab.md``.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rs", nargs="+", type=float, default=[1.0, 0.4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "reweight_lab")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    lines = ["| r | strategy | final held-out loss | seeds reaching uniform's final loss | share of uniform's steps |",
             "|---|---|---|---|---|"]
    for r in args.rs:
        runs = []
        for seed in args.seeds:
            run_dir = args.output_dir / f"r{r:g}" / f"seed{seed}"
            results = run_dir / "reweight_results.json"
            if not results.is_file():
                subprocess.run([sys.executable, str(REPO / "recipes" / "reweight.py"), "--output_dir", str(run_dir),
                                "--seed", str(seed), "--reweight_r", str(r), *extra], check=True, cwd=REPO)
            runs.append({row["strategy"]: row for row in json.loads(results.read_text())})
        for strategy in runs[0]:
            finals = [run[strategy]["final_heldout_loss"] for run in runs]
            shares = [run[strategy]["steps_to_uniform_final"] / run[strategy]["uniform_steps"] for run in runs
                      if run[strategy]["steps_to_uniform_final"] is not None]
            spread = f" ± {statistics.stdev(finals):.4f}" if len(finals) > 1 else ""
            lines.append(f"| {r:g} | {strategy} | {statistics.mean(finals):.4f}{spread} | {len(shares)} of "
                         f"{len(runs)} | {f'{statistics.mean(shares):.2f}' if shares else '—'} |")
    table = "\n".join(lines) + "\n"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "reweight_lab.md").write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
