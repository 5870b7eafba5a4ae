"""Unlearning on the lab: GA, GD and NPO, with and without CLEAR's ℓ1 penalty, over seeds.

    python benchmarks/unlearn_lab.py                                  # the docs/unlearn.md table (~6 min, 2 cores)
    python benchmarks/unlearn_lab.py --objectives ga --l1-lambdas 0 0.01 --seeds 0 -- --learning_rate 5e-4

Each run is ``recipes/unlearn.py`` with its no-argument lab settings, plus ``--objective``, ``--l1_lambda``,
``--seed`` and whatever follows ``--``, in this process. The original and gold models are fine-tuned once (seed 0,
under ``--output-dir/base``) and shared: the seeds vary the unlearning alone (its LoRA's initialization and the order
of the forget rows). Each run's row is saved as ``--output-dir/<objective>_l1-<λ1>/seed<s>/row.json``, and a rerun
skips the runs that have one. The table (mean ± std over seeds) is written to ``--output-dir/unlearn_lab.md``.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import unlearn as recipe  # noqa: E402

from llmreg.lab.facts import fact_is_correct  # noqa: E402
from llmreg.recipe_utils import model_init_kwargs, parse_recipe_args  # noqa: E402
from llmreg.unlearn.protocol import prepare_models, reference_rows, unlearn  # noqa: E402


COLUMNS = {"forget_accuracy": "forget acc. (%)", "retain_accuracy": "retain acc. (%)",
           "world_accuracy": "world acc. (%)", "forget_quality": "forget quality", "model_utility": "model utility",
           "b_near_zero": "LoRA B entries < 1e-3 (%)"}


def b_near_zero(adapter: Path) -> float:
    """The share (%) of the unlearning adapter's B entries below 1e-3 in magnitude: how much ℓ1 held it at 0."""
    from safetensors.torch import load_file

    tensors = [t for name, t in load_file(adapter).items() if "lora_B" in name]
    return 100.0 * sum(int((t.abs() < 1e-3).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def table(rows: dict[str, list[dict]]) -> str:
    lines = ["| model | seeds | " + " | ".join(COLUMNS.values()) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for name, runs in rows.items():
        cells = [cell([r[k] for r in runs]) if k in runs[0] else "—" for k in COLUMNS]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=["ga", "gd", "npo"])
    parser.add_argument("--l1-lambdas", nargs="+", type=float, default=[0.0, 0.001, 0.01])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "unlearn_lab")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    base = args.output_dir / "base"
    script_args, training_args, model_args = parse_recipe_args(recipe.make_parser(),
                                                               ["--output_dir", str(base), *extra])
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)  # as the recipe's main does
    sets = recipe.load_question_sets(script_args, model_args.model_name_or_path)
    original, gold = prepare_models(script_args, training_args, model_args, sets)
    reference_file = base / "reference_rows.json"
    if not reference_file.is_file():
        rows = reference_rows(original, gold, sets, base, answer_is_correct=fact_is_correct)
        reference_file.write_text(json.dumps(rows, indent=1))
    reference, gold_ratios = json.loads(reference_file.read_text())
    rows = {row["model"]: [row] for row in reference}
    for objective in args.objectives:
        for lam in args.l1_lambdas:
            name = objective + (f" + ℓ1 (λ1 = {lam:g})" if lam else "")
            for seed in args.seeds:
                run_dir = args.output_dir / f"{objective}_l1-{lam:g}" / f"seed{seed}"
                row_file = run_dir / "row.json"
                if not row_file.is_file():
                    _, training_args, model_args = parse_recipe_args(recipe.make_parser(), [
                        "--output_dir", str(run_dir), "--objective", objective, "--l1_lambda", str(lam),
                        "--seed", str(seed), *extra])
                    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
                    row = unlearn(original, sets, training_args, model_args, gold_ratios, sets, gold,
                                  answer_is_correct=fact_is_correct)
                    row_file.write_text(json.dumps(row, indent=1))
                row = json.loads(row_file.read_text())
                row["b_near_zero"] = b_near_zero(run_dir / "unlearned" / "adapter_model.safetensors")
                rows.setdefault(name, []).append(row)
    result = table(rows)
    (args.output_dir / "unlearn_lab.md").write_text(result)
    print(result)
    return result


if __name__ == "__main__":
    main()
