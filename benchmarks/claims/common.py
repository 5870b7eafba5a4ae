"""What every claims script shares: its command line, running recipe arms as subprocesses (several at once on a
multi-core CPU, each with one torch thread), mean ± standard error over seeds, and the report it writes.

A claims script tests one paper's central claim on a real model (``llmreg/smollm2-135m`` by default), with the
baseline arm trained side by side from the same weights and data. Each arm is a recipe run into its own directory;
the recipes' stages make a rerun reuse the arms already trained with the same settings, so an interrupted script
continues where it stopped. ``--scale cpu`` (the default) is sized to finish within about 30 minutes on a 2-core CPU;
``--scale paper`` is the paper's size, for a GPU.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from llmreg.report import format_mean_se as fmt  # noqa: F401  (the claims import it from here)


REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
REAL_MODEL = "llmreg/smollm2-135m"


def claim_parser(doc: str, default_seeds: list[int]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc,
                                     allow_abbrev=False)
    parser.add_argument("--scale", choices=["cpu", "paper"], default="cpu",
                        help="cpu: sized for ~30 minutes on a 2-core CPU; paper: the paper's size, for a GPU.")
    parser.add_argument("--model", default=REAL_MODEL, help="The model every arm starts from.")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help=f"Default: {' '.join(map(str, default_seeds))} (cpu), 0 1 2 (paper).")
    parser.set_defaults(cpu_seeds=default_seeds)
    parser.add_argument("--jobs", type=int, default=None,
                        help="Arms trained at once (default: one per 1 CPU core, at most 2, on a CPU; 1 on a GPU).")
    parser.add_argument("--output-dir", type=Path, default=None, help="Default: outputs/claims/<script name>.")
    return parser


def parse_claim_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The parsed options, with ``--seeds`` defaulting by scale: the script's CPU seeds, or 0 1 2 at paper scale."""
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = args.cpu_seeds if args.scale == "cpu" else [0, 1, 2]
    return args


def default_jobs() -> int:
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))


def run_arms(runs: list[dict], jobs: int) -> None:
    """Run ``runs`` (each: ``name``, ``command`` (a recipe and its arguments), ``log`` (a path), ``done`` (the file
    that exists once it has finished)), at most ``jobs`` at a time; those whose ``done`` exists are skipped. A failed
    run stops everything with the end of its log."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    if jobs > 1 or "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"  # several runs on a few cores: one torch thread each is fastest
    pending = [run for run in runs if not Path(run["done"]).is_file()]
    for run in runs:
        if run not in pending:
            print(f"[claims] {run['name']}: done already ({run['done']})", flush=True)
    running: list[tuple[dict, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < jobs:
            run = pending.pop(0)
            Path(run["log"]).parent.mkdir(parents=True, exist_ok=True)
            log = open(run["log"], "w")  # noqa: SIM115 (closed when the process ends)
            print(f"[claims] {run['name']}: started, log {run['log']}", flush=True)
            process = subprocess.Popen([sys.executable, *run["command"]], cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
            running.append((run, process, time.time()))
        time.sleep(1)
        for item in list(running):
            run, process, started = item
            if process.poll() is None:
                continue
            running.remove(item)
            if process.returncode != 0:
                for _, other, _ in running:
                    other.terminate()
                tail = Path(run["log"]).read_text(errors="replace")[-3000:]
                raise SystemExit(f"[claims] {run['name']} failed (exit {process.returncode}); end of {run['log']}:\n"
                                 f"{tail}")
            print(f"[claims] {run['name']}: finished in {time.time() - started:.0f} s", flush=True)


def machine() -> str:
    """The device the arms ran on, in words."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({os.cpu_count()} cores, {cpu}), torch {torch.__version__}"


def write_report(output_dir: Path, name: str, table: str, data: dict, started: float) -> str:
    """``<output_dir>/<name>.md`` (the command, machine, wall time, then ``table``) and ``<name>.json``."""
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO)), *sys.argv[1:]])
    minutes = (time.time() - started) / 60
    header = (f"`{command}` on {machine()}; {minutes:.0f} minutes this run (arms already trained are reused, so "
              "a rerun is faster).\n\n")
    report = header + table
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.md").write_text(report)
    (output_dir / f"{name}.json").write_text(json.dumps({"command": command, "machine": machine(),
                                                         "minutes": minutes, **data}, indent=1))
    print(report, flush=True)
    return report
