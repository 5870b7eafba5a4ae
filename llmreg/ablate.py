"""Ablation sweeps: ``llmreg ablate sweep.yaml`` runs a grid of recipe runs and tables their results.

A sweep file (examples in ``recipes/sweeps/``)::

    output_dir: outputs/sweeps/rpg_variants     # default: outputs/sweeps/<the file's name>
    launch: sequential                          # or "separate": one `accelerate launch` per run
    seeds: [0, 1]
    metrics: {reward: max, rpg/kl: min}         # the table's columns and their goal (min, max, or null: final only)
    experiments:
      - method: rpg                             # a recipe (llmreg list)
        config: ../configs/rpg_lab.yaml         # optional: relative to this file, or a path
        settings: {max_steps: 20}               # keys of the recipe's YAML, for every run of this experiment
        grid: {divergence: [fkl, rkl], estimator: [full, reinforce]}

Every experiment expands to the product of its grid's values, times the seeds; each run gets its own directory
``<output_dir>/<method>-<key=value>...-seed<seed>`` and a YAML config there (``sweep_config.yaml``: the config
file's keys, then ``settings``, then the grid point, the seed and the output_dir), run as the recipe's ``--config``.

``sequential`` runs the recipes one after another in this process (no launch cost; one process); ``separate``
launches each through ``accelerate launch``, so the settings may hold launch options (``accelerate_config: zero3``,
``num_processes``) and a run that crashes its process does not stop the sweep.

Each run is a resumable stage (``llmreg.stages``): it runs in ``<name>.partial/`` and is renamed to ``<name>/`` when
it finishes, with a record of its config. A rerun of the sweep skips the finished runs, continues a run cut mid-way in
its ``.partial`` directory (the recipe resumes from its last checkpoint or stage), retries a failed one, and refuses,
before anything runs, a run whose settings changed, naming them (``--overwrite`` deletes and reruns it). At the end,
``results.{md,csv,json}`` hold each configuration's final and best metrics, mean ± std over the seeds, and ``plots/``
one PNG per metric, with a curve per configuration (mean over seeds).
"""

import csv
import gc
import itertools
import json
import logging
import re
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from llmreg.launch import RECIPES_DIR, recipe_names, run_recipe
from llmreg.report import curves, final_results, format_number, metric_goal, plot_curves, run_metrics
from llmreg.stages import Stage


logger = logging.getLogger(__name__)

SWEEP_KEYS = {"output_dir", "launch", "seeds", "metrics", "experiments"}
EXPERIMENT_KEYS = {"method", "config", "settings", "grid", "name"}
LAUNCH_MODES = ("sequential", "separate")
RUN_CONFIG = "sweep_config.yaml"


@dataclass
class SweepRun:
    name: str
    method: str
    configuration: dict  # what tells this run's configuration apart: the method and its grid point
    seed: int
    config: dict  # the whole YAML the recipe runs with
    output_dir: Path

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.configuration.items())

    def stage(self, overwrite: bool = False) -> Stage:
        """The run's directory as a stage: its settings are its method and config (the output_dir aside)."""
        config = {key: value for key, value in self.config.items() if key != "output_dir"}
        return Stage(self.output_dir, {"method": self.method, "config": config}, overwrite=overwrite)

    def is_done(self) -> bool:
        return self.stage().is_finished()


@dataclass
class Sweep:
    output_dir: Path
    launch: str
    seeds: list[int]
    metrics: dict[str, str | None] | None
    runs: list[SweepRun] = field(default_factory=list)


def check_mapping(mapping, where: str) -> None:
    if not isinstance(mapping, dict):
        raise TypeError(f"{where} must be a YAML mapping, got {type(mapping).__name__}.")


def check_keys(mapping, allowed: set[str], where: str) -> None:
    check_mapping(mapping, where)
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ValueError(f"Unknown keys in {where}: {unknown}; valid keys: {sorted(allowed)}.")


