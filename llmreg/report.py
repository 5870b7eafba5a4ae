"""Read a run's logs, and write its report: ``llmreg report RUN_DIR``.

A run directory is a recipe's ``output_dir``. What a run logged lives there, in the Trainer's files and llmreg's:
- ``trainer_state.json`` (``log_history``: every logged metric at its step), or ``log_history.json`` (the list
  alone), one per training stage: a recipe that trains several models writes one per sub-directory;
- ``*_results.json`` / ``all_results.json`` (``save_metrics``: the final numbers, and the recipe's own summary, such
  as held-out accuracy) and ``eval.json`` (a stage's evaluation: a self-play iteration's win rate, an unlearned
  model's forget quality), flat mappings of numbers;
- ``llmreg_run.yaml`` (written by ``llmreg run`` and ``llmreg ablate``): the settings it ran with; else the settings
  a multi-stage run records itself (``selfplay_settings.json``; the ``settings`` of the FTaaS ``results.json`` and
  of ``unlearn_results.json``);
- a multi-stage run's summary: the self-play loop's ``summary.json`` (one row per iterate: win rate, KL to the base,
  length) and the FTaaS pipeline's ``results.json`` rows (harmful score and accuracy per method and p).

``write_report`` turns these into ``report.md``: the settings, the summary (a table, and a plot across iterations or
harmful ratios), the final and best value of every metric, and one PNG curve per metric (under ``report_plots/``).
"""

import json
import math
import re
from pathlib import Path

import yaml


# Logged each step but not a result: the Trainer's bookkeeping.
BOOKKEEPING = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "learning_rate", "num_tokens", "step_time"}

# Which way is better, by the metric's name: losses, divergences and harm go down; reward and accuracy go up. Any
# other metric has a final value but no "best" unless a sweep names its goal.
LOWER_IS_BETTER = re.compile(r"loss|kl|harm|perplexity")
HIGHER_IS_BETTER = re.compile(r"reward|accuracy|margin|win_rate")


def metric_goal(key: str) -> str | None:
    """``"min"``, ``"max"`` or None (no best) for a logged metric's key, decided by its last part that names a
    direction (``rewards/correct/mean`` is a reward, ``rpg/ufkl`` a divergence); a spread (``std``) has none.

    Give the key as logged, without the stage or run directory it was read from: a directory's name says nothing
    about a metric (``rpg-divergence=fkl-seed0/reward`` is a reward, not a KL)."""
    for part in reversed(key.split("/")):
        if "std" in part:
            return None
        if LOWER_IS_BETTER.search(part):
            return "min"
        if HIGHER_IS_BETTER.search(part):
            return "max"
    return None


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_stages(run_dir: Path) -> dict[str, list[dict]]:
    """Each training stage's ``log_history``, by its directory relative to ``run_dir`` (``"."`` for the run itself).

    Checkpoints hold copies of their stage's history so far; they are read only where a stage has no final
    ``trainer_state.json`` (a run killed mid-way).
    """
    stages = {}
    for history in sorted(run_dir.rglob("log_history.json")):
        stages[str(history.parent.relative_to(run_dir))] = json.loads(history.read_text())
    for state in sorted(run_dir.rglob("trainer_state.json")):
        stage = state.parent
        if stage.name.startswith("checkpoint-"):
            continue
        stages[str(stage.relative_to(run_dir))] = json.loads(state.read_text())["log_history"]
    for checkpoint in sorted(run_dir.rglob("checkpoint-*/trainer_state.json"),
                             key=lambda path: int(path.parent.name.split("-")[-1])):
        stage = str(checkpoint.parent.parent.relative_to(run_dir))
        final = run_dir / stage / "trainer_state.json"
        if stage not in stages or final.is_file() and checkpoint.stat().st_mtime > final.stat().st_mtime:
            stages[stage] = json.loads(checkpoint.read_text())["log_history"]
    return stages


def metric_name(stage: str, key: str) -> str:
    return key if stage == "." else f"{stage}/{key}"


