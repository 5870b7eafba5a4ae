"""The ``llmreg`` command: ``llmreg --version``, ``llmreg lab build``, ``llmreg lab info``."""

import argparse
import json
import logging
import shutil
import sys

import llmreg


def _lab_build(args) -> int:
    from llmreg.lab.model import ensure_lab_model, is_lab_model, lab_model_dir

    path = lab_model_dir(args.seed)
    if args.force and path.exists():
        shutil.rmtree(path)
    if is_lab_model(path):
        sys.stdout.write(f"The lab model is already built: {path} (use --force to rebuild)\n")
        return 0
    ensure_lab_model(args.seed, show_progress=True)
    return _lab_info(argparse.Namespace(seed=args.seed, json=False))


def _lab_info(args) -> int:
    from llmreg.lab.model import LAB_MODEL_ID, is_lab_model, lab_model_dir, read_lab_info

    path = lab_model_dir(args.seed)
    if not is_lab_model(path):
        sys.stdout.write(f"The lab model {LAB_MODEL_ID} (seed {args.seed}) is not built yet; expected at {path}.\n"
                         "Build it with `llmreg lab build` (about two minutes on two CPU cores), or let the first\n"
                         "recipe that asks for it build it.\n")
        return 1
    info = read_lab_info(path)
    if args.json:
        sys.stdout.write(json.dumps({"path": str(path), **info}, indent=2) + "\n")
        return 0
    lines = [
        f"{LAB_MODEL_ID}  (seed {info['seed']}, lab version {info['lab_version']})",
        f"  path        {path}",
        (
            f"  model       {info['architecture']}, {info['num_parameters']:,} parameters, "
            f"warm-started for {info['warm_start_steps']} steps"
        ),
        f"  built in    {info['build_seconds']} s with torch {info['torch_version']}",
        f"  weights     sha256 {info['weights_sha256'][:16]}…",
        "  baseline scores on held-out lab data (greedy decoding):",
    ]
    lines.append(_format_scores(info["baseline_scores"]))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _lab_eval(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmreg.lab.evaluate import evaluate_lab_model
    from llmreg.lab.model import LAB_MODEL_ID, is_lab_model, read_lab_info, resolve_model_name_or_path

    path = resolve_model_name_or_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    scores = evaluate_lab_model(model, tokenizer, num_samples=args.num_samples)
    lines = [f"{args.model}: scores on held-out lab data (greedy decoding)", _format_scores(scores)]
    if not is_lab_model(path):
        lab = resolve_model_name_or_path(LAB_MODEL_ID)
        lines += ["the lab model's baseline, for comparison:", _format_scores(read_lab_info(lab)["baseline_scores"])]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _format_scores(scores: dict[str, float]) -> str:
    lines = []
    for name, value in scores.items():
        if name.endswith("_chance"):
            continue
        chance = scores.get(f"{name}_chance")
        unit = " nats/token" if name.endswith("loss") else " %"
        suffix = f"  (chance: {chance:.2f}{unit})" if chance is not None else ""
        lines.append(f"    {name:<24}{value:8.2f}{unit}{suffix}")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmreg", description=llmreg.__doc__)
    parser.add_argument("--version", action="version", version=f"llmreg {llmreg.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    lab = commands.add_parser("lab", help="the offline tiny model and synthetic tasks")
    lab_commands = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)
    build = lab_commands.add_parser("build", help="build the lab model into the cache ($LLMREG_CACHE)")
    build.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    build.set_defaults(handler=_lab_build)
    info = lab_commands.add_parser("info", help="show the cached lab model and its baseline scores")
    info.add_argument("--json", action="store_true", help="print the build record as JSON")
    info.set_defaults(handler=_lab_info)
    evaluate = lab_commands.add_parser("eval", help="score any model on the lab tasks (e.g. a recipe's output_dir)")
    evaluate.add_argument("model", help="a model directory, or llmreg/tiny")
    evaluate.add_argument("--num-samples", type=int, default=200, help="held-out prompts per task (default 200)")
    evaluate.set_defaults(handler=_lab_eval)
    for sub in (build, info):
        sub.add_argument("--seed", type=int, default=0, help="seed of the lab model (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