def resolve_config(path: str, sweep_file: Path) -> Path:
    for candidate in (sweep_file.parent / path, Path(path).expanduser(), RECIPES_DIR / "configs" / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Config {path!r} of {sweep_file} not found, relative to the sweep file, the working "
                            f"directory, or {RECIPES_DIR / 'configs'}.")


def value_text(value) -> str:
    return "-".join(map(str, value)) if isinstance(value, list) else str(value)


def run_name(method: str, point: dict, seed: int, experiment_name: str | None) -> str:
    parts = [experiment_name or method, *(f"{key}={value_text(value)}" for key, value in point.items()),
             f"seed{seed}"]
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(parts))


def load_sweep(path: Path) -> Sweep:
    """Read and check a sweep file, and expand it into its runs. Errors name the key and the fix."""
    from llmreg.recipe_utils import LaunchArguments, check_yaml_config

    path = Path(path)
    spec = check_yaml_config(str(path))  # an unreadable file or bad YAML: the file, line and problem
    check_keys(spec, SWEEP_KEYS, str(path))
    launch = spec.get("launch", "sequential")
    if launch not in LAUNCH_MODES:
        raise ValueError(f"launch: {launch!r} in {path}; valid: {', '.join(LAUNCH_MODES)}.")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(seed, int) for seed in seeds):
        raise ValueError(f"seeds in {path} must be a non-empty list of integers, got {seeds!r}.")
    metrics = spec.get("metrics")
    if metrics is not None:
        if isinstance(metrics, list):
            metrics = {name: metric_goal(name) for name in metrics}
        check_mapping(metrics, f"metrics of {path}")
        bad = {name: goal for name, goal in metrics.items() if goal not in ("min", "max", None)}
        if bad:
            raise ValueError(f"metrics of {path}: goals must be min, max or null, got {bad}.")
    experiments = spec.get("experiments")
    if not experiments or not isinstance(experiments, list):
        raise ValueError(f"{path} needs `experiments:`, a list of {{method, config, settings, grid}}.")
    sweep = Sweep(Path(spec.get("output_dir", f"outputs/sweeps/{path.stem}")), launch, seeds, metrics)
    launch_keys = set(LaunchArguments.__dataclass_fields__)
    for index, experiment in enumerate(experiments):
        where = f"experiment {index + 1} of {path}"
        check_keys(experiment, EXPERIMENT_KEYS, where)
        method = experiment.get("method")
        if method not in recipe_names():
            raise ValueError(f"{where}: method {method!r} is not a recipe; valid methods: "
                             f"{', '.join(recipe_names())}.")
        settings = experiment.get("settings") or {}
        check_mapping(settings, f"settings of {where}")
        grid = experiment.get("grid") or {}
        check_mapping(grid, f"grid of {where}")
        not_lists = [key for key, values in grid.items() if not isinstance(values, list) or not values]
        if not_lists:
            raise ValueError(f"grid of {where}: {not_lists} must each be a non-empty list of values.")
        for reserved in ("seed", "output_dir"):
            if reserved in grid or reserved in settings:
                raise ValueError(f"{where} sets {reserved!r}; the sweep sets it for each run (use `seeds:` and "
                                 "`output_dir:` at the top of the sweep file).")
        base = {}  # the config file's keys (its seed and output_dir are replaced), then the settings
        if "config" in experiment:
            base = check_yaml_config(str(resolve_config(experiment["config"], path)))
        base.update(settings)
        launch_options = sorted(launch_keys & (set(base) | set(grid)))
        if launch_options and launch == "sequential":
            raise ValueError(f"{where} sets launch options {launch_options}, which only `launch: separate` can use "
                             "(sequential runs share this process).")
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            for seed in seeds:
                name = run_name(method, point, seed, experiment.get("name"))
                output_dir = sweep.output_dir / name
                config = {**base, **point, "seed": seed, "output_dir": str(output_dir)}
                configuration = {"method": experiment.get("name") or method, **point}
                sweep.runs.append(SweepRun(name, method, configuration, seed, config, output_dir))
    names = [run.name for run in sweep.runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path} names several runs alike: {duplicates}; give the experiments distinct `name:`s.")
    return sweep