def stage_curves(run_dir: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Every logged metric's (step, value) points, by (training stage, key as logged)."""
    points: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for stage, history in training_stages(run_dir).items():
        for entry in history:
            for key, value in entry.items():
                if key not in BOOKKEEPING and not key.startswith("train_") and is_number(value):
                    points.setdefault((stage, key), []).append((entry["step"], float(value)))
    return points


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric's (step, value) points, over all training stages, by metric name (``stage/key``)."""
    return {metric_name(stage, key): points for (stage, key), points in stage_curves(run_dir).items()}


def final_results(run_dir: Path) -> dict[str, float]:
    """The numbers a run saved at its end: ``all_results.json`` or each ``*_results.json`` (``save_metrics``), and
    ``eval.json``, in the run directory and its stages' directories."""
    results = {}
    for path in sorted([*run_dir.rglob("*_results.json"), *run_dir.rglob("eval.json")]):
        if any(part.startswith("checkpoint-") for part in path.parts):
            continue
        stage = str(path.parent.relative_to(run_dir))
        if path.name == "eval.json" and path.parent.name == "eval" and path.parent != run_dir:
            # A model's evaluation stage (<model's stage>/eval/eval.json): its numbers are the model's.
            stage = str(path.parent.parent.relative_to(run_dir))
        if path.name != "all_results.json" and (path.parent / "all_results.json").is_file():
            continue  # merged into all_results.json already
        content = json.loads(path.read_text())
        if isinstance(content, dict):
            results.update({metric_name(stage, key): float(value) for key, value in content.items()
                            if is_number(value) and key not in BOOKKEEPING
                            and key.removeprefix("train_") not in BOOKKEEPING})
    return results


def run_metrics(run_dir: Path, goals: dict[str, str | None] | None = None) -> dict[str, dict[str, float]]:
    """Each metric's ``final`` value (the saved result, else the last logged one) and, where it was logged and has a
    goal (from ``goals``, else by its name), its ``best`` logged value."""
    goals = goals or {}
    metrics = {name: {"final": value} for name, value in final_results(run_dir).items()}
    for (stage, key), points in stage_curves(run_dir).items():
        name = metric_name(stage, key)
        values = [value for _, value in points]
        goal = goals.get(name, metric_goal(key))
        entry = metrics.setdefault(name, {"final": values[-1]})
        if goal is not None:
            entry["best"] = min(values) if goal == "min" else max(values)
    return metrics


def format_number(value: float) -> str:
    return f"{value:.4g}"


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean over seeds (sample standard deviation / √n; nan for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def format_mean_se(values: list[float], digits: int = 3) -> str:
    """``mean ± se`` of values over seeds (the mean alone for one value)."""
    mean, se = mean_se(values)
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def plot_curves(series: dict[str, dict[str, list[tuple[int, float]]]], directory: Path, title: str = "") -> list[Path]:
    """One PNG per metric: ``series[metric][label]`` is a line of (step, value) points. Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for metric, lines in sorted(series.items()):
        figure, axis = plt.subplots(figsize=(6, 4))
        for label, points in lines.items():
            steps = [step for step, _ in points]
            axis.plot(steps, [value for _, value in points], marker="o" if len(points) < 30 else None,
                      markersize=3, label=label)
        axis.set_xlabel("step")
        axis.set_ylabel(metric)
        axis.set_title(f"{title}{metric}")
        axis.grid(alpha=0.3)
        if len(lines) > 1:
            axis.legend(fontsize=7)
        path = directory / (re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        files.append(path)
    return files


# Settings a multi-stage run records itself, when it was not launched through llmreg: file, and the key holding them.
SETTINGS_RECORDS = (("selfplay_settings.json", None), ("results.json", "settings"),
                    ("unlearn_results.json", "settings"))


def recorded_settings(run_dir: Path) -> tuple[str, dict] | None:
    """(where they were read, the settings) of a run, or None."""
    from llmreg.launch import RUN_RECORD

    if (run_dir / RUN_RECORD).is_file():
        return RUN_RECORD, yaml.safe_load((run_dir / RUN_RECORD).read_text())["settings"]
    for name, key in SETTINGS_RECORDS:
        path = run_dir / name
        if path.is_file():
            content = json.loads(path.read_text())
            if isinstance(content, dict) and (key is None or isinstance(content.get(key), dict)):
                return name, content if key is None else content[key]
    return None


def summary_section(run_dir: Path) -> list[str]:
    """The self-play loop's per-iterate rows, or the FTaaS pipeline's per-method-and-p rows: a table and a plot."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no display backend

    selfplay, ftaas = run_dir / "summary.json", run_dir / "results.json"
    if selfplay.is_file():
        rows = json.loads(selfplay.read_text())
        columns = [("win_rate_vs_base", "win rate vs base (%)"), ("kl_to_base", "KL to base (nats)"),
                   ("mean_length", "mean length (tokens)")]
        lines = ["## Per iteration", "", "| model | " + " | ".join(label for _, label in columns) + " |",
                 "|---|" + "---:|" * len(columns)]
        lines += ["| " + " | ".join([row["model"], *(format_number(row[key]) for key, _ in columns)]) + " |"
                  for row in rows]
        figure = Figure(figsize=(4 * len(columns), 3.4), layout="constrained")
        for axes, (key, label) in zip(figure.subplots(1, len(columns)), columns, strict=True):
            axes.plot(range(len(rows)), [row[key] for row in rows], marker="o")
            axes.set(xlabel="iteration (0: the base model)", ylabel=label, xticks=range(len(rows)))
            axes.grid(alpha=0.3)
        (run_dir / "report_plots").mkdir(exist_ok=True)
        figure.savefig(run_dir / "report_plots" / "iterations.png", dpi=100)
        return [*lines, "", "![iterations](report_plots/iterations.png)", ""]
    if ftaas.is_file() and "rows" in (content := json.loads(ftaas.read_text())):
        lines = ["## Harm after the customer's fine-tune", "",
                 "| method | stage | harmful ratio p | harmful score (%) | fine-tune accuracy (%) |",
                 "|---|---|---:|---:|---:|"]
        for row in content["rows"]:
            ratio = "—" if row["harmful_ratio"] is None else f"{row['harmful_ratio']:g}"
            lines.append(f"| {row['method']} | {row['stage']} | {ratio} | {format_number(row['harmful_score'])} | "
                         f"{format_number(row['finetune_accuracy'])} |")
        plot = ["", "![results](results.png)"] if (run_dir / "results.png").is_file() else []
        return [*lines, *plot, ""]
    return []


def write_report(run_dir: Path) -> Path:
    """``RUN_DIR/report.md``: settings, final and best values, one curve per metric. Returns its path."""
    from llmreg.launch import RUN_RECORD

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory: give a recipe's output_dir.")
    metrics = run_metrics(run_dir)
    summary = summary_section(run_dir)
    if not metrics and not summary:
        raise ValueError(f"{run_dir} holds no trainer_state.json or *_results.json: nothing was logged there yet "
                         "(give a recipe's output_dir, after training has logged or saved).")
    lines = [f"# Report: {run_dir.resolve().name}", ""]
    record = run_dir / RUN_RECORD
    settings = recorded_settings(run_dir)
    if record.is_file():
        run = yaml.safe_load(record.read_text())
        lines += [f"Method: `{run['method']}`", "", "Launched with:", "", "```", " ".join(run["command"]), "```", "",
                  "## Settings", "", "Every key not at its dataclass default (recipe default, YAML or command line):",
                  "", "```yaml", yaml.safe_dump(run["settings"], sort_keys=True, allow_unicode=True).rstrip(), "```",
                  ""]
    elif settings is not None:
        source, values = settings
        lines += ["## Settings", "", f"As the run recorded them ({source}):", "", "```yaml",
                  yaml.safe_dump(values, sort_keys=True, allow_unicode=True).rstrip(), "```", ""]
    else:
        lines += ["## Settings", "", f"Not recorded: {RUN_RECORD} is written by `llmreg run` and `llmreg ablate`.", ""]
    lines += summary

    lines += ["## Results", "", "| metric | final | best |", "|---|---:|---:|"]
    for name, value in sorted(metrics.items()):
        best = format_number(value["best"]) if "best" in value else ""
        lines.append(f"| {name} | {format_number(value['final'])} | {best} |")
    lines.append("")

    run_curves = curves(run_dir)
    if run_curves:
        files = plot_curves({name: {run_dir.name: points} for name, points in run_curves.items()},
                            run_dir / "report_plots")
        lines += ["## Curves", ""]
        lines += [f"![{path.stem}](report_plots/{path.name})" for path in files]
        lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