def run_in_process(run: SweepRun, config_file: Path, output_dir: Path) -> None:
    import importlib

    from llmreg.launch import parse_recipe_command_line, recipe_path, write_run_record
    from llmreg.recipe_utils import parse_recipe_args
    from llmreg.trainer_utils import reset_accelerator_state

    argv = ["--config", str(config_file)]
    _, launch, settings = parse_recipe_command_line(run.method, argv)
    write_run_record(output_dir, run.method, ["(in the llmreg ablate process)", str(recipe_path(run.method)),
                                              *argv], launch, settings)
    reset_accelerator_state()
    recipe = importlib.import_module(f"llmreg.recipes.{run.method}")
    try:
        recipe.main(*parse_recipe_args(recipe.make_parser(), argv))
    finally:  # the next run starts with this one's models and trainers released
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _RunFailed(Exception):
    """A run ended without finishing: its stage stays unfinished."""


def execute(sweep: Sweep, overwrite: bool = False) -> dict[str, str]:
    """Run every run not done yet; returns each run's status: ``done`` (earlier), ``finished``, ``failed``."""
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    stages = [run.stage(overwrite) for run in sweep.runs]
    done = [stage.is_finished() for stage in stages]  # a run with changed settings is refused here, before any runs
    status = {}
    for index, (run, stage, finished) in enumerate(zip(sweep.runs, stages, done, strict=True), start=1):
        if finished:
            logger.info("[%d/%d] %s: finished earlier, skipped", index, len(sweep.runs), run.name)
            status[run.name] = "done"
            continue
        continuing = stage.partial.exists()
        logger.info("[%d/%d] %s: %s", index, len(sweep.runs), run.name,
                    f"continuing in {stage.partial}" if continuing else "running")
        start = time.perf_counter()
        try:
            with stage.build() as work:
                config_file = work / RUN_CONFIG
                config_file.write_text(yaml.safe_dump({**run.config, "output_dir": str(work)}, sort_keys=False,
                                                      allow_unicode=True))
                (work / "error.txt").unlink(missing_ok=True)
                try:
                    if sweep.launch == "sequential":
                        run_in_process(run, config_file, work)
                        returncode = 0
                    else:
                        returncode = run_recipe(run.method, ["--config", str(config_file)],
                                                log_file=work / "launch.log")
                except Exception:  # noqa: BLE001 - recorded, and the sweep goes on (an interrupt stops it)
                    (work / "error.txt").write_text(traceback.format_exc())
                    returncode = 1
                if returncode != 0:
                    raise _RunFailed
            status[run.name] = "finished"
        except _RunFailed:
            error = stage.partial / "error.txt"
            logger.error("%s failed after %.1f s: see %s", run.name, time.perf_counter() - start,
                         error if error.is_file() else stage.partial / "launch.log")
            status[run.name] = "failed"
    return status


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(sweep: Sweep) -> tuple[list[dict], list[dict]]:
    """Per-run metrics of the finished runs, and per configuration their mean and std over seeds."""
    runs, groups, default_names = [], {}, {}
    for run in sweep.runs:
        if not run.is_done():
            continue
        metrics = run_metrics(run.output_dir, sweep.metrics)
        row = {"run": run.name, **run.configuration, "seed": run.seed, "metrics": metrics}
        runs.append(row)
        groups.setdefault(run.label, []).append(row)
        # Without `metrics:`, the table holds what the runs saved as results, and the logged metrics with a goal.
        saved = final_results(run.output_dir)
        default_names.update({name: None for name, value in metrics.items() if name in saved or "best" in value})
    names = sweep.metrics if sweep.metrics is not None else default_names
    table = []
    for label, rows in groups.items():
        entry = {key: value for key, value in rows[0].items() if key not in ("run", "seed", "metrics")}
        entry.update(configuration=label, seeds=[row["seed"] for row in rows], metrics={})
        for name in names:
            for kind in ("final", "best"):
                values = [row["metrics"][name][kind] for row in rows if kind in row["metrics"].get(name, {})]
                if values:
                    mean, std = mean_std(values)
                    entry["metrics"][f"{name} ({kind})"] = {"mean": mean, "std": std, "n": len(values)}
        table.append(entry)
    return runs, table


def write_results(sweep: Sweep, status: dict[str, str]) -> list[Path]:
    """``results.md``, ``results.csv``, ``results.json`` and ``plots/*.png`` under the sweep's output_dir."""
    runs, table = aggregate(sweep)
    out = sweep.output_dir
    columns = list(dict.fromkeys(column for entry in table for column in entry["metrics"]))
    keys = list(dict.fromkeys(key for run in sweep.runs for key in run.configuration))

    summary = (f"{len(runs)} of {len(sweep.runs)} runs finished; mean ± std over seeds {sweep.seeds} "
               "(n < number of seeds where runs failed or are missing).")
    lines = [f"# Sweep results: {out.name}", "", summary, ""]
    failed = [name for name, state in status.items() if state == "failed"]
    if failed:
        lines += ["Failed: " + ", ".join(failed), ""]
    lines += ["| " + " | ".join([*keys, "n", *columns]) + " |",
              "|" + "---|" * len(keys) + "---:|" * (1 + len(columns))]
    for entry in table:
        cells = [str(entry.get(key, "")) for key in keys] + [str(len(entry["seeds"]))]
        for column in columns:
            value = entry["metrics"].get(column)
            cells.append(f"{format_number(value['mean'])} ± {format_number(value['std'])}" if value else "")
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*keys, "n", *(f"{column} {part}" for column in columns for part in ("mean", "std"))])
        for entry in table:
            row = [entry.get(key, "") for key in keys] + [len(entry["seeds"])]
            for column in columns:
                value = entry["metrics"].get(column)
                row += [value["mean"], value["std"]] if value else ["", ""]
            writer.writerow(row)
    (out / "results.json").write_text(json.dumps({"status": status, "runs": runs, "table": table}, indent=1))

    files = [out / "results.md", out / "results.csv", out / "results.json"]
    files += plot_curves(sweep_curves(sweep), out / "plots")
    return files


def sweep_curves(sweep: Sweep) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per metric, per configuration: the mean over seeds at each step logged by all of them."""
    by_configuration: dict[str, list[dict]] = {}
    for run in sweep.runs:
        if run.is_done():
            by_configuration.setdefault(run.label, []).append(curves(run.output_dir))
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for label, seed_curves in by_configuration.items():
        names = set.intersection(*(set(c) for c in seed_curves))
        if sweep.metrics is not None:
            names &= set(sweep.metrics)
        for name in names:
            per_seed = [dict(c[name]) for c in seed_curves]
            steps = sorted(set.intersection(*(set(points) for points in per_seed)))
            series.setdefault(name, {})[label] = [(step, statistics.fmean(p[step] for p in per_seed))
                                                  for step in steps]
    return series


def ablate(path: Path, *, dry_run: bool = False, overwrite: bool = False) -> int:
    """Load, run what is not done, write the results; returns 0 when every run finished."""
    sweep = load_sweep(path)
    if dry_run:
        for run in sweep.runs:
            stage = run.stage()
            state = "done" if stage.is_finished() else "partial" if stage.partial.exists() else "to run"
            logger.info("%-8s %s  %s", state, run.name, json.dumps(run.config))
        return 0
    status = execute(sweep, overwrite)
    files = write_results(sweep, status)
    logger.info("Results: %s", ", ".join(str(file) for file in files[:3]))
    return 0 if all(state != "failed" for state in status.values()) else 1
